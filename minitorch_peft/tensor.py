"""Tensor: an array plus the record of how it was made, and reverse-mode autograd over that record."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .backend import Backend, backend_of, get_backend

_DEFAULT_DTYPE = np.float32
_grad_enabled = True


def set_default_dtype(dtype: Any) -> None:
    """Floating dtype for tensors built from Python numbers or lists (float32 unless changed)."""
    global _DEFAULT_DTYPE
    _DEFAULT_DTYPE = np.dtype(dtype).type


def get_default_dtype() -> Any:
    return _DEFAULT_DTYPE


def is_grad_enabled() -> bool:
    return _grad_enabled


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Inside this block no graph is recorded: results have requires_grad=False."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


class _ReleasedNode:
    """Stands where a freed graph node was, so a second backward() fails loudly instead of doing nothing."""

    parents: tuple = ()


_RELEASED = _ReleasedNode()


def postorder(root: "Tensor", inputs: Callable[["Tensor"], Iterable["Tensor"]]) -> list["Tensor"]:
    """Every node reachable from ``root`` through ``inputs(node)``, each after all of its inputs
    (depth first; among one node's inputs the last is visited first)."""
    order: list[Tensor] = []
    seen: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:  # iterative DFS: deep graphs must not hit Python's recursion limit
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((p, False) for p in inputs(node) if id(p) not in seen)
    return order


def _grad_inputs(node: "Tensor") -> Iterable["Tensor"]:
    """The inputs of ``node``'s op that a gradient flows to."""
    if node._ctx is None:
        return ()
    return (p for p in node._ctx.parents if p is not None and p.requires_grad)


class Tensor:
    """An n-dimensional array that can record the ops applied to it and differentiate through them."""

    __slots__ = ("data", "grad", "requires_grad", "backend", "_ctx", "name", "__weakref__")
    __array_priority__ = 1000  # numpy_array * tensor calls Tensor.__rmul__, not numpy's broadcasting

    def __init__(
        self,
        data: Any,
        requires_grad: bool = False,
        backend: str | Backend | None = None,
        dtype: Any = None,
    ) -> None:
        if isinstance(data, Tensor):
            data = data.data
        be = get_backend(backend) if backend is not None else backend_of(data)
        if dtype is None and not _is_float_array(data):
            dtype = _DEFAULT_DTYPE if not _is_int_array(data) else None
        self.data = be.asarray(data, dtype=dtype)
        self.backend = be
        self.requires_grad = requires_grad
        self.grad: Any = None
        self._ctx: Any = None  # the Context of the op that made this tensor; None for leaves
        self.name: str | None = None

    @classmethod
    def _make(cls, data: Any, backend: Backend, requires_grad: bool) -> "Tensor":
        """Fast constructor for op outputs: ``data`` is already an array of ``backend``."""
        t = object.__new__(cls)
        t.data, t.backend, t.requires_grad = data, backend, requires_grad
        t.grad = t._ctx = t.name = None
        return t

    # ------------------------------------------------------------------------------ autograd

    def backward(self, grad: Any = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad`` that requires a gradient.

        Walks the graph in reverse topological order, so each node's gradient is complete (summed
        over all its uses) before it is pushed on to its inputs. The graph is released afterwards
        unless ``retain_graph``.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (was it made under no_grad?)")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar, got shape {self.shape}")
            grad = self.backend.xp.ones_like(self.data)
        grads: dict[int, Any] = {id(self): grad.data if isinstance(grad, Tensor) else grad}
        for node in self._topological_order():
            g = grads.pop(id(node), None)
            if g is None:
                continue
            ctx = node._ctx
            if ctx is _RELEASED:
                raise RuntimeError("backward() through a graph that was already freed; "
                                   "pass retain_graph=True to the first backward()")
            if ctx is None:  # a leaf: accumulate into .grad (never in place: g may be shared)
                node.grad = g if node.grad is None else node.grad + g
                continue
            for parent, pg in zip(ctx.parents, ctx.fn.backward(ctx, g)):
                if pg is not None and parent is not None and parent.requires_grad:
                    key = id(parent)
                    grads[key] = pg if key not in grads else grads[key] + pg
            if not retain_graph:
                node._ctx = _RELEASED  # frees the saved activations as soon as they are used

    def _topological_order(self) -> list["Tensor"]:
        """Nodes reachable from self that require grad, each after every node that uses it."""
        order = postorder(self, _grad_inputs)
        order.reverse()
        return order

    def detach(self) -> "Tensor":
        """The same data, cut off from the graph."""
        return Tensor._make(self.data, self.backend, False)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        self.requires_grad = flag
        return self

    def zero_grad(self) -> None:
        self.grad = None

    def graph(self, names: Any = None) -> str:
        """A text tree of the graph behind this tensor (ops, shapes, saved bytes, trainable / frozen leaves).
        ``names``: a Module or {name: tensor} to label the leaves. See ``minitorch_peft.graph``."""
        from .graph import format_graph

        return format_graph(self, names)

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    # ------------------------------------------------------------------------------ array facts

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> Any:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return int(self.data.size)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __len__(self) -> int:
        return self.shape[0]

    def numpy(self) -> np.ndarray:
        """The values as a host NumPy array (a copy for device tensors)."""
        return self.backend.to_numpy(self.data)

    def item(self) -> float:
        return self.numpy().item()

    def to(self, backend: str | Backend) -> "Tensor":
        """This tensor on another backend (a leaf keeps its requires_grad)."""
        be = get_backend(backend)
        if be is self.backend:
            return self
        return Tensor(be.asarray(self.backend.to_numpy(self.data)), self.requires_grad, be)

    def astype(self, dtype: Any) -> "Tensor":
        """This tensor as ``dtype``: a NumPy dtype or name, or the backend's own dtype object."""
        try:
            dtype = getattr(self.backend.xp, np.dtype(dtype).name)  # np.float32 -> xp.float32
        except TypeError:  # not a dtype NumPy reads: the backend's own (e.g. a strict array-API dtype)
            pass
        return _ops.Cast.apply(self, dtype=dtype)

    def double(self) -> "Tensor":
        return self.astype(np.float64)

    def float(self) -> "Tensor":
        return self.astype(np.float32)

    def __repr__(self) -> str:
        grad = ", requires_grad=True" if self.requires_grad else ""
        backend = "" if self.backend is get_backend() else f", backend={self.backend.name!r}"
        return f"Tensor({self.numpy()!r}{grad}{backend})"

    # ------------------------------------------------------------------------------ operators

    def __add__(self, other: Any) -> "Tensor":
        return _ops.Add.apply(self, other)

    def __radd__(self, other: Any) -> "Tensor":
        return _ops.Add.apply(other, self)

    def __sub__(self, other: Any) -> "Tensor":
        return _ops.Sub.apply(self, other)

    def __rsub__(self, other: Any) -> "Tensor":
        return _ops.Sub.apply(other, self)

    def __mul__(self, other: Any) -> "Tensor":
        return _ops.Mul.apply(self, other)

    def __rmul__(self, other: Any) -> "Tensor":
        return _ops.Mul.apply(other, self)

    def __truediv__(self, other: Any) -> "Tensor":
        return _ops.Div.apply(self, other)

    def __rtruediv__(self, other: Any) -> "Tensor":
        return _ops.Div.apply(other, self)

    def __neg__(self) -> "Tensor":
        return _ops.Neg.apply(self)

    def __pow__(self, other: Any) -> "Tensor":
        return _ops.Pow.apply(self, other)

    def __rpow__(self, other: Any) -> "Tensor":
        return _ops.Pow.apply(other, self)

    def __matmul__(self, other: Any) -> "Tensor":
        return _ops.MatMul.apply(self, other)

    def __rmatmul__(self, other: Any) -> "Tensor":
        return _ops.MatMul.apply(other, self)

    def __getitem__(self, index: Any) -> "Tensor":
        return _ops.GetItem.apply(self, index=index)

    # ------------------------------------------------------------------------------ methods

    def exp(self) -> "Tensor":
        return _ops.Exp.apply(self)

    def log(self) -> "Tensor":
        return _ops.Log.apply(self)

    def sqrt(self) -> "Tensor":
        return _ops.Pow.apply(self, 0.5)

    def relu(self) -> "Tensor":
        return _ops.ReLU.apply(self)

    def sum(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> "Tensor":
        return _ops.Sum.apply(self, axis=axis, keepdims=keepdims)

    def mean(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> "Tensor":
        return _ops.Mean.apply(self, axis=axis, keepdims=keepdims)

    def max(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> "Tensor":
        return _ops.Max.apply(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape: Any) -> "Tensor":
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return _ops.Reshape.apply(self, shape=shape)

    def transpose(self, *axes: int) -> "Tensor":
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        return _ops.Transpose.apply(self, axes=axes or None)

    @property
    def T(self) -> "Tensor":
        return self.transpose()

    def log_softmax(self, axis: int = -1) -> "Tensor":
        return _ops.LogSoftmax.apply(self, axis=axis)


def _dtype_kind(data: Any) -> str:
    """NumPy's one-letter kind of ``data``'s dtype ("f", "i", ...), "" for data without a dtype."""
    dtype = getattr(data, "dtype", None)
    if dtype is None:
        return ""
    try:
        return np.dtype(dtype).kind
    except TypeError:  # a dtype object NumPy cannot read (another array-API library's): ask that library
        xp = data.__array_namespace__()
        kinds = (("f", "real floating"), ("i", "signed integer"), ("u", "unsigned integer"), ("b", "bool"))
        return next((k for k, name in kinds if xp.isdtype(dtype, name)), "?")


def _is_float_array(data: Any) -> bool:
    return _dtype_kind(data) == "f"


def _is_int_array(data: Any) -> bool:
    kind = _dtype_kind(data)
    return kind != "" and kind in "iub"


def tensor(data: Any, requires_grad: bool = False, backend: str | Backend | None = None, dtype: Any = None) -> Tensor:
    """A new leaf tensor (PyTorch's ``torch.tensor``)."""
    return Tensor(data, requires_grad=requires_grad, backend=backend, dtype=dtype)


from . import ops as _ops  # noqa: E402  (ops needs Tensor defined first)
