"""``train``: fine-tune the MLP with a PEFT method, evaluate each epoch, save the model folder."""

from __future__ import annotations

from typing import Any

import click

from ..errors import MinitorchPeftError
from .app import (
    BACKEND, DATA_DIR, DATASET, JSON, apply_aliases, cli, destination, given, hidden_alias, split, user_paths, warn,
    write_json,
)

# The flags only some methods read: given with another method, they are named in one warning line.
ADAPTER_FLAGS = ("rank", "alpha", "rslora", "dropout", "targets", "adapter_name")
QUANT_FLAGS = ("quant", "double_quant", "block_size")
# What --resume takes from the command line; every other setting is the saved run's.
RESUME_OVERRIDES = ("epochs", "output", "backend", "data_dir", "save_every_epoch")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def ignored_flags(ctx: click.Context, method: str) -> str | None:
    """The warning for flags given that ``method`` does not read, or None."""
    parts = []
    if method in ("full", "head"):
        names = [_flag(n) for n in ADAPTER_FLAGS if given(ctx, n)]
        if names:
            parts.append(f"{', '.join(names)} (adapter methods only)")
    if method not in ("qlora", "qdora"):
        names = [_flag(n) for n in QUANT_FLAGS if given(ctx, n)]
        if names:
            parts.append(f"{', '.join(names)} (qlora/qdora only)")
    if method != "lora-plus" and given(ctx, "loraplus_ratio"):
        parts.append("--loraplus-ratio (lora-plus only)")
    return f"--method {method} ignores {'; '.join(parts)}" if parts else None


@cli.command()
@BACKEND
@DATASET
@click.option("--method", default="lora", show_default=True,
              help="lora | dora | lora-plus | qlora | qdora (4-bit base) | head (only the last layer trains) | full "
                   "(see the README for the family).")
@click.option("--rank", default=8, show_default=True, type=int,
              help="LoRA rank r (1 to 65536; above a layer's min(in, out) it is said in one warning line).")
@click.option("--alpha", default=16.0, show_default=True, type=float, help="LoRA alpha (scaling alpha/r).")
@click.option("--rslora", is_flag=True, default=False, help="rsLoRA: scale by alpha/sqrt(r) instead of alpha/r.")
@click.option("--dropout", default=0.0, show_default=True, type=float, help="Dropout on the adapter's input, in [0, 1).")
@click.option("--targets", default="fc1,fc2,fc3", show_default=True, callback=lambda ctx, param, v: split(v),
              help="Comma-separated modules to adapt (exact names or dotted suffixes).")
@click.option("--loraplus-ratio", default=16.0, show_default=True, type=float,
              help="lora-plus: B's learning rate is lr times this.")
@click.option("--adapter-name", default="default", show_default=True,
              help="Name of the new adapter; with --model-dir holding adapters, it is added beside them.")
@click.option("--quant", default="nf4", show_default=True, help="qlora/qdora: 4-bit format of the base, nf4 or fp4.")
@click.option("--double-quant/--no-double-quant", default=True, show_default=True,
              help="qlora/qdora: quantize the per-block absmax to 8 bits as well.")
@click.option("--block-size", default=64, show_default=True, type=int,
              help="qlora/qdora: weights per absmax block (a power of two, 32..4096).")
@click.option("--epochs", default=3, show_default=True, type=int,
              help="Passes over the training set (with --resume: the total to reach, default the saved run's).")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Samples per optimizer step.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate.")
@click.option("--seed", default=42, show_default=True, type=int, help="Seed of the initial weights, dropout and the batch order.")
@click.option("--output", default="./tmp/peft-mnist", show_default=True, type=click.Path(file_okay=False),
              help="Model folder to write (config.json, base.npz, adapters.npz, optimizer.npz, history.npz).")
@DATA_DIR
@click.option("--model-dir", type=click.Path(), default=None,
              help="Start from the model folder saved by an earlier run (a base to fine-tune, or one holding adapters).")
@hidden_alias("--base", "model_dir", type=click.Path())
@click.option("--limit", type=int, default=None, help="Train on the first N training samples only.")
@click.option("--resume", type=click.Path(file_okay=False), default=None,
              help="Continue the run saved in this model folder: its settings, weights, optimizer state and epoch "
                   "(--epochs is the total to reach; --output defaults to that folder).")
@click.option("--save-every-epoch", is_flag=True, default=False,
              help="Save the model folder after every epoch (resumable), and OUTPUT-best at each new best test accuracy.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, callback=destination("--plot"),
              help="Write the loss per step and the accuracy per epoch to this PNG (needs matplotlib: "
                   "pip install 'minitorch_peft[plot]').")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="BLAS threads for every matmul (default: what the BLAS library chooses, every CPU).")
@JSON
@click.option("--distributed", is_flag=True, default=False,
              help="Data parallel over MPI: launch with mpiexec -n N (implied there when N > 1); the global batch "
                   "is N x --batch-size. Needs: pip install 'minitorch_peft[mpi]'.")
@click.option("--dist-timeout", default=60.0, show_default=True, type=float,
              help="--distributed: seconds a rank waits for the others before every rank ends naming the one that stopped.")
@click.option("--dist-transport", default="auto", show_default=True,
              type=click.Choice(["auto", "mpi", "nccl", "cuda-aware-mpi", "host"]),
              help="--distributed: how gradients are all-reduced (auto: mpi on numpy, nccl on cupy).")
@click.option("--log-all-ranks", is_flag=True, default=False, help="--distributed: every rank logs, not only rank 0.")
def train(json_path: str | None, plot_path: str | None, threads: int | None, distributed: bool, dist_timeout: float, dist_transport: str,
          log_all_ranks: bool, **kwargs: Any) -> None:
    """Fine-tune the 784-512-256-10 MLP with a PEFT method, evaluate each epoch, save the model."""
    from ..distributed import launched_rank, launched_size, start_world
    from ..train import TrainConfig, resumed_config, train as run

    ctx = click.get_current_context()
    kwargs = apply_aliases(ctx, kwargs)
    kwargs["base"] = kwargs.pop("model_dir")
    main_rank = launched_rank() == 0
    if plot_path:
        from ..plotting import require_matplotlib

        require_matplotlib("--plot")
    if kwargs["resume"]:
        ignored = [_flag(n) for n in kwargs if n not in RESUME_OVERRIDES + ("resume", "base") and given(ctx, n)]
        # a --model-dir is not ignored: it is passed on, and validate refuses it beside --resume, as the library does
        base = {"base": kwargs["base"]} if kwargs["base"] is not None else {}
        with user_paths():
            cfg = resumed_config(kwargs["resume"], **{n: kwargs[n] for n in RESUME_OVERRIDES if given(ctx, n)}, **base)
        cfg.validate()
        if ignored and main_rank:
            warn(f"--resume continues with the saved run's settings; ignored: {', '.join(ignored)}")
    else:
        cfg = TrainConfig(**kwargs)
        cfg.validate()  # before the banner: a bad flag should print one line and nothing else
        note = ignored_flags(ctx, cfg.method)
        if note and main_rank:
            warn(note)
    unused = [_flag(n) for n in ("dist_timeout", "dist_transport", "log_all_ranks") if given(ctx, n)]
    if unused and not distributed and launched_size() <= 1:  # under mpiexec -n N the world starts anyway
        warn(f"{', '.join(unused)} only apply with --distributed (or under mpiexec); ignored")
    world = start_world(distributed, dist_timeout, dist_transport, log_all_ranks)
    if main_rank:
        click.echo("🔥 minitorch_peft MNIST example\n" + "=" * 40)
    from ..kernels.threads import limit

    try:
        with user_paths(), limit(threads):
            metrics = run(cfg, log=click.echo, world=world)
    except Exception as e:  # one rank's own failure ends every rank at once (MPI_Abort at exit)
        world.end_job_at_exit(2 if isinstance(e, (MinitorchPeftError, click.ClickException)) else 1)
        raise
    if metrics is None:  # not rank 0, under mpiexec
        return
    write_json(json_path, metrics)
    if plot_path:
        from ..plotting import plot_training

        with user_paths():
            plot_training(metrics, plot_path)
        click.echo(f"   Curves written to {plot_path}")
