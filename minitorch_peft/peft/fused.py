"""The fused adapter ops: LoRA and DoRA, each one forward and one backward, written once over the array module.

Like Burn's custom kernels, the gradient math lives here, above the backends: the code below uses only
array-API operations (``@``, ``*``, ``xp.reshape``, ``xp.sum``) on ``ctx.backend.xp`` arrays, plus the few
kernels that truly differ per device (``linear_forward`` / ``linear_backward``, ``row_sumsq``, ``rowdot``).
So NumPy, CuPy and a strict array-API namespace all run the same lines.

The base weight ``W`` (out x in) enters as an array or as an operand from ``peft.weights``: a dense
weight, or a packed 4-bit one that dequantizes inside. The ops ask it only for ``x W^T + b``, ``g W`` and
(DoRA) ``W A^T`` and its row sums of squares, so QLoRA / QDoRA are these same ops over a packed base.

Notation: x (batch, in), A (r, in), B (out, r), s the scaling, x_d = x * mask (dropout, or x itself),
u = s x_d A^T (batch, r): the thin product that is all the backward needs besides x; the (out x in)
update s B A is never formed.
"""

from __future__ import annotations

from typing import Any

from ..backend import Backend
from ..function import Context, Function, ShapeError
from .weights import as_weight

__all__ = ["LoRAFunction", "DoRAFunction", "BaseLinearFunction", "dora_weight_norm"]


def _check_shapes(op: str, x: Any, w: Any, a: Any = None, bm: Any = None, b: Any = None, mag: Any = None) -> None:
    """ShapeError naming ``op`` and the shapes unless x (..., in), W (out, in), A (r, in), B (out, r), b and m (out,)."""
    n_out, n_in = w.shape
    ok = x.ndim >= 1 and x.shape[-1] == n_in
    if a is not None:
        r = a.shape[0]
        ok = ok and a.ndim == 2 and a.shape[1] == n_in and bm.ndim == 2 and tuple(bm.shape) == (n_out, r)
    for v in (b, mag):
        ok = ok and (v is None or tuple(v.shape) == (n_out,))
    if not ok:
        named = [("x", x), ("W", w), ("A", a), ("B", bm), ("m", mag), ("b", b)]
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in named if v is not None)
        raise ShapeError(f"{op}: shapes {shapes} do not fit (want x (..., in), W (out, in), A (r, in), B (out, r))")


def _flat(xp: Any, v: Any) -> Any:
    """(..., n) -> (batch, n): the batch dimensions of an activation folded into one."""
    return xp.reshape(v, (-1, v.shape[-1]))


def _lora_grads(
    be: Backend, g: Any, x: Any, w: Any, a: Any, bm: Any, u: Any, scaling: float, xd: Any, mask: Any,
    need_x: bool, need_w: bool, need_a: bool, need_bm: bool, keep_w: bool = False,
) -> tuple[Any, Any, Any, Any]:
    """(dx, dW, dA, dB) of y = x W^T + s (x_d A^T) B^T for the output gradient g, each only if needed.

    dB = g^T u;  dA = s (g B)^T x_d;  dx = g W + s (g B) A [* mask];  dW = g^T x.
    """
    xp = be.xp
    gbm = _flat(xp, g).T @ _flat(xp, u) if need_bm else None
    gu = None
    if need_a or need_x:
        gu = g @ bm  # (batch, r)
        gu *= scaling
    ga = _flat(xp, gu).T @ _flat(xp, x if xd is None else xd) if need_a else None
    gx = None
    if need_x:
        gx = w.matmul(g, keep=keep_w)  # first: a packed W's row-chunk buffer is gone before lora_part exists
        lora_part = gu @ a
        if mask is not None:
            lora_part *= mask
        gx += lora_part
    gw = be.kernels.linear_backward(g, x, None, False, True, False)[1] if need_w else None
    return gx, gw, ga, gbm


class LoRAFunction(Function):
    """y = x W^T + b + s (x_d A^T) B^T in one op; its backward gives dx, dW, dA, dB, db (each only if needed).

    Backward, with u = s x_d A^T saved from the forward:

        dB = g^T u,   dA = s (g B)^T x_d,   dx = g W + s (g B) A [* mask],   dW = g^T x,   db = sum_batch g.

    ``w`` is W as an array or a base-weight operand (``peft.weights``); ``b`` may be None.
    """

    @staticmethod
    def forward(ctx: Context, x: Any, w: Any, a: Any, bm: Any, b: Any = None, *, scaling: float, mask: Any = None) -> Any:
        be = ctx.backend
        wop = as_weight(w, be)
        _check_shapes("lora", x, wop, a, bm, b)
        xd = None if mask is None else x * mask
        y = wop.matmul_t(x, b, keep=ctx.needs_input_grad[0])  # a packed W stays for dx = g W, within its budget
        u = (x if xd is None else xd) @ a.T
        u *= scaling  # folded into the thin (batch x r) matrix, where it is cheapest
        y += u @ bm.T
        ctx.save_for_backward(x, w, a, bm, u, xd, mask)  # w as given (the input array, or the operand)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, ...]:
        x, w, a, bm, u, xd, mask = ctx.saved
        need_x, need_w, need_a, need_bm, need_b = ctx.needs_input_grad
        be = ctx.backend
        w = as_weight(w, be)
        gx, gw, ga, gbm = _lora_grads(be, g, x, w, a, bm, u, ctx.scaling, xd, mask, need_x, need_w, need_a, need_bm)
        gb = be.xp.sum(_flat(be.xp, g), axis=0) if need_b else None
        return gx, gw, ga, gbm, gb


def _row_norm(be: Backend, sq: Any, wa: Any, a: Any, bm: Any, scaling: float) -> Any:
    """n = ||W + s B A|| per row from ||W_o||^2 (``sq``, updated in place) and W A^T.

    ||W_o + s B_o A||^2 = ||W_o||^2 + 2 s B_o . (W A^T)_o + s^2 B_o (A A^T) B_o^T: beyond one pass over W,
    only the thin (out x r) W A^T and the (r x r) Gram matrix A A^T are needed. With B = 0 this is exactly
    sqrt(||W_o||^2), which is how the magnitude is initialised, so a new adapter changes nothing.
    """
    xp, rowdot = be.xp, be.kernels.rowdot
    bg = bm @ (a @ a.T)
    sq += (2.0 * scaling) * rowdot(bm, wa, 1)
    sq += (scaling * scaling) * rowdot(bm, bg, 1)
    sq = xp.maximum(sq, xp.finfo(sq.dtype).smallest_normal)  # a zero row would divide by zero
    return xp.sqrt(sq)


def dora_weight_norm(be: Backend, w: Any, a: Any, bm: Any, scaling: float) -> tuple[Any, Any]:
    """(n, W A^T): n = ||W + s B A|| per output row, without forming the (out x in) matrix."""
    w = as_weight(w, be)
    wa, sq = w.norm_terms(a)
    return _row_norm(be, sq, wa, a, bm, scaling), wa


class DoRAFunction(Function):
    """y = (m / n) * (x W^T + s (x_d A^T) B^T) + b with n = ||W + s B A|| per output row (Liu et al., 2024).

    With c = m / n and z = x W^T + s (x_d A^T) B^T, DoRA's output is c z + b, so everything but dm and db
    is LoRA's backward of gz = g c:

        dm = sum_batch(g z) / n,   db = sum_batch g,   (dx, dW, dA, dB) = LoRA's, for gz.

    The norm n is a constant (DoRA paper, section 4.3, and Hugging Face PEFT) unless ``norm_grad``: then
    dL/dV = h V with V = W + s B A and h = -c dm / n, which adds s h (W A^T + s B A A^T) to dB,
    s ((h B)^T W + s ((h B)^T B) A) to dA and h V to dW, still without an (out x in) product for A and B.
    """

    @staticmethod
    def forward(
        ctx: Context, x: Any, w: Any, a: Any, bm: Any, mag: Any, b: Any = None, *,
        scaling: float, mask: Any = None, norm_grad: bool = False,
    ) -> Any:
        be = ctx.backend
        wop = as_weight(w, be)
        _check_shapes("dora", x, wop, a, bm, b, mag)
        need = ctx.needs_input_grad
        xd = None if mask is None else x * mask
        # x W^T (the one big matmul), W A^T and ||W_o||^2 in one pass over W
        z, wa, sq = wop.dora_terms(x, a, keep=need[0] or (norm_grad and need[2]))
        u = (x if xd is None else xd) @ a.T
        u *= scaling
        z += u @ bm.T
        n = _row_norm(be, sq, wa, a, bm, scaling)
        y = z * (mag / n)
        if b is not None:
            y += b
        ctx.save_for_backward(x, w, a, bm, mag, u, z, n, wa, xd, mask)
        ctx.scaling, ctx.norm_grad = scaling, norm_grad
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, ...]:
        x, w, a, bm, mag, u, z, n, wa, xd, mask = ctx.saved
        need_x, need_w, need_a, need_bm, need_m, need_b = ctx.needs_input_grad
        be, s, norm_grad = ctx.backend, ctx.scaling, ctx.norm_grad
        xp, w = be.xp, as_weight(w, be)
        c = mag / n
        gm = be.kernels.rowdot(_flat(xp, g), _flat(xp, z), 0) / n if (need_m or norm_grad) else None
        w_again = norm_grad and need_a  # dA through the norm needs W once more: a packed W stays until then
        gx, gw, ga, gbm = _lora_grads(be, g * c, x, w, a, bm, u, s, xd, mask, need_x, need_w, need_a, need_bm,
                                      keep_w=w_again)
        gb = xp.sum(_flat(xp, g), axis=0) if need_b else None
        if norm_grad and (need_a or need_bm or need_w):
            h = -c * gm / n
            hb = bm * h[:, None]
            if need_bm:
                gbm += s * (h[:, None] * wa + s * (hb @ (a @ a.T)))
            if need_a:
                ga += s * (w.matmul(hb.T) + s * ((hb.T @ bm) @ a))
            if need_w:
                gw += h[:, None] * (w.array() + s * (bm @ a))
        return gx, gw, ga, gbm, (gm if need_m else None), gb


class BaseLinearFunction(Function):
    """y = x W^T + b over any base-weight operand (a layer with no adapter active, or merged);
    dx = g W, dW = g^T x (a dense, trainable W only), db = sum_batch g."""

    @staticmethod
    def forward(ctx: Context, x: Any, w: Any, b: Any = None) -> Any:
        wop = as_weight(w, ctx.backend)
        _check_shapes("linear", x, wop, b=b)
        ctx.save_for_backward(x, w)
        return wop.matmul_t(x, b, keep=ctx.needs_input_grad[0])

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, ...]:
        x, w = ctx.saved
        need_x, need_w, need_b = ctx.needs_input_grad
        _, gw, gb = ctx.backend.kernels.linear_backward(g, x, None, False, need_w, need_b)
        return (as_weight(w, ctx.backend).matmul(g) if need_x else None), gw, gb
