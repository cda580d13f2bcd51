"""The backend seam: one small object holding an array module and that backend's kernels.

The engine asks a tensor for its ``backend`` and calls ``backend.xp`` (array creation and simple
array-API math) or ``backend.kernels`` (the performance-critical compute). Nothing else in the
engine knows whether it runs on NumPy or CuPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any

BACKENDS = ("numpy", "cupy")


class BackendError(RuntimeError):
    """A backend was asked for that cannot run here (unknown name, CuPy or GPU missing)."""


@dataclass(frozen=True, eq=False)
class Backend:
    """An array module (``xp``) plus the kernels written for it."""

    name: str
    xp: ModuleType
    kernels: ModuleType

    def asarray(self, data: Any, dtype: Any = None) -> Any:
        """Data (host or device) as this backend's array; copies only when it must."""
        return self.xp.asarray(data, dtype=dtype)  # on cupy, a NumPy input is copied to the device

    def to_numpy(self, a: Any) -> Any:
        """A host (NumPy) array holding the same values."""
        return self.kernels.to_numpy(a)

    def owns(self, a: Any) -> bool:
        """Whether ``a`` is an array of this backend."""
        return isinstance(a, self.xp.ndarray)

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"


_cache: dict[str, Backend] = {}


def get_backend(name: str | Backend = "numpy") -> Backend:
    """The backend called ``name`` ("numpy" or "cupy"); a clear error if it cannot run here."""
    if isinstance(name, Backend):
        return name
    if name in _cache:
        return _cache[name]
    if name == "numpy":
        import numpy

        from kernels import cpu

        backend = Backend("numpy", numpy, cpu)
    elif name == "cupy":
        backend = Backend("cupy", *_load_cupy())
    else:
        raise BackendError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    _cache[name] = backend
    return backend


def _load_cupy() -> tuple[ModuleType, ModuleType]:
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        raise BackendError(
            f"backend 'cupy' needs CuPy, which is not installed or failed to import ({e.__class__.__name__}); "
            "install it with: pip install 'minitorch_peft[cuda12]' (or [cuda13])"
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise BackendError(f"backend 'cupy': CuPy is installed but no CUDA device is usable ({e})") from None
    if count < 1:
        raise BackendError("backend 'cupy': CuPy is installed but no CUDA GPU was found")
    from kernels import gpu

    return cupy, gpu


def backend_of(array: Any) -> Backend:
    """The backend whose array module made ``array``."""
    if type(array).__module__.split(".")[0] == "cupy":
        return get_backend("cupy")
    return get_backend("numpy")
