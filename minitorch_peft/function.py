"""Function: an op whose forward and backward are written side by side (PyTorch's autograd.Function)."""

from __future__ import annotations

import inspect
from typing import Any

from . import tensor as _tensor
from .errors import MinitorchPeftError
from .tensor import Tensor


class ShapeError(MinitorchPeftError, ValueError):
    """An op was given arrays whose shapes do not fit together."""


def shape_error(op: str, *arrays: Any, want: str = "") -> ShapeError:
    """ShapeError naming the op and every operand's shape (and what it wanted, if given)."""
    shapes = " and ".join(str(tuple(a.shape)) for a in arrays)
    return ShapeError(f"{op}: shapes {shapes} do not fit" + (f" ({want})" if want else ""))


def broadcastable(sa: tuple[int, ...], sb: tuple[int, ...]) -> bool:
    """Whether two shapes broadcast together (NumPy's rule: right-aligned, each pair equal or one is 1)."""
    return all(m == n or m == 1 or n == 1 for m, n in zip(reversed(sa), reversed(sb)))


def check_broadcast(op: str, a: Any, b: Any) -> None:
    """Raise ShapeError unless arrays ``a`` and ``b`` broadcast together."""
    if a.shape != b.shape and not broadcastable(a.shape, b.shape):
        raise shape_error(op, a, b, want="they must broadcast")


class Context:
    """What an op's forward leaves for its backward: saved arrays, flags, the inputs' needs."""

    def __init__(self, backend: Any, needs_input_grad: tuple[bool, ...]) -> None:
        self.backend = backend
        self.needs_input_grad = needs_input_grad
        self.saved: tuple[Any, ...] = ()
        self.fn: type[Function] | None = None
        self.parents: tuple[Tensor | None, ...] = ()  # None where an optional input was not given

    def save_for_backward(self, *values: Any) -> None:
        self.saved = values


class Function:
    """Subclass with ``forward(ctx, *arrays, **kw) -> array`` and ``backward(ctx, grad) -> tuple``.

    ``backward`` returns one gradient (or None) per positional input of ``forward``, in the forward's
    order, each of that input's shape. ``ctx.needs_input_grad`` has one flag per positional input of
    ``forward``: an optional input (a bias) that was not given, or given as None, is False and reaches
    ``forward`` as None, so a backward never counts its inputs. Keyword arguments to ``apply`` are
    non-differentiable settings (an axis, a shape). A forward that checks shapes raises ShapeError itself,
    naming the op and the shapes; any other error is a bug and passes through as it is.
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
        given = [t for t in tensors if t is not None]
        backend = given[0].backend
        record = _tensor._grad_enabled and any(t.requires_grad for t in given)
        pad = (None,) * (_arity(cls, len(tensors)) - len(tensors))
        needs = tuple(t is not None and t.requires_grad for t in tensors + pad) if record else (False,) * (len(tensors) + len(pad))
        ctx = Context(backend, needs)
        out = cls.forward(ctx, *[None if t is None else t.data for t in tensors], **kwargs)
        result = Tensor._make(out, backend, record)
        if record:
            ctx.fn = cls
            ctx.parents = tensors
            result._ctx = ctx
        return result


_ARITY: dict[type, int | None] = {}


def _arity(cls: type, given: int) -> int:
    """The number of positional inputs of ``cls.forward`` (after ctx); ``given`` for a ``*arrays`` forward."""
    n = _ARITY.get(cls, -1)
    if n == -1:
        params = list(inspect.signature(cls.forward).parameters.values())[1:]
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            n = None
        else:
            n = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
        _ARITY[cls] = n
    return given if n is None else max(n, given)


def _as_tensors(inputs: tuple[Any, ...]) -> tuple[Tensor, ...]:
    """Inputs as tensors; plain numbers become constants of the tensors' dtype and backend."""
    if all(isinstance(x, Tensor) or x is None for x in inputs):
        return inputs  # type: ignore[return-value]
    like = next((x for x in inputs if isinstance(x, Tensor)), None)
    out = []
    for x in inputs:
        if isinstance(x, Tensor) or x is None:
            out.append(x)
        elif like is not None:
            dtype = like.dtype if isinstance(x, (int, float)) else None
            out.append(Tensor._make(like.backend.xp.asarray(x, dtype=dtype), like.backend, False))
        else:
            out.append(Tensor(x))
    return tuple(out)
