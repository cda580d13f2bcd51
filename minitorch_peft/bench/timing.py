"""Interleaved timing: every case runs once per round, in a rotating order, and each round gives one sample.

On a shared machine the load changes from second to second. Timing case A for ten seconds and then case B
for ten seconds compares two different machines; running a short block of every case in each round, and
taking the median over rounds, compares them under the same conditions. The order rotates from round to
round so no case is always first after a switch (cold caches, another thread pool still spinning).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Stats:
    """Milliseconds per call: the median, min and max over rounds, and every round's value."""

    median: float
    min: float
    max: float
    rounds: list[float] = field(default_factory=list)
    calls: int = 0

    def to_dict(self) -> dict[str, float]:
        return {"median": round(self.median, 6), "min": round(self.min, 6), "max": round(self.max, 6)}

    @classmethod
    def of(cls, samples: list[float], calls: int = 0) -> "Stats":
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), list(samples), calls)


Case = Callable[[], object]


@dataclass
class Block:
    """One case as the round loop sees it: ``run(n)`` makes n calls and returns milliseconds per call;
    ``warmup()`` runs before the first round; ``pool`` names the thread pool (or process) it runs on.

    A local case is timed here; a case in a worker process (``worker.remote_block``) is timed there, by
    the worker's own clock, so that only the numbers cross the pipe.
    """

    run: Callable[[int], float]
    warmup: Callable[[], None] = lambda: None
    pool: str | None = None


def run_calls(fn: Case, n: int, sync: Callable[[], None] | None = None) -> float:
    """Call ``fn`` ``n`` times, then ``sync`` (if any); return the seconds that took, sync included.

    The one timed loop of the benchmark, for local blocks and for a worker's (``worker.Side``)."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def local_block(fn: Case, warmup: int, sync: Callable[[], None] | None = None, pool: str | None = None) -> Block:
    """A case run in this process: ``warmup`` calls first; each block timed with ``sync`` at its end."""
    def run(n: int) -> float:
        return run_calls(fn, n, sync) * 1e3 / n

    def warm() -> None:
        run_calls(fn, warmup, sync)
    return Block(run, warm, pool)


def interleaved(
    cases: dict[str, Case],
    iterations: int,
    rounds: int,
    warmup: int = 3,
    sync: Callable[[], None] | None = None,
    syncs: dict[str, Callable[[], None]] | None = None,
    pools: dict[str, str] | None = None,
    switch_pause: float = 0.2,
) -> dict[str, Stats]:
    """Time every case for ``iterations`` calls in all, split over ``rounds`` interleaved rounds.

    Each case is first called ``warmup`` times (JIT compilation, optimizer state, BLAS buffers). ``sync``
    (or the per-case ``syncs[name]``) runs after each timed block and is timed with it: on a GPU the
    calls only queue work, which must finish before the clock stops. The garbage collector stays on (a
    real training loop pays for it too, and an engine that makes many Python objects pays more); a full
    collection runs before the first round and a young-generation one before each round, so garbage one
    case leaves is mostly collected before the next round rather than on another case's clock.

    ``pools`` names the thread pool each case runs on (default: all the same); see ``interleaved_blocks``.
    """
    syncs = syncs or {}
    pools = pools or {}
    blocks = {name: local_block(fn, warmup, syncs.get(name, sync), pools.get(name)) for name, fn in cases.items()}
    return interleaved_blocks(blocks, iterations, rounds, switch_pause, collect=True)


def interleaved_blocks(
    blocks: dict[str, Block],
    iterations: int,
    rounds: int,
    switch_pause: float = 0.2,
    collect: bool = False,
) -> dict[str, Stats]:
    """Warm every block up, then time each for ``iterations`` calls in all over ``rounds`` rounds.

    Each round runs one block of every case, in an order that rotates from round to round. Before a block
    whose pool differs from the previous block's, the clock waits ``switch_pause`` seconds untimed:
    OpenBLAS worker threads spin for about 0.1 s after their last call before they sleep, and on a 2-core
    machine a PyTorch block started inside that window runs several times slower (measured: 150 ms vs
    20 ms per step on a busy machine). Without the pause the comparison would charge our pool's idle
    spinning to PyTorch. ``collect`` runs this process's garbage collector between rounds (for local
    blocks; a worker collects before each of its blocks).
    """
    if not blocks:
        return {}
    if iterations < 1 or rounds < 1:
        raise ValueError(f"iterations and rounds must be >= 1, got {iterations}, {rounds}")
    rounds = min(rounds, iterations)
    per_round = max(1, iterations // rounds)
    names = list(blocks)
    for name in names:
        blocks[name].warmup()
    samples: dict[str, list[float]] = {name: [] for name in names}
    last_pool = None
    if collect:
        gc.collect()
    for r in range(rounds):
        if collect:
            gc.collect(1)  # the young generations only: a full collection costs ~0.1 s once PyTorch is loaded
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            block = blocks[name]
            if block.pool != last_pool and last_pool is not None and switch_pause > 0:
                time.sleep(switch_pause)
            last_pool = block.pool
            samples[name].append(block.run(per_round))
    return {name: Stats.of(samples[name], per_round * rounds) for name in names}


def round_ratios(a: Stats | None, b: Stats | None) -> list[float] | None:
    """The per-round ratios a_r / b_r, or None where the rounds do not pair (or b has a zero)."""
    if a is None or b is None or len(a.rounds) != len(b.rounds) or not a.rounds or not all(y > 0 for y in b.rounds):
        return None
    return [x / y for x, y in zip(a.rounds, b.rounds)]


def ratio_quartiles(a: Stats | None, b: Stats | None) -> tuple[float, float] | None:
    """(first, third) quartile of the per-round ratios a_r / b_r: the middle half of the rounds, which says how
    far a ratio moves with the machine's load from round to round (None: fewer than 2 paired rounds)."""
    rs = round_ratios(a, b)
    if rs is None or len(rs) < 2:
        return None
    q1, _, q3 = statistics.quantiles(rs, n=4, method="inclusive")
    return q1, q3


def ratio(a: Stats | None, b: Stats | None) -> float | None:
    """a / b as the median over rounds of the per-round ratio a_r / b_r.

    Both ran in the same round, a few blocks apart, so each per-round ratio compares them under the same
    machine load; the median of those is steadier on a busy machine than median(a) / median(b), whose two
    medians may come from different rounds. Falls back to the ratio of medians when the rounds do not pair.
    """
    if a is None or b is None or b.median <= 0:
        return None
    rs = round_ratios(a, b)
    return statistics.median(rs) if rs is not None else a.median / b.median
