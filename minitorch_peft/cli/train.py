"""``train``: fine-tune the MLP with a PEFT method, evaluate each epoch, save the model folder."""

from __future__ import annotations

from typing import Any

import click

from .app import BACKEND, DATA_DIR, DATASET, JSON, cli, split, user_paths, write_json


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
@click.option("--targets", default="fc1,fc2,fc3", show_default=True, callback=lambda ctx, param, v: split(v),
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
@click.option("--epochs", default=3, show_default=True, type=int, help="Passes over the training set.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Samples per optimizer step.")
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Adam learning rate.")
@click.option("--seed", default=42, show_default=True, type=int, help="Seed of the initial weights and the batch order.")
@click.option("--output", default="./tmp/peft-mnist", show_default=True, type=click.Path(file_okay=False),
              help="Model folder to write (config.json, base.npz, adapters.npz).")
@DATA_DIR
@click.option("--base", type=click.Path(), default=None, help="Start from a model saved by an earlier run.")
@click.option("--limit", type=int, default=None, help="Train on the first N training samples only.")
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
def train(json_path: str | None, distributed: bool, dist_timeout: float, dist_transport: str, log_all_ranks: bool,
          **kwargs: Any) -> None:
    """Fine-tune the 784-512-256-10 MLP with a PEFT method, evaluate each epoch, save the model."""
    from ..distributed import launched_rank, start_world
    from ..train import TrainConfig, train as run

    cfg = TrainConfig(**kwargs)
    cfg.validate()  # before the banner: a bad flag should print one line and nothing else
    world = start_world(distributed, dist_timeout, dist_transport, log_all_ranks)
    if launched_rank() == 0:
        click.echo("🔥 minitorch_peft MNIST example\n" + "=" * 40)
    with user_paths():
        metrics = run(cfg, log=click.echo, world=world)
    if metrics is not None:  # rank 0 only, under mpiexec
        write_json(json_path, metrics)
