"""CPU kernels: BLAS (through NumPy) for the matmuls, Numba for the fused element-wise loops.

Every function here takes and returns plain arrays; the autograd in ``minitorch_peft`` calls them and
never touches the arithmetic itself. ``kernels.gpu`` mirrors this module name for name.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from . import dora_grad as _dora_grad
from .threads import for_gemm as _threads_for

xp = np


# --------------------------------------------------------------------------------------------- linear


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """y = x @ w.T + b, for x of shape (..., in) and w of shape (out, in)."""
    _threads_for(x.size // x.shape[-1], w.shape[0], w.shape[1])  # one BLAS thread if the product is small
    y = x @ w.T
    if b is not None:
        y += b  # in place: y is ours, and this saves a (batch, out) temporary
    return y


def linear_backward(
    g: np.ndarray,
    x: np.ndarray,
    w: np.ndarray,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """dx = g @ w, dw = g.T @ x, db = sum_batch g; each computed only when asked for.

    Skipping dw is what makes a frozen base layer cheap; skipping dx is what makes the first layer
    of a network cheap (its input is data).
    """
    rows = g.size // g.shape[-1]
    if need_x:
        _threads_for(rows, w.shape[1], w.shape[0])
    gx = g @ w if need_x else None
    if need_w or need_b:
        g2 = g.reshape(-1, g.shape[-1])
        if need_w:
            _threads_for(w.shape[0], w.shape[1], rows)
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if need_w else None
        gb = g2.sum(axis=0) if need_b else None
    else:
        gw = gb = None
    return gx, gw, gb


# ------------------------------------------------------------------------------------------- lora


def lora_forward(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, a: np.ndarray, bm: np.ndarray, scaling: float,
    xd: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """y = x @ W.T + b + s * (xd @ A.T) @ B.T, with xd = dropout(x) (or x); also returns u = s * xd @ A.T.

    The rank-r product ``u`` is all the backward needs besides x: the (out x in) update s*B@A is never
    formed, and the scaling is folded into the thin (batch x r) matrix where it is cheapest.
    """
    y = linear_forward(x, w, b)
    _threads_for(x.size // x.shape[-1], a.shape[0], a.shape[1])
    u = (x if xd is None else xd) @ a.T
    u *= scaling
    y += u @ bm.T
    return y, u


def lora_backward(
    g: np.ndarray, x: np.ndarray, w: np.ndarray, a: np.ndarray, bm: np.ndarray, u: np.ndarray, scaling: float,
    need: tuple[bool, bool, bool, bool, bool], xd: np.ndarray | None = None, mask: np.ndarray | None = None,
) -> tuple[np.ndarray | None, ...]:
    """Gradients of lora_forward for (x, W, b, A, B), each only if ``need`` says so.

    dB = g.T @ u;  dA = s (g @ B).T @ xd;  dx = g @ W + s (g @ B) @ A [* mask];  dW = g.T @ x;  db = sum g.
    """
    need_x, need_w, need_b, need_a, need_bm = need
    g2 = g.reshape(-1, g.shape[-1])
    _threads_for(g2.shape[0], a.shape[0], a.shape[1])  # the rank-r products below
    gbm = g2.T @ u.reshape(-1, u.shape[-1]) if need_bm else None
    gu = None
    if need_a or need_x:
        gu = g @ bm  # (batch, r)
        gu *= scaling
    ga = gu.reshape(-1, gu.shape[-1]).T @ (x if xd is None else xd).reshape(-1, x.shape[-1]) if need_a else None
    gx = None
    if need_x:
        lora_part = gu @ a
        if mask is not None:
            lora_part *= mask
        _threads_for(g.size // g.shape[-1], w.shape[1], w.shape[0])
        gx = g @ w
        gx += lora_part
    _, gw, gb = linear_backward(g, x, w, False, need_w, need_b)
    return gx, gw, gb, ga, gbm


# ------------------------------------------------------------------------------------------- dora


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _row_sumsq(w):  # pragma: no cover - JIT
    """||w_i||^2 per row in one pass, no (out x in) temporary (3x faster than einsum here)."""
    out = np.empty(w.shape[0], dtype=w.dtype)
    for i in range(w.shape[0]):
        s = w.dtype.type(0)
        for j in range(w.shape[1]):
            s += w[i, j] * w[i, j]
        out[i] = s
    return out


def dora_weight_norm(
    w: np.ndarray, a: np.ndarray, bm: np.ndarray, scaling: float,
) -> tuple[np.ndarray, np.ndarray]:
    """n = ||W + s B A|| per output row, without forming the (out x in) matrix; also returns W A^T.

    ||W_o + s B_o A||^2 = ||W_o||^2 + 2 s B_o . (W A^T)_o + s^2 B_o (A A^T) B_o^T: beyond one pass over
    W, only the thin (out x r) W A^T and the (r x r) Gram matrix A A^T are needed. With B = 0 this is
    exactly sqrt(||W_o||^2), which is how the magnitude is initialised, so a new adapter changes nothing.
    """
    wa = w @ a.T
    bg = bm @ (a @ a.T)
    sq = _row_sumsq(w)
    sq += (2.0 * scaling) * np.einsum("ij,ij->i", bm, wa)
    sq += (scaling * scaling) * np.einsum("ij,ij->i", bm, bg)
    np.maximum(sq, np.finfo(sq.dtype).tiny, out=sq)  # a zero row would divide by zero below
    return np.sqrt(sq), wa


def dora_forward(
    x: np.ndarray, w: np.ndarray, b: np.ndarray | None, a: np.ndarray, bm: np.ndarray, mag: np.ndarray,
    scaling: float, xd: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """y = (m / n) * (x W^T + s (xd A^T) B^T) + b with n = ||W + s B A|| per output row.

    Returns y and what the backward needs: z = x W^T + s (xd A^T) B^T, u = s xd A^T, n and W A^T.
    x W^T is the one big matmul, shared with the base layer's own output.
    """
    _threads_for(x.size // x.shape[-1], w.shape[0], w.shape[1])
    z = x @ w.T
    _threads_for(x.size // x.shape[-1], a.shape[0], a.shape[1])
    u = (x if xd is None else xd) @ a.T
    u *= scaling
    z += u @ bm.T
    n, wa = dora_weight_norm(w, a, bm, scaling)
    y = z * (mag / n)
    if b is not None:
        y += b
    return y, z, u, n, wa


def dora_backward(
    g: np.ndarray, x: np.ndarray, w: np.ndarray, a: np.ndarray, bm: np.ndarray, mag: np.ndarray,
    u: np.ndarray, z: np.ndarray, n: np.ndarray, wa: np.ndarray, scaling: float,
    need: tuple[bool, bool, bool, bool, bool, bool], xd: np.ndarray | None = None,
    mask: np.ndarray | None = None, norm_grad: bool = False,
) -> tuple[np.ndarray | None, ...]:
    """Gradients of dora_forward for (x, W, b, A, B, m), each only if ``need`` says so.

    With c = m / n and gz = g * c:  dm = sum_batch(g * z) / n;  dB = gz^T u;  dA = s (gz B)^T xd;
    dx = gz W + s (gz B) A [* mask];  dW = gz^T x;  db = sum g. The norm n is a constant (DoRA paper,
    section 4.3) unless ``norm_grad``: then dL/dV = h V with V = W + s B A and h = -c dm / n, which
    adds s h (W A^T + s B A A^T) to dB and s (hB)^T (W + s B A) to dA, still without an (out x in) product.
    """
    return _dora_grad.dora_backward(
        g, x, w, a, bm, mag, u, z, n, wa, scaling, need, xd, mask, norm_grad,
        lora_backward=lora_backward, coldot=lambda p, q: np.einsum("ij,ij->j", p, q),
    )


# --------------------------------------------------------------------------------------------- relu


def relu_forward(x: np.ndarray) -> np.ndarray:
    """y = max(x, 0)."""
    return np.maximum(x, 0)


def relu_backward(g: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dx = g * [y > 0]."""
    return g * (y > 0)


# ------------------------------------------------------------------------------------ cross-entropy


def cross_entropy_forward(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """loss = mean_i (logsumexp(z_i) - z_i[label_i]) as a 0-d array of logits' dtype (never a Python float:
    on a device that would wait for the GPU every step); also returns softmax(z) for the backward."""
    z = logits - logits.max(axis=1, keepdims=True)  # shift for stability: exp never overflows
    e = np.exp(z)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(z.shape[0])
    loss = np.asarray(np.mean(np.log(s[:, 0]) - z[rows, labels]), dtype=logits.dtype)
    e /= s
    return loss, e


def cross_entropy_backward(g: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """dz = g * (softmax(z) - onehot(label)) / N, g the loss's (0-d) gradient."""
    n = probs.shape[0]
    d = probs * (g / n)  # a fresh array: probs may be saved elsewhere
    d[np.arange(n), labels] -= g / n
    return d


# ------------------------------------------------------------------------------------ misc helpers


def index_add(target: np.ndarray, index: object, values: np.ndarray) -> np.ndarray:
    """target[index] += values, accumulating over repeated indices (the backward of indexing)."""
    np.add.at(target, index, values)
    return target


def dropout_mask(shape: tuple[int, ...], p: float, dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """mask = Bernoulli(1 - p) / (1 - p), so E[x * mask] = x (inverted dropout)."""
    keep = rng.random(shape, dtype=np.float32) >= p
    return keep.astype(dtype) * dtype.type(1.0 / (1.0 - p))


def to_numpy(a: np.ndarray) -> np.ndarray:
    """The array itself: already on the host."""
    return a


# -------------------------------------------------------------------------------------- optimizers


# error_model="numpy": no Python ZeroDivisionError checks inside the loop, which lets LLVM vectorise it.
# Every constant arrives as the array's dtype and np.sqrt keeps it: an int literal (1 - beta1) or math.sqrt
# would promote float32 to float64 inside the loop, which also stops vectorisation (3.4x slower).
@njit(cache=True, nogil=True, error_model="numpy")
def _adam_kernel(p, g, m, v, step_size, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, bc2_sqrt, decay):  # pragma: no cover - JIT
    for i in range(p.size):
        gi = g[i]
        mi = beta1 * m[i] + one_minus_beta1 * gi
        vi = beta2 * v[i] + one_minus_beta2 * gi * gi
        m[i] = mi
        v[i] = vi
        p[i] = p[i] * decay - step_size * mi / (np.sqrt(vi) / bc2_sqrt + eps)


def adam_step(
    p: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
    weight_decay: float = 0.0,
    decoupled: bool = True,
) -> None:
    """In place: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr/bc1 * m / (sqrt(v/bc2) + eps).

    One pass over memory and no allocation. ``decoupled`` weight decay (AdamW) scales p by
    (1 - lr*wd) first; coupled (classic Adam L2) adds wd*p to the gradient, which needs a temporary.
    """
    if not (p.flags.c_contiguous and m.flags.c_contiguous and v.flags.c_contiguous):
        # reshape(-1) of a strided array is a copy: update contiguous copies, then write them back
        pc, mc, vc = np.ascontiguousarray(p), np.ascontiguousarray(m), np.ascontiguousarray(v)
        adam_step(pc, g, mc, vc, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step,
                  weight_decay=weight_decay, decoupled=decoupled)
        p[...], m[...], v[...] = pc, mc, vc
        return
    t = p.dtype.type
    if weight_decay and not decoupled:
        g = g + weight_decay * p
    decay = 1.0 - lr * weight_decay if (weight_decay and decoupled) else 1.0
    _adam_kernel(
        p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1),
        t(lr / (1.0 - beta1**step)), t(beta1), t(beta2), t(1.0 - beta1), t(1.0 - beta2), t(eps),
        t(math.sqrt(1.0 - beta2**step)), t(decay),
    )


@njit(cache=True, nogil=True, error_model="numpy")
def _sgd_kernel(p, g, buf, lr, momentum, weight_decay, first):  # pragma: no cover - JIT
    for i in range(p.size):
        gi = g[i] + weight_decay * p[i]
        if momentum != 0:
            bi = gi if first else momentum * buf[i] + gi
            buf[i] = bi
            gi = bi
        p[i] -= lr * gi


def sgd_step(
    p: np.ndarray,
    g: np.ndarray,
    buf: np.ndarray | None,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    first: bool,
) -> None:
    """In place: g' = g + wd p; buf = mu buf + g' (buf = g' on the first step); p -= lr * buf."""
    if not (p.flags.c_contiguous and (buf is None or buf.flags.c_contiguous)):
        # reshape(-1) of a strided array is a copy: update contiguous copies, then write them back
        pc = np.ascontiguousarray(p)
        bc = None if buf is None else np.ascontiguousarray(buf)
        sgd_step(pc, g, bc, lr=lr, momentum=momentum, weight_decay=weight_decay, first=first)
        p[...] = pc
        if buf is not None:
            buf[...] = bc
        return
    t = p.dtype.type
    b = buf.reshape(-1) if buf is not None else p.reshape(-1)[:0]
    _sgd_kernel(p.reshape(-1), g.reshape(-1), b, t(lr), t(momentum), t(weight_decay), first)


# ------------------------------------------------------------------------------------ quantization


def quantize_4bit(x: np.ndarray, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False):
    """Blockwise 4-bit quantization (kernels.quant's Numba kernels); ``(packed, QuantState)``."""
    from . import quant

    return quant.quantize_4bit(x, quant_type=quant_type, block_size=block_size, double_quant=double_quant)


def dequantize_4bit(
    packed: np.ndarray, state, out: np.ndarray | None = None, validate: bool = True, serial: bool = False,
) -> np.ndarray:
    """x_hat = code[q] * absmax_block (kernels.quant's Numba kernels); ``validate=False`` skips the checks,
    ``serial=True`` stays on the calling thread."""
    from . import quant

    return quant.dequantize_4bit(packed, state, out, validate, serial)


# The gradient all-reduce for data-parallel training (minitorch_peft.distributed).
from .collective import ALLREDUCE_TRANSPORTS, make_allreduce  # noqa: E402,F401
