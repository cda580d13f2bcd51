"""The backend seam: one small object holding an array module and that backend's kernels.

The engine asks a tensor for its ``backend`` and calls ``backend.xp`` (array creation and simple
array-API math) or ``backend.kernels`` (the performance-critical compute). Nothing else in the
engine knows whether it runs on NumPy or CuPy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import MinitorchPeftError

BACKENDS = ("numpy", "cupy")


class BackendError(MinitorchPeftError, RuntimeError):
    """A backend was asked for that cannot run here (unknown name, CuPy or GPU missing)."""


DEVICE_BACKENDS = ("cupy",)  # backends whose arrays live on an accelerator


@dataclass(frozen=True, eq=False)
class Backend:
    """An array module (``xp``) plus the kernels written for it.

    ``astype``, ``permute_dims`` and ``matrix_transpose`` are the array-API functions of those names
    where ``xp`` has them (NumPy 2, CuPy 14, any strict array-API namespace), else the equivalent
    NumPy 1 / CuPy 13 spelling; they are bound once here, so the engine's code is written only in
    array-API names and costs nothing extra on either backend.
    """

    name: str
    xp: ModuleType
    kernels: ModuleType

    def __post_init__(self) -> None:
        xp, bind = self.xp, object.__setattr__  # frozen dataclass: set the bound helpers once
        bind(self, "astype", getattr(xp, "astype", None) or _astype_method)
        bind(self, "permute_dims", getattr(xp, "permute_dims", None) or xp.transpose)
        bind(self, "matrix_transpose", getattr(xp, "matrix_transpose", None) or (lambda a: xp.swapaxes(a, -1, -2)))

    def asarray(self, data: Any, dtype: Any = None) -> Any:
        """Data (host or device) as this backend's array; copies only when it must."""
        return self.xp.asarray(data, dtype=dtype)  # on cupy, a NumPy input is copied to the device

    def to_numpy(self, a: Any) -> Any:
        """A host (NumPy) array holding the same values."""
        return self.kernels.to_numpy(a)

    def owns(self, a: Any) -> bool:
        """Whether ``a`` is an array of this backend."""
        array_type = getattr(self.xp, "ndarray", None)
        if array_type is not None:
            return isinstance(a, array_type)
        return _root_module(a) == self.xp.__name__.split(".")[0] and hasattr(a, "shape")

    @property
    def host_memory(self) -> bool:
        """Whether the arrays live in host memory, so reading a scalar result costs no device sync."""
        return self.name not in DEVICE_BACKENDS

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickled (and deep-copied) by name: unpickling asks ``get_backend`` for this process's backend of
        that name, so a model holds the one shared backend object again, never a copy of a module."""
        return get_backend, (self.name,)


#: The 4-bit format's host side (kernels.quant): the same on every backend, so imported from here, never
#: from kernels.quant, by the rest of the package; loaded on first use (it compiles Numba kernels).
_QUANT_FORMAT = ("QUANT_TYPES", "QuantState", "check_block_size", "check_packed", "check_quant_type")


def __getattr__(name: str) -> Any:
    if name in _QUANT_FORMAT:
        from .kernels import quant

        return getattr(quant, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _astype_method(a: Any, dtype: Any, copy: bool = True) -> Any:
    return a.astype(dtype, copy=copy)


def _root_module(a: Any) -> str:
    return type(a).__module__.split(".")[0]


_cache: dict[str, Backend] = {}


def get_backend(name: str | Backend = "numpy") -> Backend:
    """The backend called ``name`` ("numpy" or "cupy"); a clear error if it cannot run here."""
    if isinstance(name, Backend):
        return name
    if name in _cache:
        return _cache[name]
    if name == "numpy":
        import numpy

        from .kernels import cpu

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
    # Set before numba.cuda is first imported (kernels.quant_cuda imports it on first use; numba-cuda reads
    # its config then). By default numba-cuda synchronizes the exporter's stream for every CuPy argument
    # of every launch, so each 4-bit dequantize would wait for the GPU. That wait buys nothing here: CuPy
    # and numba-cuda both launch on the legacy default stream (CuPy's current stream is that stream
    # unless a user switches to a non-blocking one), so stream order already puts a kernel after the
    # CuPy work that produced its inputs. A value the user set is kept. To be confirmed on a GPU
    # (scripts/gpu_check.sh: the QLoRA tests and the cupy epoch against NumPy).
    os.environ.setdefault("NUMBA_CUDA_ARRAY_INTERFACE_SYNC", "0")
    from .kernels import gpu

    return cupy, gpu


def register_backend(backend: Backend) -> Backend:
    """Make a backend built outside this module (e.g. over a strict array-API namespace, for tests)
    reachable by its name and by its arrays (``backend_of``)."""
    if backend.name in BACKENDS:
        raise BackendError(f"backend name {backend.name!r} is reserved")
    _cache[backend.name] = backend
    return backend


def backend_of(array: Any) -> Backend:
    """The backend whose array module made ``array``."""
    root = _root_module(array)
    if root == "cupy":
        return get_backend("cupy")
    if root != "numpy":
        for be in _cache.values():
            if be.name not in BACKENDS and be.owns(array):
                return be
    return get_backend("numpy")
