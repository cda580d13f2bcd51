"""The table behind the default thread policy: our training step and epoch under several BLAS settings.

    python -m minitorch_peft.bench.thread_table [--rounds 10] [--steps 50] [--epoch] [--load K] [--json FILE]

Each setting runs in a worker process of its own (``worker``): 1 thread; N threads for every matmul (what
BLAS does alone, the default); N threads with the size policy of ``kernels/threads.py`` (small matmuls on
one thread), N = every CPU. Their blocks alternate in the same rounds, so every column sees the same machine;
the table shows medians in ms (s for an epoch) and each column over the size-policy column. The table this
printed on the project's 2-CPU machine is in ``kernels/threads.py``, with the default it led to.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
from typing import Any

from .env import cpu_count, load_average
from .load import BusyLoad
from .timing import interleaved_blocks, ratio
from .worker import Worker, remote_block

ROWS = (("small", "full"), ("small", "lora"), ("medium", "full"), ("medium", "lora"))


def settings(n: int) -> dict[str, tuple[int, bool]]:
    return {"1 thread": (1, True), f"{n} threads, every matmul": (n, False), f"{n} threads, small on 1 (policy)": (n, True)}


def measure(rounds: int, steps: int, epoch: bool, data_dir: str | None, load: int = 0) -> dict[str, Any]:
    n = cpu_count()
    cols = settings(n)
    out: dict[str, Any] = {"cpus": n, "load": load, "load_average_start": load_average(), "columns": list(cols),
                           "rows": {}}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        workers = {c: stack.enter_context(Worker("ours", t, "numpy", p)) for c, (t, p) in cols.items()}
        stack.enter_context(BusyLoad(load))
        for model in sorted({m for m, _ in ROWS}):
            for w in workers.values():
                w.call("model", name=model, batch_size=64, seed=0, spec_dir=None)
            blocks = {(c, k): remote_block(w, f"step:{k}", 5) for c, w in workers.items()
                      for m, k in ROWS if m == model}
            stats = interleaved_blocks({f"{c}|{k}": b for (c, k), b in blocks.items()}, steps, rounds, switch_pause=0.1)
            for m, k in ROWS:
                if m == model:
                    out["rows"][f"{m} {k} step (ms)"] = {c: stats[f"{c}|{k}"] for c in cols}
        if epoch:
            for method in ("full", "lora"):
                blocks = {c: _epoch_block(w, method, data_dir) for c, w in workers.items()}
                out["rows"][f"epoch {method} (s)"] = interleaved_blocks(blocks, 3, 3, switch_pause=0.2)
    policy = list(cols)[-1]
    for row, stats in out["rows"].items():
        out["rows"][row] = {c: {"median": round(s.median, 4), "vs_policy": round(ratio(s, stats[policy]) or 0, 3)}
                            for c, s in stats.items()}
    out["load_average_end"] = load_average()
    return out


def _epoch_block(w: Worker, method: str, data_dir: str | None) -> Any:
    from .timing import Block

    return Block(run=lambda _n: float(w.call("epoch", method=method, batch_size=64, data_dir=data_dir)),
                 pool=str(w.pid))


def render(t: dict[str, Any]) -> list[str]:
    lines = [f"BLAS thread settings, our training step (batch 64) and epoch; {t['cpus']} CPU(s); load average "
             f"{' '.join(map(str, t['load_average_start'] or []))} at start, "
             f"{' '.join(map(str, t['load_average_end'] or []))} at end"
             + (f"; {t['load']} competing process(es)" if t["load"] else ""),
             f"{'':<22}" + "".join(f"{c:>34}" for c in t["columns"])]
    for row, cells in t["rows"].items():
        lines.append(f"{row:<22}" + "".join(f"{cells[c]['median']:>22.3f} ({cells[c]['vs_policy']:.2f}x pol.)"
                                             for c in t["columns"]))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--epoch", action="store_true")
    ap.add_argument("--load", type=int, default=0)
    ap.add_argument("--data-dir", default=os.environ.get("MINITORCH_PEFT_DATA"))
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    t = measure(a.rounds, a.steps, a.epoch, a.data_dir, a.load)
    print("\n".join(render(t)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(t, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
