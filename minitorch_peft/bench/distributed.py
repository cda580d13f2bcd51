"""``bench --distributed``: what data parallelism costs per step, for full fine-tuning, LoRA, DoRA and QLoRA.

For every method and model: the bytes all-reduced per step, read from the live buffer of the
``DistributedOptimizer`` (the trainable gradients, nothing else); the time of one training step (forward,
backward, all-reduce, Adam) with 1 rank and with 2 ranks on this machine, each rank on its own batch of
``--batch-size`` samples (so 2 ranks process twice the samples per step); and the share of the 2-rank step
spent in the all-reduce. That share is the time from starting the all-reduce to its completion, so it also
holds any wait for the slower rank.

The driver launches ``mpiexec -n 1`` and ``mpiexec -n 2`` of this module in turn (``--launches`` times each,
interleaved 1, 2, 1, 2, ...), one BLAS thread per rank (unless ``OMP_NUM_THREADS`` and the like say
otherwise), as data parallelism runs one rank per core or GPU; a worker times the methods in interleaved
rounds and rank 0 writes its medians as JSON. ``allreduce_alone_ms`` times the all-reduce by itself, right
after a barrier: the cost of moving the bytes, without the wait for a slower rank.
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from ..backend import get_backend
from ..distributed import EXTRA, DistributedError, DistributedOptimizer, World, mpiexec_command
from . import variants
from .env import cpu_count

KINDS = ("full", "lora", "dora", "qlora")
LABELS = {"full": "Full fine-tuning", "lora": "LoRA", "dora": "DoRA", "qlora": "QLoRA (NF4+DQ)"}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")

Log = Callable[[str], None]


# ------------------------------------------------------------------------------------------- one launch


def worker(out: str, models: list[str], batch_size: int, backend_name: str, steps: int, rounds: int, seed: int) -> None:
    """One rank of a launch: time every method's distributed step; rank 0 writes the results to ``out``."""
    world = World.start(timeout=300)
    backend = get_backend(backend_name)
    results: dict[str, Any] = {"ranks": world.size, "library": world.library, "models": {}}
    for name in models:
        dims = variants.MODELS[name]
        cases: dict[str, tuple[Any, Any, DistributedOptimizer]] = {}
        x, y, _, _ = variants.batch(dims, batch_size, backend, seed + 1000 * world.rank)  # each rank its own samples
        for kind in KINDS:
            v = variants.build(kind, dims, backend, seed)
            if not v.available:
                continue
            assert v.model is not None and v.optimizer is not None
            v.optimizer = dist = DistributedOptimizer(v.optimizer, world)
            cases[kind] = (variants.step_call(v, x, y), v.model, dist)
        world.shard_weight = 1.0 / world.size  # equal shards: the all-reduce sums g_r / N
        samples: dict[str, list[tuple[float, float, float]]] = {k: [] for k in cases}
        order = list(cases)
        for r in range(rounds + 1):  # round 0 warms up (JIT, Adam state, BLAS buffers) and is not kept
            for kind in order[r % len(order):] + order[:r % len(order)]:
                step, _, dist = cases[kind]
                world.barrier("the start of a timed block")
                comm0, t0 = dist.comm_seconds, time.perf_counter()
                for _ in range(steps):
                    step()
                t1 = time.perf_counter()
                world.barrier("the start of a timed all-reduce")
                t2 = time.perf_counter()
                for _ in range(steps):
                    world.allreduce(dist.reducer, "a timed all-reduce")
                t3 = time.perf_counter()
                if r:
                    samples[kind].append(((t1 - t0) / steps, (dist.comm_seconds - comm0) / steps, (t3 - t2) / steps))
        rows = {}
        for kind, (_, model, dist) in cases.items():
            step_s = statistics.median(s[0] for s in samples[kind])
            comm_s = statistics.median(s[1] for s in samples[kind])
            alone_s = statistics.median(s[2] for s in samples[kind])
            rows[kind] = {"allreduce_bytes": dist.nbytes, "allreduce_elements": int(dist.buffer.size),
                          "dtype": str(dist.buffer.dtype), "trainable": model.num_parameters(trainable_only=True),
                          "step_ms": round(1e3 * step_s, 4), "allreduce_ms": round(1e3 * comm_s, 4),
                          "allreduce_alone_ms": round(1e3 * alone_s, 4),
                          "transport": dist.transport}
        results["models"][name] = {"dims": dims, "methods": rows}
    if world.is_main:
        Path(out).write_text(json.dumps(results))
    world.finish()


# ------------------------------------------------------------------------------------------- the driver


def run_distributed(models: list[str], batch_size: int = 64, backend: str = "numpy", ranks: tuple[int, ...] = (1, 2),
                    quick: bool = False, launches: int | None = None, log: Log = print) -> dict[str, Any]:
    """Launch the workers (``ranks`` interleaved, ``launches`` times each); print and return the table."""
    if importlib.util.find_spec("mpi4py") is None:
        raise DistributedError(f"bench --distributed needs mpi4py and an MPI library, which are not installed: {EXTRA}")
    launches = launches or (1 if quick else 2)
    steps, rounds = (5, 3) if quick else (10, 5)
    cpus = cpu_count()  # reported: how many cores the ranks share
    log(f"🌐 Data parallel: MPI all-reduce of the trainable gradients, {', '.join(models)} model(s), "
        f"batch {batch_size} per rank, backend {backend}; ranks {', '.join(map(str, ranks))} on this machine "
        f"({cpus} CPUs, {launches} launch(es) each, interleaved)")
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in ranks}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(launches):
            for n in ranks:
                out = Path(tmp) / f"{n}-{i}.json"
                env = {**os.environ, **{k: os.environ.get(k, "1") for k in THREAD_VARS}}
                cmd = mpiexec_command(n) + [sys.executable, "-m", "minitorch_peft.bench.distributed", str(out),
                                            ",".join(models), str(batch_size), backend, str(steps), str(rounds), "0"]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
                if done.returncode != 0 or not out.exists():
                    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
                    raise DistributedError(f"bench --distributed: mpiexec -n {n} failed ({done.returncode}): {tail[0]}")
                runs[n].append(json.loads(out.read_text()))
    results = {"ranks": list(ranks), "batch_size": batch_size, "backend": backend, "launches": launches,
               "library": runs[ranks[0]][0]["library"], "models": {}}
    for name in models:
        methods: dict[str, Any] = {}
        for kind in KINDS:
            per_rank = {n: [r["models"][name]["methods"][kind] for r in runs[n] if kind in r["models"][name]["methods"]]
                        for n in ranks}
            if not all(per_rank.values()):
                continue
            first = per_rank[ranks[0]][0]
            methods[kind] = {k: first[k] for k in ("allreduce_bytes", "allreduce_elements", "dtype", "trainable", "transport")}
            for n in ranks:
                methods[kind][f"step_ms_{n}"] = statistics.median(r["step_ms"] for r in per_rank[n])
                methods[kind][f"allreduce_ms_{n}"] = statistics.median(r["allreduce_ms"] for r in per_rank[n])
                methods[kind][f"allreduce_alone_ms_{n}"] = statistics.median(r["allreduce_alone_ms"] for r in per_rank[n])
        results["models"][name] = {"dims": variants.MODELS[name], "methods": methods}
    for line in table(results):
        log(line)
    return results


def table(res: dict[str, Any]) -> list[str]:
    """The results as text: one block per model, one row per method."""
    ranks, b = res["ranks"], res["batch_size"]
    top = max(ranks)
    lines = [f"   {res['library']}; step = forward + backward + all-reduce + Adam (median ms); all-reduce, "
             f"its share of the step and 'alone' are at {top} ranks: in the step it includes waiting for the slower "
             f"rank; 'alone' times it by itself after a barrier; 1 BLAS thread per rank"]
    for name, model in res["models"].items():
        lines.append(f"\n   {name} ({' -> '.join(map(str, model['dims']))})")
        head = f"   {'method':<17}{'trainable':>10}{'all-reduced/step':>18}"
        head += "".join(f"{f'{n} rank' + ('s' if n > 1 else ''):>10}" for n in ranks)
        head += f"{'all-reduce':>12}{'share':>7}{'alone':>10}   samples/s at {' -> '.join(map(str, ranks))} ranks"
        lines.append(head)
        for kind, m in model["methods"].items():
            row = f"   {LABELS[kind]:<17}{m['trainable']:>10,}{m['allreduce_bytes']:>16,} B"
            row += "".join(f"{m[f'step_ms_{n}']:>10.2f}" for n in ranks)
            step = m[f"step_ms_{top}"]
            share = m[f"allreduce_ms_{top}"] / step if step else 0.0
            rates = " -> ".join(f"{n * b / (m[f'step_ms_{n}'] / 1e3):,.0f}" for n in ranks)
            row += f"{m[f'allreduce_ms_{top}']:>10.3f}ms{share:>7.1%}{m[f'allreduce_alone_ms_{top}']:>8.3f}ms   {rates}"
            lines.append(row)
    return lines


if __name__ == "__main__":
    out, models, batch, backend, steps, rounds, seed = sys.argv[1:8]
    try:
        worker(out, models.split(","), int(batch), backend, int(steps), int(rounds), int(seed))
    except DistributedError as e:  # one line, which the driver passes on
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
