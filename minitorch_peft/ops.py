"""The differentiable ops. Each is one Function: its math in the docstring, forward and backward together.

Element-wise binary ops broadcast like NumPy; their backward sums the gradient back to each input's
shape (``unbroadcast``). Heavy compute (linear, relu, cross-entropy) lives in ``kernels``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .function import Context, Function, broadcastable, check_broadcast, shape_error


def unbroadcast(xp: Any, grad: Any, shape: tuple[int, ...]) -> Any:
    """Sum ``grad`` over the axes that broadcasting added or stretched, giving ``shape``."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        i + lead for i, n in enumerate(shape) if n == 1 and grad.shape[i + lead] != 1
    )
    return xp.reshape(xp.sum(grad, axis=axes), shape)


def _norm_axes(axis: int | tuple[int, ...] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes)


def _expand_reduced(xp: Any, g: Any, in_shape: tuple[int, ...], axis: Any, keepdims: bool) -> Any:
    """Reshape a reduction's output gradient so it broadcasts against the input."""
    if not keepdims:
        kept = [1 if i in _norm_axes(axis, len(in_shape)) else n for i, n in enumerate(in_shape)]
        g = xp.reshape(g, tuple(kept))
    return g


# ------------------------------------------------------------------------------- element-wise


class Add(Function):
    """z = a + b;  da = g,  db = g."""

    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        check_broadcast("add", a, b)
        ctx.shapes = (a.shape, b.shape)
        return a + b

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, Any]:
        xp, (sa, sb) = ctx.backend.xp, ctx.shapes
        return (
            unbroadcast(xp, g, sa) if ctx.needs_input_grad[0] else None,
            unbroadcast(xp, g, sb) if ctx.needs_input_grad[1] else None,
        )


class Sub(Function):
    """z = a - b;  da = g,  db = -g."""

    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        check_broadcast("sub", a, b)
        ctx.shapes = (a.shape, b.shape)
        return a - b

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, Any]:
        xp, (sa, sb) = ctx.backend.xp, ctx.shapes
        return (
            unbroadcast(xp, g, sa) if ctx.needs_input_grad[0] else None,
            unbroadcast(xp, -g, sb) if ctx.needs_input_grad[1] else None,
        )


class Mul(Function):
    """z = a * b;  da = g * b,  db = g * a."""

    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        check_broadcast("mul", a, b)
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, Any]:
        xp, (a, b) = ctx.backend.xp, ctx.saved
        return (
            unbroadcast(xp, g * b, a.shape) if ctx.needs_input_grad[0] else None,
            unbroadcast(xp, g * a, b.shape) if ctx.needs_input_grad[1] else None,
        )


class Div(Function):
    """z = a / b;  da = g / b,  db = -g * a / b^2."""

    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        check_broadcast("div", a, b)
        ctx.save_for_backward(a, b)
        return a / b

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, Any]:
        xp, (a, b) = ctx.backend.xp, ctx.saved
        return (
            unbroadcast(xp, g / b, a.shape) if ctx.needs_input_grad[0] else None,
            unbroadcast(xp, -g * a / (b * b), b.shape) if ctx.needs_input_grad[1] else None,
        )


class Neg(Function):
    """z = -a;  da = -g."""

    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        return -a

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any]:
        return (-g,)


class Pow(Function):
    """z = a ** b;  da = g * b * a^(b-1),  db = g * a^b * log(a)."""

    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        check_broadcast("pow", a, b)
        out = a**b
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, Any]:
        xp, (a, b, out) = ctx.backend.xp, ctx.saved
        return (
            unbroadcast(xp, g * b * a ** (b - 1), a.shape) if ctx.needs_input_grad[0] else None,
            unbroadcast(xp, g * out * xp.log(a), b.shape) if ctx.needs_input_grad[1] else None,
        )


class Exp(Function):
    """z = exp(a);  da = g * z."""

    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = ctx.backend.xp.exp(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any]:
        return (g * ctx.saved[0],)


class Log(Function):
    """z = log(a);  da = g / a."""

    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        ctx.save_for_backward(a)
        return ctx.backend.xp.log(a)

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any]:
        return (g / ctx.saved[0],)


class ReLU(Function):
    """z = max(a, 0);  da = g * [z > 0]."""

    @staticmethod
    def forward(ctx: Context, a: Any) -> Any:
        out = ctx.backend.kernels.relu_forward(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any]:
        return (ctx.backend.kernels.relu_backward(g, ctx.saved[0]),)


class Cast(Function):
    """z = a as another dtype;  da = g as a's dtype."""

    @staticmethod
    def forward(ctx: Context, a: Any, dtype: Any) -> Any:
        ctx.dtype = a.dtype
        return ctx.backend.astype(a, dtype)

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any]:
        return (ctx.backend.astype(g, ctx.dtype),)


# ------------------------------------------------------------------------------- linear algebra


class MatMul(Function):
    """z = a @ b;  da = g @ b^T,  db = a^T @ g (batched over leading axes, which broadcast)."""

    @staticmethod
    def forward(ctx: Context, a: Any, b: Any) -> Any:
        inner_b = b.shape[-2] if b.ndim > 1 else b.shape[0] if b.ndim else None
        if a.ndim == 0 or b.ndim == 0 or a.shape[-1] != inner_b or not broadcastable(a.shape[:-2], b.shape[:-2]):
            raise shape_error("matmul", a, b, want="a's last axis must match b's second-to-last")
        ctx.save_for_backward(a, b)
        return ctx.backend.xp.matmul(a, b)

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, Any]:
        be, (a, b) = ctx.backend, ctx.saved
        xp, mT = be.xp, be.matrix_transpose
        da = db = None
        # 1-D operands are promoted to matrices by matmul; do the same so the transposes make sense
        a2 = xp.expand_dims(a, axis=0) if a.ndim == 1 else a
        b2 = xp.expand_dims(b, axis=-1) if b.ndim == 1 else b
        g2 = g
        if b.ndim == 1:  # first: for vector @ vector, g is 0-d and only axis -1 exists to expand
            g2 = xp.expand_dims(g2, axis=-1)
        if a.ndim == 1:
            g2 = xp.expand_dims(g2, axis=-2)
        if ctx.needs_input_grad[0]:
            da = xp.matmul(g2, mT(b2))
            da = xp.reshape(unbroadcast(xp, da, a2.shape), a.shape)
        if ctx.needs_input_grad[1]:
            db = xp.matmul(mT(a2), g2)
            db = xp.reshape(unbroadcast(xp, db, b2.shape), b.shape)
        return da, db


class Linear(Function):
    """y = x @ W^T + b;  dx = g @ W,  dW = g^T @ x,  db = sum g (each only when needed)."""

    @staticmethod
    def forward(ctx: Context, x: Any, w: Any, b: Any = None) -> Any:
        if x.ndim < 1 or w.ndim != 2 or x.shape[-1] != w.shape[1] or (b is not None and b.shape != (w.shape[0],)):
            raise shape_error("linear", *(v for v in (x, w, b) if v is not None), want="x (..., in), W (out, in), b (out,)")
        ctx.save_for_backward(x, w)
        return ctx.backend.kernels.linear_forward(x, w, b)

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, ...]:
        x, w = ctx.saved
        need = ctx.needs_input_grad
        return ctx.backend.kernels.linear_backward(g, x, w, need[0], need[1], need[2])


# ------------------------------------------------------------------------------- reductions


class Sum(Function):
    """z = sum(a, axis);  da = g broadcast back over the summed axes."""

    @staticmethod
    def forward(ctx: Context, a: Any, axis: Any = None, keepdims: bool = False) -> Any:
        ctx.shape, ctx.axis, ctx.keepdims = a.shape, axis, keepdims
        return ctx.backend.xp.sum(a, axis=axis, keepdims=keepdims)

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any]:
        xp = ctx.backend.xp
        g = _expand_reduced(xp, g, ctx.shape, ctx.axis, ctx.keepdims)
        return (xp.broadcast_to(g, ctx.shape),)


class Mean(Function):
    """z = mean(a, axis);  da = g / n broadcast back, n = number of elements averaged."""

    @staticmethod
    def forward(ctx: Context, a: Any, axis: Any = None, keepdims: bool = False) -> Any:
        ctx.shape, ctx.axis, ctx.keepdims = a.shape, axis, keepdims
        return ctx.backend.xp.mean(a, axis=axis, keepdims=keepdims)

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any]:
        xp = ctx.backend.xp
        n = int(np.prod([ctx.shape[i] for i in _norm_axes(ctx.axis, len(ctx.shape))]))
        g = _expand_reduced(xp, g, ctx.shape, ctx.axis, ctx.keepdims)
        return (xp.broadcast_to(g / n, ctx.shape),)


class Max(Function):
    """z = max(a, axis);  da = g shared equally among the positions that attain the max."""

    @staticmethod
    def forward(ctx: Context, a: Any, axis: Any = None, keepdims: bool = False) -> Any:
        xp = ctx.backend.xp
        out = xp.max(a, axis=axis, keepdims=True)
        ctx.axis, ctx.keepdims = axis, keepdims
        ctx.save_for_backward(a, out)
        return out if keepdims else xp.reshape(out, _reduced_shape(a.shape, axis))

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any]:
        xp, (a, out) = ctx.backend.xp, ctx.saved
        mask = ctx.backend.astype(a == out, a.dtype)
        mask = mask / xp.sum(mask, axis=ctx.axis, keepdims=True)
        g = _expand_reduced(xp, g, a.shape, ctx.axis, ctx.keepdims)
        return (g * mask,)


def _reduced_shape(shape: tuple[int, ...], axis: Any) -> tuple[int, ...]:
    axes = _norm_axes(axis, len(shape))
    return tuple(n for i, n in enumerate(shape) if i not in axes)


# ------------------------------------------------------------------------------- shape


class Reshape(Function):
    """z = a viewed with a new shape;  da = g reshaped back."""

    @staticmethod
    def forward(ctx: Context, a: Any, shape: tuple[int, ...]) -> Any:
        ctx.shape = a.shape
        return ctx.backend.xp.reshape(a, shape)

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any]:
        return (ctx.backend.xp.reshape(g, ctx.shape),)


class Transpose(Function):
    """z = a with axes permuted (reversed by default);  da = g with the inverse permutation."""

    @staticmethod
    def forward(ctx: Context, a: Any, axes: tuple[int, ...] | None = None) -> Any:
        axes = tuple(reversed(range(a.ndim))) if axes is None else tuple(axes)
        ctx.axes = tuple(ax % a.ndim for ax in axes) if a.ndim else axes  # argsort needs them non-negative
        return ctx.backend.permute_dims(a, axes)

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any]:
        return (ctx.backend.permute_dims(g, tuple(int(i) for i in np.argsort(ctx.axes))),)


class GetItem(Function):
    """z = a[index];  da = zeros like a with g added at index (repeated indices accumulate)."""

    @staticmethod
    def forward(ctx: Context, a: Any, index: Any) -> Any:
        ctx.shape, ctx.dtype, ctx.index = a.shape, a.dtype, index
        return a[index]

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any]:
        zeros = ctx.backend.xp.zeros(ctx.shape, dtype=ctx.dtype)
        return (ctx.backend.kernels.index_add(zeros, ctx.index, g),)


# ------------------------------------------------------------------------------- losses


class LogSoftmax(Function):
    """z = a - logsumexp(a, axis);  da = g - softmax(a) * sum(g, axis)."""

    @staticmethod
    def forward(ctx: Context, a: Any, axis: int = -1) -> Any:
        xp = ctx.backend.xp
        shifted = a - xp.max(a, axis=axis, keepdims=True)
        out = shifted - xp.log(xp.sum(xp.exp(shifted), axis=axis, keepdims=True))
        ctx.axis = axis
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any]:
        xp, (out,) = ctx.backend.xp, ctx.saved
        return (g - xp.exp(out) * xp.sum(g, axis=ctx.axis, keepdims=True),)


class CrossEntropy(Function):
    """loss = mean_i -log softmax(z_i)[y_i], fused and shifted for stability;  dz = (softmax(z) - onehot(y)) / N."""

    @staticmethod
    def forward(ctx: Context, logits: Any, labels: Any) -> Any:
        if logits.ndim != 2 or labels.shape != (logits.shape[0],):
            raise shape_error("cross_entropy", logits, labels, want="logits (N, C) and integer labels (N,)")
        loss, probs = ctx.backend.kernels.cross_entropy_forward(logits, labels)
        ctx.save_for_backward(probs, labels)
        return ctx.backend.xp.asarray(loss, dtype=logits.dtype)

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, None]:
        probs, labels = ctx.saved
        return ctx.backend.kernels.cross_entropy_backward(g, probs, labels), None


class Dropout(Function):
    """z = a * mask, mask = Bernoulli(1-p)/(1-p) drawn in forward;  da = g * mask."""

    @staticmethod
    def forward(ctx: Context, a: Any, mask: Any) -> Any:
        ctx.save_for_backward(mask)
        return a * mask

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, None]:
        return g * ctx.saved[0], None
