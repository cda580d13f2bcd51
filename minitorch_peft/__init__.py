"""minitorch_peft: LoRA, DoRA and QLoRA on a reverse-mode autograd engine written over NumPy / CuPy."""

import importlib.util as _util
import os as _os
import sys as _sys

if _util.find_spec(__name__ + ".kernels") is None:  # pragma: no cover - a checkout that was not pip-installed
    # Installed, setuptools maps the repository's top-level kernels/ to minitorch_peft.kernels; from a bare
    # checkout, load that folder under the same name, so there is one module (and one QuantState class).
    _dir = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    _spec = _util.spec_from_file_location(__name__ + ".kernels", _os.path.join(_dir, "__init__.py"),
                                          submodule_search_locations=[_dir])
    if _spec is not None and _spec.loader is not None:
        _sys.modules[_spec.name] = _module = _util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)

from . import functional, nn, optim
from .backend import BACKENDS, Backend, BackendError, get_backend
from .function import Context, Function, ShapeError
from .random import manual_seed
from .serialize import CheckpointError
from .tensor import Tensor, get_default_dtype, is_grad_enabled, no_grad, set_default_dtype, tensor

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "Backend", "BackendError", "CheckpointError", "Context", "Function", "ShapeError", "Tensor",
    "functional", "get_backend", "get_default_dtype", "is_grad_enabled", "manual_seed", "nn", "no_grad",
    "optim", "set_default_dtype", "tensor",
]
