"""Seeded, shuffled minibatches over any arrays that support fancy indexing (NumPy or CuPy)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def num_batches(n: int, batch_size: int) -> int:
    """How many batches `iterate_batches` yields for n examples (the last one may be partial)."""
    _check_batch_size(batch_size)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return -(-n // batch_size)


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of n examples for (seed, epoch), reproducible for a given NumPy version."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    # Seeding from the pair (not seed + epoch) keeps (1, 0) and (0, 1) from sharing an order.
    return np.random.default_rng([seed, epoch]).permutation(n)


def _array_module(x: Any) -> ModuleType:
    """NumPy for NumPy arrays, else the top-level module that defines x's type (e.g. cupy)."""
    if isinstance(x, np.ndarray):
        return np
    module = sys.modules.get(type(x).__module__.split(".")[0])
    return module if module is not None and hasattr(module, "asarray") else np


def iterate_batches(
    x: Any,
    y: Any,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    epoch: int = 0,
    xp: ModuleType | None = None,
) -> Iterator[tuple[Any, Any]]:
    """Yield (xb, yb) batches covering every example once; the last partial batch is kept."""
    _check_batch_size(batch_size)
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} rows but y has {y.shape[0]}")
    order = epoch_permutation(n, seed, epoch) if shuffle else None
    if order is not None:
        xp = _array_module(x) if xp is None else xp
        if xp is not np:
            # One host-to-device copy per epoch; each batch then slices the index array on the device.
            order = xp.asarray(order)
    # Checks above run at call time; only the loop is lazy.
    return _batches(x, y, batch_size, order)


def _batches(x: Any, y: Any, batch_size: int, order: Any) -> Iterator[tuple[Any, Any]]:
    n = x.shape[0]
    for start in range(0, n, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]  # views, no copy
        else:
            idx = order[start : start + batch_size]
            yield x[idx], y[idx]
