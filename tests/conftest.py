"""Shared fixtures: ``backend`` runs a test once per array backend ("numpy", and "cupy" where it can run).

The cupy case is skipped, with the reason in the test report, when CuPy is not installed or no CUDA
GPU is usable, so the suite passes unchanged on a CPU-only machine and covers the GPU path on a GPU one.
"""

from __future__ import annotations

import functools

import pytest

from minitorch_peft.backend import Backend, get_backend


@functools.lru_cache(maxsize=None)
def cupy_skip_reason() -> str | None:
    """Why the cupy backend cannot run here ("CuPy not installed" / "no CUDA GPU ..."), None if it can."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        return f"CuPy not installed ({e.__class__.__name__})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no CUDA GPU ({e.__class__.__name__}: {e})"
    return None if count > 0 else "no CUDA GPU (device count 0)"


def backend_param(name: str) -> object:
    """A pytest param for backend ``name``, skipped with a clear reason when it cannot run here."""
    if name == "cupy":
        reason = cupy_skip_reason()
        if reason is not None:
            return pytest.param(name, marks=pytest.mark.skip(reason=f"cupy backend: {reason}"), id=name)
    return pytest.param(name, id=name)


@pytest.fixture(params=[backend_param("numpy"), backend_param("cupy")])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The Backend object of each available array backend in turn (``backend.name``, ``.xp``, ``.kernels``)."""
    return get_backend(request.param)
