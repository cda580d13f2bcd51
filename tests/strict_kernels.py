"""Kernels over ``array_api_strict`` arrays, for running the engine on a strict array-API namespace.

Not fast and not for use outside the tests: the point is that the engine around them (ops, tensor,
functional, nn, optim, peft) must work on arrays that have only the array-API standard's functions
and methods. The two kernels the standard has no function for (scatter-add and host random numbers)
go through NumPy, as a device backend's kernels would go through their own library.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_strict as xp
import numpy as np


DEVICE = "cpu"
PEAK_METHOD = "none (strict array-API test kernels)"
ALLREDUCE_TRANSPORTS: tuple[str, ...] = ()


def make_allreduce(transport: str, comm: Any, buffer: Any) -> Any:
    raise ValueError("no all-reduce over strict array-API arrays")


def synchronize() -> None:
    pass


def peak_bytes(call: Any) -> int:
    call()
    return 0


def device_info() -> dict[str, str]:
    return {}


def quantize_4bit(x: Any, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False) -> Any:
    raise NotImplementedError("no 4-bit kernels over strict array-API arrays")


def dequantize_4bit(packed: Any, state: Any, out: Any = None, validate: bool = True, serial: bool = False,
                    rows: Any = None) -> Any:
    raise NotImplementedError("no 4-bit kernels over strict array-API arrays")


def dequantize_absmax(state: Any) -> Any:
    raise NotImplementedError("no 4-bit kernels over strict array-API arrays")


def _mT(a: Any) -> Any:
    return xp.matrix_transpose(a)


def _flat(a: Any) -> Any:
    return xp.reshape(a, (-1, a.shape[-1]))


def linear_forward(x: Any, w: Any, b: Any | None, out: Any = None) -> Any:
    y = xp.matmul(x, _mT(w))
    y = y if b is None else y + b
    if out is None:
        return y
    out[...] = y
    return out


def linear_backward(g: Any, x: Any, w: Any, need_x: bool, need_w: bool, need_b: bool) -> tuple[Any, Any, Any]:
    gx = xp.matmul(g, w) if need_x else None
    gw = xp.matmul(_mT(_flat(g)), _flat(x)) if need_w else None
    gb = xp.sum(_flat(g), axis=0) if need_b else None
    return gx, gw, gb


def row_sumsq(w: Any) -> Any:
    return xp.sum(w * w, axis=1)


def rowdot(p: Any, q: Any, axis: int) -> Any:
    return xp.sum(p * q, axis=axis)


def relu_forward(x: Any) -> Any:
    return xp.where(x > 0, x, xp.zeros_like(x))


def relu_backward(g: Any, y: Any) -> Any:
    return xp.where(y > 0, g, xp.zeros_like(g))


def cross_entropy_forward(logits: Any, labels: Any) -> tuple[Any, Any]:
    z = logits - xp.max(logits, axis=1, keepdims=True)
    e = xp.exp(z)
    s = xp.sum(e, axis=1, keepdims=True)
    picked = xp.take_along_axis(z, xp.expand_dims(xp.astype(labels, xp.int64), axis=1), axis=1)
    loss = xp.mean(xp.log(s[:, 0]) - picked[:, 0])
    return loss, e / s


def cross_entropy_backward(g: Any, probs: Any, labels: Any) -> Any:
    n, c = probs.shape
    onehot = xp.astype(xp.expand_dims(xp.astype(labels, xp.int64), axis=1) == xp.arange(c), probs.dtype)
    return (probs - onehot) * (g / n)


def index_add(target: Any, index: object, values: Any) -> Any:
    host = np.asarray(target).copy()
    np.add.at(host, index, np.asarray(values))
    return xp.asarray(host)


def dropout_mask(shape: tuple[int, ...], p: float, dtype: Any, rng: np.random.Generator) -> Any:
    keep = xp.asarray(rng.random(shape, dtype=np.float32) >= p)
    return xp.astype(keep, dtype) * (1.0 / (1.0 - p))


def to_numpy(a: Any) -> np.ndarray:
    return np.asarray(a)


def adam_step(
    p: Any, g: Any, m: Any, v: Any, *, lr: float, beta1: float, beta2: float, eps: float, step: int,
    weight_decay: float = 0.0, decoupled: bool = True,
) -> None:
    if weight_decay and not decoupled:
        g = g + weight_decay * p
    tiny = xp.finfo(p.dtype).smallest_normal  # moments below it are stored as 0, as kernels/cpu.py does
    mi = beta1 * m + (1 - beta1) * g
    vi = beta2 * v + (1 - beta2) * g * g
    m[...] = xp.where(xp.abs(mi) >= tiny, mi, xp.zeros_like(mi))
    v[...] = xp.where(vi >= tiny, vi, xp.zeros_like(vi))
    decay = 1.0 - lr * weight_decay if (weight_decay and decoupled) else 1.0
    step_size = lr / (1.0 - beta1**step)
    p[...] = p * decay - step_size * m / (xp.sqrt(v) / math.sqrt(1.0 - beta2**step) + eps)


def sgd_step(p: Any, g: Any, buf: Any | None, *, lr: float, momentum: float, weight_decay: float, first: bool) -> None:
    g = g + weight_decay * p
    if buf is not None and momentum:
        b = g if first else momentum * buf + g
        buf[...] = xp.where(xp.abs(b) >= xp.finfo(p.dtype).smallest_normal, b, xp.zeros_like(b))
        g = buf
    p[...] = p - lr * g
