"""``bench``: full fine-tuning against LoRA, DoRA and QLoRA: parameters, memory and speed, all measured."""

from __future__ import annotations

from typing import Any

import click

from .app import BACKEND, DATA_DIR, JSON, UserError, cli, destination, split, user_paths, write_json


@cli.command()
@BACKEND
@click.option("--models", default="small,medium", show_default=True, callback=lambda ctx, param, v: split(v),
              help="Comma-separated: small (784-512-256-10), medium (784-2048-1024-10).")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Samples per step.")
@click.option("--quick", is_flag=True, default=False, help="Short loops (every section, less precision).")
@click.option("--compare", default=None, help="torch: time the same models in PyTorch side by side (needs PyTorch).")
@click.option("--epoch", is_flag=True, default=False,
              help="Also time one epoch of the real train loop over MNIST (vs PyTorch with --compare torch).")
@DATA_DIR
@click.option("--forward-iters", type=int, default=None, help="Forward calls per variant (default 1000; --quick 100).")
@click.option("--step-iters", type=int, default=None, help="Training steps per variant (default 100; --quick 30).")
@click.option("--rounds", type=int, default=None, help="Interleaved rounds (default 20; --quick 5).")
@click.option("--threads", type=int, default=None,
              help="BLAS / PyTorch threads on both sides (default: every CPU; under --load K, the CPUs the load leaves).")
@click.option("--load", default=0, show_default=True, type=int,
              help="Start this many competing CPU-bound processes for the whole run (a busy machine, on purpose).")
@click.option("--baseline", "baseline_path", type=click.Path(dir_okay=False), default=None,
              help="A quiet run's --json: with --load, each ours/PyTorch ratio is held against its quiet value.")
@click.option("--check", is_flag=True, default=False,
              help="Exit with status 1 if any measured target is missed (under --load: any load criterion).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, callback=destination("--plot"),
              help="Write bar charts to this PNG (needs matplotlib: pip install 'minitorch_peft[plot]').")
@JSON
@click.option("--distributed", is_flag=True, default=False,
              help="Only the data-parallel section: bytes all-reduced per step and step time at 1 and 2 MPI ranks "
                   "(launches mpiexec; needs: pip install 'minitorch_peft[mpi]').")
def bench(json_path: str | None, plot_path: str | None, compare: str | None, check: bool, baseline_path: str | None,
          distributed: bool, **kwargs: Any) -> int:
    """LoRA / DoRA / QLoRA vs full fine-tuning: parameters, memory and speed, all measured."""
    from ..bench import BenchConfig, run
    from ..bench.report import baseline_problem, plot

    if distributed:
        from ..bench.distributed import run_distributed

        cfg = BenchConfig(**kwargs)
        cfg.validate()
        write_json(json_path, run_distributed(cfg.models, cfg.batch_size, cfg.backend, quick=cfg.quick, log=click.echo))
        return 0

    if plot_path:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError("--plot needs matplotlib, which is not installed: pip install 'minitorch_peft[plot]'") from None
    baseline = None
    if baseline_path:
        from ..serialize import load_json

        with user_paths():
            baseline = load_json(baseline_path)
        problem = baseline_problem(baseline)  # now, not after the whole run has been measured
        if problem:
            raise UserError(f"--baseline {baseline_path}: {problem}")
    cfg = BenchConfig(compare=split(compare), baseline=baseline, **kwargs)
    cfg.validate()
    results = run(cfg, log=click.echo)
    write_json(json_path, results)
    if plot_path:
        with user_paths():
            plot(results, plot_path)
        click.echo(f"\nPlot written to {plot_path}")
    if check:
        from ..bench.report import missed

        bad = missed(results)
        if bad:
            click.echo(f"bench --check: {len(bad)} target(s) missed: "
                       + "; ".join(f"[{t['model']}] {t['what']} {t['value']:.3f}x > {t['limit']:g}x"
                                   + (" (the limit lies inside its rounds' middle half: rerun to tell)"
                                      if t.get("close") else "") for t in bad),
                       err=True)
            return 1
        held = "load criterion" if results.get("config", {}).get("load") else "target"
        click.echo(f"bench --check: every measured {held} met")
    return 0
