"""Function: an op whose forward and backward are written side by side (PyTorch's autograd.Function)."""

from __future__ import annotations

from typing import Any

from . import tensor as _tensor
from .errors import MinitorchPeftError
from .tensor import Tensor


class ShapeError(MinitorchPeftError, ValueError):
    """An op was given arrays whose shapes do not fit together."""


class Context:
    """What an op's forward leaves for its backward: saved arrays, flags, the inputs' needs."""

    def __init__(self, backend: Any, needs_input_grad: tuple[bool, ...]) -> None:
        self.backend = backend
        self.needs_input_grad = needs_input_grad
        self.saved: tuple[Any, ...] = ()
        self.fn: type[Function] | None = None
        self.parents: tuple[Tensor, ...] = ()

    def save_for_backward(self, *values: Any) -> None:
        self.saved = values


class Function:
    """Subclass with ``forward(ctx, *arrays, **kw) -> array`` and ``backward(ctx, grad) -> tuple``.

    ``backward`` returns one gradient (or None) per tensor input, in order, each of that input's shape.
    Keyword arguments to ``apply`` are non-differentiable settings (an axis, a shape).
    """

    @staticmethod
    def forward(ctx: Context, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    @staticmethod
    def backward(ctx: Context, grad: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Any, **kwargs: Any) -> Tensor:
        """Run forward on the inputs' arrays; record the op in the graph if any input needs a gradient."""
        tensors = _as_tensors(inputs)
        backend = tensors[0].backend
        record = _tensor._grad_enabled and any(t.requires_grad for t in tensors)
        ctx = Context(backend, tuple(t.requires_grad for t in tensors) if record else (False,) * len(tensors))
        try:
            out = cls.forward(ctx, *[t.data for t in tensors], **kwargs)
        except ValueError as e:
            shapes = " and ".join(str(t.shape) for t in tensors)
            raise ShapeError(f"{cls.__name__.lower()}: shapes {shapes} do not fit ({e})") from None
        result = Tensor._make(out, backend, record)
        if record:
            ctx.fn = cls
            ctx.parents = tensors
            result._ctx = ctx
        return result


def _as_tensors(inputs: tuple[Any, ...]) -> tuple[Tensor, ...]:
    """Inputs as tensors; plain numbers become constants of the tensors' dtype and backend."""
    if all(isinstance(x, Tensor) for x in inputs):
        return inputs  # type: ignore[return-value]
    like = next((x for x in inputs if isinstance(x, Tensor)), None)
    out = []
    for x in inputs:
        if isinstance(x, Tensor):
            out.append(x)
        elif like is not None:
            dtype = like.dtype if isinstance(x, (int, float)) else None
            out.append(Tensor._make(like.backend.xp.asarray(x, dtype=dtype), like.backend, False))
        else:
            out.append(Tensor(x))
    return tuple(out)
