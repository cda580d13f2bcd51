"""``infer``: load a saved model, predict a few test samples, score the whole test set."""

from __future__ import annotations

import click

from .app import BACKEND, DATA_DIR, DATASET, JSON, cli, user_paths, write_json


@cli.command()
@click.option("--model-dir", default="./tmp/peft-mnist", show_default=True, type=click.Path(),
              help="The model folder to load.")
@click.option("--samples", default=10, show_default=True, type=click.IntRange(min=1), help="Test samples to show.")
@BACKEND
@DATASET
@DATA_DIR
@JSON
def infer(model_dir: str, samples: int, backend: str, dataset: str, data_dir: str | None, json_path: str | None) -> None:
    """Load a saved model, predict a few test samples, and score the whole test set."""
    from ..backend import get_backend
    from ..checkpoint import load_model
    from ..data import load_mnist_like
    from ..peft import LoraConfig
    from ..train import evaluate, predict

    be = get_backend(backend)
    click.echo("🔥 minitorch_peft inference\n" + "=" * 40)
    with user_paths():
        model, config = load_model(model_dir, backend=be)
    adapters = config.get("adapters") or {}
    if adapters:
        # the settings as load_model applied them: an absent field is its default, a null active adapter the first one
        active = config.get("active_adapter") or next(iter(adapters))
        c = LoraConfig.from_dict(adapters[active])
        quant = config.get("quantization")
        kind = "DoRA" if c.use_dora else "LoRA"
        if quant:
            kind = "Q" + kind + f" ({quant.get('quant_type')})"
        click.echo(f"Loaded {kind} model from {model_dir} (adapter {active!r}, rank={c.r}, alpha={c.lora_alpha:g})")
    else:
        click.echo(f"Loaded model from {model_dir} (no adapters)")
    with user_paths():  # as in train: an OS error on a data file the user pointed at is the user's to fix
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
    write_json(json_path, {"samples": rows, "sample_accuracy": right / n, "test_accuracy": acc, "model_dir": model_dir})
