"""Pictures of a training run (matplotlib, the optional ``plot`` extra): loss per step, accuracy per epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError


def require_matplotlib(flag: str) -> None:
    """One clear error, before any work, when the ``plot`` extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(f"{flag} needs matplotlib, which is not installed: pip install 'minitorch_peft[plot]'") from None


def plot_training(metrics: dict[str, Any], path: str | Path) -> Path:
    """Two panels from ``train``'s metrics: the training loss of every step (with its per-epoch mean) against
    the epoch, and the test accuracy after each epoch; the method and final accuracy in the title."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    losses = np.asarray(metrics["loss_per_step"], dtype=float)
    steps = int(metrics["steps_per_epoch"])
    accuracies = [100 * a for a in metrics["test_accuracy"]]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = np.arange(1, len(losses) + 1) / steps
    ax_loss.plot(x, losses, lw=0.6, alpha=0.45, color="tab:blue", label="loss per step")
    epochs = len(losses) // steps
    if epochs:
        means = losses[: epochs * steps].reshape(epochs, steps).mean(axis=1)
        ax_loss.plot(np.arange(1, epochs + 1), means, "o-", color="tab:blue", label="epoch mean")
    ax_loss.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title="Training loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_acc.plot(range(1, len(accuracies) + 1), accuracies, "o-", color="tab:green")
    for i, a in enumerate(accuracies, start=1):
        ax_acc.annotate(f"{a:.2f}%", (i, a), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="Test accuracy after each epoch",
               xticks=range(1, len(accuracies) + 1))
    ax_acc.margins(x=0.08, y=0.15)  # room for the labels above the points
    ax_acc.grid(alpha=0.3)
    fig.suptitle(f"{metrics['method']} on {metrics.get('dataset', 'mnist')} ({metrics.get('backend', 'numpy')}): "
                 f"final test accuracy {100 * metrics['final_test_accuracy']:.2f}%")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # as --json and --output do (outputs.check_output_file)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
