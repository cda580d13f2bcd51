"""minitorch_peft: LoRA, DoRA and QLoRA on a reverse-mode autograd engine written over NumPy / CuPy."""

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
