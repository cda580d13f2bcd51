"""minitorch_peft command line: ``train``, ``infer``, ``bench`` (and adapter tools).

Every expected failure (bad flag, missing data, damaged checkpoint, missing GPU) ends in one line on
stderr and a non-zero exit; a traceback means a bug.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from minitorch_peft import BackendError, CheckpointError, ShapeError
    from minitorch_peft.data import DataError
    from minitorch_peft.peft import AdapterError

    return (UserError, BackendError, CheckpointError, ShapeError, DataError, AdapterError, ValueError, OSError)


def _write_json(path: str | None, obj: dict[str, Any]) -> None:
    if path:
        from minitorch_peft.serialize import save_json

        save_json(path, obj)


BACKEND = click.option("--backend", default="numpy", show_default=True, type=click.Choice(["numpy", "cupy"]),
                       help="Array backend: numpy (CPU) or cupy (CUDA GPU).")
DATASET = click.option("--dataset", default="mnist", show_default=True, type=click.Choice(["mnist", "fashion-mnist"]))
DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                        help="Folder holding mnist/ and fashion-mnist/ (else $MINITORCH_PEFT_DATA, else the cache).")
JSON = click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write metrics as JSON here.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """LoRA / DoRA / QLoRA fine-tuning on a hand-written autograd engine."""


@cli.command()
@BACKEND
@DATASET
@click.option("--method", default="lora", show_default=True,
              help="lora | dora | lora-plus | qlora | qdora (4-bit base) | head (only the last layer trains) | full "
                   "(see the README for the family).")
@click.option("--rank", default=8, show_default=True, type=int, help="LoRA rank r.")
@click.option("--alpha", default=16.0, show_default=True, type=float, help="LoRA alpha (scaling alpha/r).")
@click.option("--rslora", is_flag=True, default=False, help="rsLoRA: scale by alpha/sqrt(r) instead of alpha/r.")
@click.option("--dropout", default=0.0, show_default=True, type=float, help="Dropout on the adapter's input, in [0, 1).")
@click.option("--targets", default="fc1,fc2,fc3", show_default=True, callback=lambda ctx, param, v: _split(v),
              help="Comma-separated modules to adapt (exact names or dotted suffixes).")
@click.option("--loraplus-ratio", default=16.0, show_default=True, type=float,
              help="lora-plus: B's learning rate is lr times this.")
@click.option("--adapter-name", default="default", show_default=True,
              help="Name of the new adapter; with --base holding adapters, it is added beside them.")
@click.option("--quant", default="nf4", show_default=True, help="qlora/qdora: 4-bit format of the base, nf4 or fp4.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="qlora/qdora: quantize the per-block absmax to 8 bits as well.")
@click.option("--block-size", default=64, show_default=True, type=int,
              help="qlora/qdora: weights per absmax block (a power of two, 32..4096).")
@click.option("--epochs", default=3, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--seed", default=42, show_default=True, type=int)
@click.option("--output", default="./tmp/peft-mnist", show_default=True, type=click.Path(file_okay=False))
@DATA_DIR
@click.option("--base", type=click.Path(), default=None, help="Start from a model saved by an earlier run.")
@click.option("--limit", type=int, default=None, help="Train on the first N training samples only.")
@JSON
def train(json_path: str | None, **kwargs: Any) -> None:
    """Fine-tune the 784-512-256-10 MLP with a PEFT method, evaluate each epoch, save the model."""
    from minitorch_peft.train import TrainConfig, train as run

    cfg = TrainConfig(**kwargs)
    cfg.validate()  # before the banner: a bad flag should print one line and nothing else
    click.echo("🔥 minitorch_peft MNIST example\n" + "=" * 40)
    metrics = run(cfg, log=click.echo)
    _write_json(json_path, metrics)


def _split(value: str | None) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']; empty items are dropped."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _floats(value: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in _split(value)]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {value!r}") from None


@cli.command()
@click.option("--model-dir", required=True, type=click.Path(), help="A model folder with named adapters.")
@click.option("--adapters", default=None, help="Comma-separated adapter names to combine.")
@click.option("--weights", default=None, help="Comma-separated weights, one per adapter.")
@click.option("--combination", default="svd", show_default=True,
              help="cat | linear | svd | ties | dare_linear | dare_ties.")
@click.option("--rank", type=int, default=None, help="Rank of the result (default: the largest input rank; cat: the sum).")
@click.option("--density", type=float, default=None, help="ties / dare: share of each update kept, in (0, 1].")
@click.option("--seed", default=0, show_default=True, type=int, help="dare: seed of the random drops.")
@click.option("--name", "new_name", default="merged", show_default=True, help="Name of the combined adapter.")
@click.option("--unload", is_flag=True, default=False,
              help="Fold the combined (without --adapters: the active) adapter into the base: save a plain model.")
@click.option("--output", required=True, type=click.Path(file_okay=False))
@JSON
def merge(model_dir: str, adapters: str | None, weights: str | None, combination: str, rank: int | None,
          density: float | None, seed: int, new_name: str, unload: bool, output: str, json_path: str | None) -> None:
    """Combine named adapters of a model folder into a new adapter (made active), and save the folder."""
    from minitorch_peft.checkpoint import load_model, save_model
    from minitorch_peft.peft import AdapterError, active_adapter, combine_adapters, list_adapters, merge_and_unload, set_adapter

    model, _ = load_model(model_dir)
    have = list_adapters(model)
    if not have:
        raise AdapterError(f"{model_dir} holds no adapters to merge")
    names = _split(adapters)
    if names:
        if weights is None:
            raise UserError("--weights is required with --adapters: one number per adapter, e.g. --weights 0.5,0.5")
        combine_adapters(model, names, _floats(weights, "--weights"), new_name, combination, rank=rank, density=density, seed=seed)
        set_adapter(model, new_name)
        click.echo(f"Combined {', '.join(names)} into adapter {new_name!r} ({combination})")
    elif not unload:
        raise UserError(f"--adapters is required (the folder has: {', '.join(have)}), unless --unload folds the active adapter")
    result = {"model_dir": model_dir, "output": output, "adapters": names, "combination": combination if names else None,
              "active_adapter": active_adapter(model)}
    if unload:
        merge_and_unload(model)
        click.echo(f"Folded adapter {result['active_adapter']!r} into the base weights")
    save_model(model, output)
    click.echo(f"Saved to {output}")
    _write_json(json_path, result)


@cli.command("export-peft")
@click.option("--model-dir", required=True, type=click.Path())
@click.option("--adapter", default=None, help="Adapter to export (default: the active one).")
@click.option("--output", required=True, type=click.Path(file_okay=False))
def export_peft(model_dir: str, adapter: str | None, output: str) -> None:
    """Write one adapter as Hugging Face PEFT files: adapter_config.json + adapter_model.safetensors."""
    from minitorch_peft.checkpoint import load_model
    from minitorch_peft.peft import active_adapter, save_peft

    model, _ = load_model(model_dir)
    name = adapter or active_adapter(model)
    save_peft(model, output, name)
    click.echo(f"Exported adapter {name!r} of {model_dir} to {output} (Hugging Face PEFT layout)")


@cli.command("import-peft")
@click.option("--base", required=True, type=click.Path(), help="A model folder (plain, or with other adapters).")
@click.option("--peft", "peft_dir", required=True, type=click.Path(), help="A Hugging Face PEFT adapter folder.")
@click.option("--adapter-name", default="default", show_default=True)
@click.option("--output", required=True, type=click.Path(file_okay=False))
def import_peft(base: str, peft_dir: str, adapter_name: str, output: str) -> None:
    """Load a Hugging Face PEFT LoRA / DoRA adapter onto a base model folder and save the result."""
    from minitorch_peft.checkpoint import load_model, save_model
    from minitorch_peft.peft import load_peft

    model, _ = load_model(base)
    load_peft(model, peft_dir, adapter_name)
    save_model(model, output)
    click.echo(f"Loaded {peft_dir} onto {base} as adapter {adapter_name!r}; saved to {output}")


@cli.command()
@click.option("--model-dir", default="./tmp/peft-mnist", show_default=True, type=click.Path())
@click.option("--samples", default=10, show_default=True, type=click.IntRange(min=1))
@BACKEND
@DATASET
@DATA_DIR
@JSON
def infer(model_dir: str, samples: int, backend: str, dataset: str, data_dir: str | None, json_path: str | None) -> None:
    """Load a saved model, predict a few test samples, and score the whole test set."""
    from minitorch_peft.backend import get_backend
    from minitorch_peft.checkpoint import load_model
    from minitorch_peft.data import load_mnist_like
    from minitorch_peft.train import evaluate, predict

    be = get_backend(backend)
    click.echo("🔥 minitorch_peft inference\n" + "=" * 40)
    model, config = load_model(model_dir, backend=be)
    adapters = config.get("adapters") or {}
    if adapters:
        active = config.get("active_adapter")
        c = adapters.get(active, {})
        quant = config.get("quantization")
        kind = "DoRA" if c.get("use_dora") else "LoRA"
        if quant:
            kind = "Q" + kind + f" ({quant.get('quant_type')})"
        click.echo(f"Loaded {kind} model from {model_dir} (adapter {active!r}, rank={c.get('r')}, alpha={c.get('lora_alpha'):g})")
    else:
        click.echo(f"Loaded model from {model_dir} (no adapters)")
    x_test, y_test = load_mnist_like(dataset, "test", data_dir)
    n = min(samples, len(y_test))
    click.echo(f"\nRunning inference on {n} test samples...\n")
    preds = predict(model, be.asarray(x_test[:n]))
    rows = []
    for i, (p, t) in enumerate(zip(preds.tolist(), y_test[:n].tolist())):
        rows.append({"predicted": int(p), "actual": int(t)})
        click.echo(f"Sample {i + 1}: Predicted: {p}, Actual: {t}, {'✓' if p == t else '✗'}")
    right = sum(r["predicted"] == r["actual"] for r in rows)
    click.echo(f"\nAccuracy on {n} samples: {right}/{n} ({right / n:.1%})")
    acc = evaluate(model, be.asarray(x_test), be.asarray(y_test))
    click.echo(f"Accuracy on the whole test set ({len(y_test):,} images): {acc:.2%}")
    _write_json(json_path, {"samples": rows, "sample_accuracy": right / n, "test_accuracy": acc, "model_dir": model_dir})


@cli.command()
@BACKEND
@click.option("--models", default="small,medium", show_default=True, callback=lambda ctx, param, v: _split(v),
              help="Comma-separated: small (784-512-256-10), medium (784-2048-1024-10).")
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--quick", is_flag=True, default=False, help="Short loops (every section, less precision).")
@click.option("--compare", default=None, help="torch: time the same models in PyTorch side by side (needs PyTorch).")
@click.option("--epoch", is_flag=True, default=False,
              help="Also time one epoch of the real train loop over MNIST (vs PyTorch with --compare torch).")
@DATA_DIR
@click.option("--forward-iters", type=int, default=None, help="Forward calls per variant (default 1000; --quick 100).")
@click.option("--step-iters", type=int, default=None, help="Training steps per variant (default 100; --quick 30).")
@click.option("--rounds", type=int, default=None, help="Interleaved rounds (default 20; --quick 5).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write bar charts to this PNG (needs matplotlib: pip install 'minitorch_peft[plot]').")
@JSON
def bench(json_path: str | None, plot_path: str | None, compare: str | None, **kwargs: Any) -> None:
    """LoRA / DoRA / QLoRA vs full fine-tuning: parameters, memory and speed, all measured."""
    from minitorch_peft.bench import BenchConfig, run
    from minitorch_peft.bench.report import plot

    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib, which is not installed: pip install 'minitorch_peft[plot]'") from None
    cfg = BenchConfig(compare=_split(compare), **kwargs)
    cfg.validate()
    results = run(cfg, log=click.echo)
    _write_json(json_path, results)
    if plot_path:
        plot(results, plot_path)
        click.echo(f"\nPlot written to {plot_path}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; expected failures become one line on stderr and exit status 2 (130 on Ctrl-C)."""
    try:
        cli.main(args=argv, prog_name="cli.py", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was saved; any earlier checkpoint is unchanged", err=True)
        return 130
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code or 2
    except _user_errors() as e:
        click.echo(f"error: {e}", err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
