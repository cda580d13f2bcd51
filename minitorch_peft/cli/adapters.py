"""The adapter tools: ``merge`` (combine named adapters, or fold one into the base), ``export-peft``, ``import-peft``."""

from __future__ import annotations

import math

import click

from .app import JSON, UserError, apply_aliases, cli, floats, given, hidden_alias, output_folder, split, user_paths, warn, write_json


def _check_name(name: str, flag: str) -> None:
    """Refuse an adapter name that a saved model folder could not hold (``schema.check_adapter_name``)."""
    from ..schema import check_adapter_name
    from ..serialize import CheckpointError

    try:
        check_adapter_name(name, flag)
    except CheckpointError as e:
        raise UserError(str(e)) from None


@cli.command()
@click.option("--model-dir", required=True, type=click.Path(), help="A model folder with named adapters.")
@click.option("--adapters", default=None, help="Comma-separated adapter names to combine.")
@click.option("--weights", default=None, help="Comma-separated weights, one per adapter.")
@click.option("--combination", default="svd", show_default=True,
              help="cat | linear | svd | ties | dare_linear | dare_ties.")
@click.option("--rank", type=int, default=None, help="Rank of the result (default: the largest input rank; cat: the sum).")
@click.option("--density", type=float, default=None, help="ties / dare: share of each update kept, in (0, 1].")
@click.option("--seed", default=42, show_default=True, type=int, help="dare_linear / dare_ties: seed of the random drops.")
@click.option("--adapter-name", "new_name", default="merged", show_default=True, help="Name of the combined adapter.")
@hidden_alias("--name", "new_name")
@click.option("--unload", is_flag=True, default=False,
              help="Fold the combined (without --adapters: the active) adapter into the base: save a plain model.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@JSON
def merge(model_dir: str, adapters: str | None, weights: str | None, combination: str, rank: int | None,
          density: float | None, seed: int, new_name: str, unload: bool, output: str, json_path: str | None) -> None:
    """Combine named adapters of a model folder into a new adapter (made active), and save the folder."""
    from ..checkpoint import load_model, save_model
    from ..peft import AdapterError, active_adapter, combine_adapters, list_adapters, merge_and_unload, set_adapter

    output_folder(output)
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if density is not None and not math.isfinite(density):
        raise UserError(f"--density must be a finite number in (0, 1], got {density}")
    ctx = click.get_current_context()
    new_name = apply_aliases(ctx, {"new_name": new_name})["new_name"]
    if split(adapters):  # the name becomes part of the saved array keys: one that could not be loaded back is refused now
        _check_name(new_name, "--adapter-name")
    ignored = []
    if combination not in ("ties", "dare_linear", "dare_ties") and given(ctx, "density"):
        ignored.append("--density (ties / dare_linear / dare_ties only)")
    if not combination.startswith("dare") and given(ctx, "seed"):
        ignored.append("--seed (dare_linear / dare_ties only)")
    if not adapters and any(given(ctx, n) for n in ("weights", "combination", "rank", "density", "new_name")):
        ignored.append("--weights/--combination/--rank/--density/--adapter-name (they need --adapters)")
    if ignored:
        warn(f"--combination {combination} ignores {'; '.join(ignored)}" if adapters else f"without --adapters, merge ignores {'; '.join(ignored)}")

    with user_paths():
        model, _ = load_model(model_dir)
    have = list_adapters(model)
    if not have:
        raise AdapterError(f"{model_dir} holds no adapters to merge")
    names = split(adapters)
    if names:
        if weights is None:
            raise UserError("--weights is required with --adapters: one number per adapter, e.g. --weights 0.5,0.5")
        combine_adapters(model, names, floats(weights, "--weights"), new_name, combination, rank=rank, density=density, seed=seed)
        set_adapter(model, new_name)
        click.echo(f"Combined {', '.join(names)} into adapter {new_name!r} ({combination})")
    elif not unload:
        raise UserError(f"--adapters is required (the folder has: {', '.join(have)}), unless --unload folds the active adapter")
    result = {"model_dir": model_dir, "output": output, "adapters": names, "combination": combination if names else None,
              "active_adapter": active_adapter(model)}
    if unload:
        merge_and_unload(model)
        click.echo(f"Folded adapter {result['active_adapter']!r} into the base weights")
    with user_paths():
        save_model(model, output)
    click.echo(f"Saved to {output}")
    write_json(json_path, result)


@cli.command("export-peft")
@click.option("--model-dir", required=True, type=click.Path(), help="The model folder holding the adapter.")
@click.option("--adapter-name", "adapter", default=None, help="Adapter to export (default: the active one).")
@hidden_alias("--adapter", "adapter")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder for the PEFT files.")
def export_peft(model_dir: str, adapter: str | None, output: str) -> None:
    """Write one adapter as Hugging Face PEFT files: adapter_config.json + adapter_model.safetensors."""
    from ..checkpoint import load_model
    from ..peft import active_adapter, save_peft

    output_folder(output, kind="peft")
    adapter = apply_aliases(click.get_current_context(), {"adapter": adapter})["adapter"]

    with user_paths():
        model, _ = load_model(model_dir)
    name = adapter or active_adapter(model)
    with user_paths():
        save_peft(model, output, name)
    click.echo(f"Exported adapter {name!r} of {model_dir} to {output} (Hugging Face PEFT layout)")


@cli.command("import-peft")
@click.option("--model-dir", "base", default=None, type=click.Path(),
              help="A model folder (plain, or with other adapters).  [required]")
@hidden_alias("--base", "base", type=click.Path())
@click.option("--peft", "peft_dir", required=True, type=click.Path(), help="A Hugging Face PEFT adapter folder.")
@click.option("--adapter-name", default="default", show_default=True, help="Name the imported adapter gets.")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
def import_peft(base: str | None, peft_dir: str, adapter_name: str, output: str) -> None:
    """Load a Hugging Face PEFT LoRA / DoRA adapter onto a base model folder and save the result."""
    from ..checkpoint import load_model, save_model
    from ..peft import load_peft

    _check_name(adapter_name, "--adapter-name")
    output_folder(output)
    base = apply_aliases(click.get_current_context(), {"base": base})["base"]
    if base is None:
        raise UserError("--model-dir is required: the model folder to load the adapter onto")

    with user_paths():
        model, _ = load_model(base)
        load_peft(model, peft_dir, adapter_name)
        save_model(model, output)
    click.echo(f"Loaded {peft_dir} onto {base} as adapter {adapter_name!r}; saved to {output}")
