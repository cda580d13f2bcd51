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
@click.option("--method", default="lora", show_default=True, help="lora | full (see the README for the family).")
@click.option("--rank", default=8, show_default=True, type=int, help="LoRA rank r.")
@click.option("--alpha", default=16.0, show_default=True, type=float, help="LoRA alpha (scaling alpha/r).")
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
