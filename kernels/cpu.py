"""CPU kernels: BLAS (through NumPy) for the matmuls, Numba for the fused element-wise loops.

Every function here takes and returns plain arrays. This module holds only what differs per device: the
gradient math of the fused LoRA / DoRA ops is written once, over the array module, in
``minitorch_peft.peft.fused``. ``kernels.gpu`` mirrors this module name for name; the contract both
keep is the ``Kernels`` protocol in ``kernels/__init__.py``.
"""

from __future__ import annotations

import functools
import gc
import math
import tracemalloc
from typing import Any, Callable

import numpy as np
from numba import njit

from .threads import for_gemm as _threads_for

xp = np
DEVICE = "cpu"  # where this module's arrays live, in PyTorch's device names


# --------------------------------------------------------------------------------------------- linear


#: Out features from which linear_forward computes its product transposed (see there).
WIDE_OUT = 1024


def linear_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
    """y = x @ w.T + b, for x of shape (..., in) and w of shape (out, in); into ``out`` if given (C-contiguous,
    of y's shape), where BLAS writes it directly, with the same bits."""
    _threads_for(x.size // x.shape[-1], w.shape[0], w.shape[1])  # one BLAS thread if the product is small
    x2 = x.reshape(-1, x.shape[-1])
    y = None if out is None else out.reshape(x2.shape[0], w.shape[0])  # a view: out is C-contiguous
    if w.shape[0] >= WIDE_OUT:
        # (w @ x^T)^T, copied to row-major: with the many out features as the product's rows OpenBLAS runs
        # faster than with the batch of 64 there, and gives the same bits (each output is the same dot
        # product in the same order). Measured in steps, same process: medium MLP forward 0.89-0.93x the
        # time, steps 0.96-0.97x, copy included. Below WIDE_OUT the gain was 1-3% (the small MLP), not
        # worth the second (batch x out) array it keeps alive for a moment (+0.09 MiB at a QLoRA step's peak).
        if y is None:
            y = np.ascontiguousarray((w @ x2.T).T)
        else:
            y[...] = (w @ x2.T).T
    else:
        y = np.matmul(x2, w.T, out=y)
    if b is not None:
        y += b  # in place: y is ours, and this saves a (batch, out) temporary
    return y.reshape(x.shape[:-1] + (w.shape[0],)) if out is None else out


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
            _threads_for(g.shape[-1], x.shape[-1], rows)
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if need_w else None
        gb = g2.sum(axis=0) if need_b else None
    else:
        gw = gb = None
    return gx, gw, gb


# ------------------------------------------------------------------------------------- row products


@njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def _row_sumsq(w):  # pragma: no cover - JIT
    out = np.empty(w.shape[0], dtype=w.dtype)
    for i in range(w.shape[0]):
        s = w.dtype.type(0)
        for j in range(w.shape[1]):
            s += w[i, j] * w[i, j]
        out[i] = s
    return out


def row_sumsq(w: np.ndarray) -> np.ndarray:
    """||w_i||^2 per row in one pass, no (out x in) temporary (3x faster than einsum here)."""
    return _row_sumsq(w)


def rowdot(p: np.ndarray, q: np.ndarray, axis: int) -> np.ndarray:
    """sum(p * q, axis) of two 2-D arrays without the (p * q) temporary."""
    return np.einsum("ij,ij->i" if axis == 1 else "ij,ij->j", p, q)


# --------------------------------------------------------------------------------------------- relu


# NumPy's maximum and the bool-mask product take ~1.3 ns a value here (46 and 38 us for a 64 x 512
# activation); one Numba pass takes 9 and 13 us. Same values bit for bit: NaN passes the forward, and the
# backward multiplies by 1 or 0 as the mask does (so -0.0 and NaN come out where NumPy's would).


@njit(cache=True, nogil=True, error_model="numpy")
def _relu(x, out):  # pragma: no cover - JIT
    xf, of = x.reshape(-1), out.reshape(-1)
    zero = x.dtype.type(0)
    for i in range(xf.size):
        v = xf[i]
        of[i] = v if (v > zero or v != v) else zero


@njit(cache=True, nogil=True, error_model="numpy")
def _relu_grad(g, y, out):  # pragma: no cover - JIT
    gf, yf, of = g.reshape(-1), y.reshape(-1), out.reshape(-1)
    one, zero = g.dtype.type(1), g.dtype.type(0)
    for i in range(gf.size):
        of[i] = gf[i] * (one if yf[i] > zero else zero)


def _one_pass(*arrays: np.ndarray) -> bool:
    """Whether the one-pass kernels apply: C-contiguous float arrays of one shape and dtype."""
    a = arrays[0]
    return a.dtype.kind == "f" and all(
        b.flags.c_contiguous and b.shape == a.shape and b.dtype == a.dtype for b in arrays)


def relu_forward(x: np.ndarray) -> np.ndarray:
    """y = max(x, 0)."""
    if not _one_pass(x):
        return np.maximum(x, 0)
    out = np.empty_like(x)
    _relu(x, out)
    return out


def relu_backward(g: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dx = g * [y > 0]."""
    if not _one_pass(g, y):
        return g * (y > 0)
    out = np.empty_like(g)
    _relu_grad(g, y, out)
    return out


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


# ------------------------------------------------------------------------------------ measuring

PEAK_METHOD = "tracemalloc"


def synchronize() -> None:
    """Wait for queued work to finish (nothing is queued on the CPU: every call has returned its result)."""


def peak_bytes(call: Callable[[], Any]) -> int:
    """Peak bytes allocated while ``call`` runs, above what was live before it.

    NumPy reports every array buffer to tracemalloc, so this counts the activations, gradients and
    temporaries of a step (and the Python objects of the graph).
    """
    gc.collect()
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if not was_tracing:
            tracemalloc.stop()
    return max(0, peak - before)


def device_info() -> dict[str, str]:
    """What the benchmark reports about the device beyond the CPU it already describes: nothing."""
    return {}


# -------------------------------------------------------------------------------------- optimizers


# error_model="numpy": no Python ZeroDivisionError checks inside the loop, which lets LLVM vectorise it.
# Every constant arrives as the array's dtype (one small array ``c``: building nine NumPy scalars a call
# cost 4.7 us, more than a bias's whole update) and np.sqrt keeps it: an int literal (1 - beta1) or
# math.sqrt would promote float32 to float64 inside the loop, which also stops vectorisation (3.4x slower).
@njit(cache=True, nogil=True, error_model="numpy")
def _adam_kernel(p, g, m, v, c):  # pragma: no cover - JIT
    step_size, beta1, beta2, one_minus_beta1, one_minus_beta2 = c[0], c[1], c[2], c[3], c[4]
    eps, bc2_sqrt, decay, tiny = c[5], c[6], c[7], c[8]
    zero = tiny - tiny  # 0 of the arrays' dtype
    for i in range(p.size):
        gi = g[i]
        mi = beta1 * m[i] + one_minus_beta1 * gi
        vi = beta2 * v[i] + one_minus_beta2 * gi * gi
        # A moment that decays below the smallest normal float is stored as 0 (see adam_step).
        mi = mi if abs(mi) >= tiny else zero
        vi = vi if vi >= tiny else zero
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

    A moment below the dtype's smallest normal number (about 1.2e-38 in float32) is stored as 0. Where a
    weight's gradient is often exactly 0 (an MNIST pixel that is almost always blank), m decays by b1 a
    step and goes subnormal within a few hundred steps; arithmetic on subnormals takes a slow microcode
    path on x86 CPUs, and measured on the full fine-tuning epoch's state it made this kernel 3.6x slower.
    The weight does not notice: an update of lr * 1e-38 / eps is far below half an ulp of any weight
    above about 1e-26 (a trained MLP's weights are the same bits either way; ``tests/test_backends.py``).

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
    if weight_decay and not decoupled:
        g = g + weight_decay * p
    decay = 1.0 - lr * weight_decay if (weight_decay and decoupled) else 1.0
    c = np.array([lr / (1.0 - beta1**step), beta1, beta2, 1.0 - beta1, 1.0 - beta2, eps,
                  math.sqrt(1.0 - beta2**step), decay, _tiny(p.dtype)], dtype=p.dtype)
    _adam_kernel(p.reshape(-1), g.reshape(-1), m.reshape(-1), v.reshape(-1), c)


@functools.lru_cache(maxsize=None)
def _tiny(dtype: np.dtype) -> float:
    """The smallest normal number of ``dtype``, exactly (a Python float holds a float32's or float64's)."""
    return float(np.finfo(dtype).tiny)


@njit(cache=True, nogil=True, error_model="numpy")
def _sgd_kernel(p, g, buf, c, first):  # pragma: no cover - JIT
    lr, momentum, weight_decay, tiny = c[0], c[1], c[2], c[3]  # one small array, as _adam_kernel's
    zero = tiny - tiny
    for i in range(p.size):
        gi = g[i] + weight_decay * p[i]
        if momentum != 0:
            bi = gi if first else momentum * buf[i] + gi
            bi = bi if abs(bi) >= tiny else zero  # a decayed buffer is stored as 0, as Adam's moments
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
    """In place: g' = g + wd p; buf = mu buf + g' (buf = g' on the first step); p -= lr * buf.

    A momentum buffer below the smallest normal number is stored as 0, for the reason ``adam_step`` gives.
    """
    if not (p.flags.c_contiguous and (buf is None or buf.flags.c_contiguous)):
        # reshape(-1) of a strided array is a copy: update contiguous copies, then write them back
        pc = np.ascontiguousarray(p)
        bc = None if buf is None else np.ascontiguousarray(buf)
        sgd_step(pc, g, bc, lr=lr, momentum=momentum, weight_decay=weight_decay, first=first)
        p[...] = pc
        if buf is not None:
            buf[...] = bc
        return
    b = buf.reshape(-1) if buf is not None else p.reshape(-1)[:0]
    c = np.array([lr, momentum, weight_decay, _tiny(p.dtype)], dtype=p.dtype)
    _sgd_kernel(p.reshape(-1), g.reshape(-1), b, c, first)


# ------------------------------------------------------------------------------------ quantization


def quantize_4bit(x: np.ndarray, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False):
    """Blockwise 4-bit quantization (kernels.quant's Numba kernels); ``(packed, QuantState)``."""
    from . import quant

    return quant.quantize_4bit(x, quant_type=quant_type, block_size=block_size, double_quant=double_quant)


def dequantize_4bit(
    packed: np.ndarray, state, out: np.ndarray | None = None, validate: bool = True, serial: bool = False,
    rows: tuple[int, int] | None = None,
) -> np.ndarray:
    """x_hat = code[q] * absmax_block (kernels.quant's Numba kernels); ``validate=False`` skips the checks,
    ``serial=True`` stays on the calling thread, ``rows=(r0, r1)`` gives only those rows."""
    from . import quant

    return quant.dequantize_4bit(packed, state, out, validate, serial, rows)


def dequantize_absmax(state):
    """The per-block absmax of a QuantState as float32 (decoding the double-quantized codes if any)."""
    from . import quant

    return quant.dequantize_absmax(state)


# The gradient all-reduce for data-parallel training (minitorch_peft.distributed).
from .collective import ALLREDUCE_TRANSPORTS, make_allreduce  # noqa: E402,F401
