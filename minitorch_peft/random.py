"""One seeded random generator for initialisation and dropout, so a seed makes a run repeatable."""

from __future__ import annotations

import numpy as np

_generator = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Reseed the generator used by layer initialisation and dropout masks."""
    global _generator
    _generator = np.random.default_rng(seed)


def generator() -> np.random.Generator:
    """The current generator (host side; device backends derive their draws from it)."""
    return _generator
