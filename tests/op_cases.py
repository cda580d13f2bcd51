"""Op cases shared by the backend tests: name -> (function of tensors, float64 input arrays).

Each case is run forward and backward on a backend and compared with the NumPy backend
(``test_backends.py`` for NumPy/CuPy, ``test_array_api_strict.py`` for a strict array-API namespace).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from minitorch_peft import Tensor
from minitorch_peft import functional as F


def r(*shape: int, seed: int = 0, positive: bool = False) -> np.ndarray:
    a = np.random.default_rng(seed + 17 * len(shape)).standard_normal(shape)
    return np.abs(a) + 0.5 if positive else a


LABELS = np.array([0, 2, 1, 2])

OPS: dict[str, tuple[Callable[..., Tensor], list[np.ndarray]]] = {
    "add": (lambda a, b: a + b, [r(2, 3), r(3)]),
    "add_scalar": (lambda a: 1.5 + a + 2, [r(2, 3)]),
    "sub": (lambda a, b: a - b, [r(2, 1, 3), r(4, 3)]),
    "rsub": (lambda a: 1.0 - a, [r(3)]),
    "mul": (lambda a, b: a * b, [r(3), r(2, 3)]),
    "div": (lambda a, b: a / b, [r(2, 3), r(2, 1, positive=True)]),
    "rdiv": (lambda a: 2.0 / a, [r(4, positive=True)]),
    "neg": (lambda a: -a, [r(2, 2)]),
    "pow_scalar": (lambda a: a**3.0, [r(2, 3)]),
    "pow_tensor": (lambda a, b: a**b, [r(2, 3, positive=True), r(3)]),
    "rpow": (lambda a: 2.0**a, [r(3)]),
    "sqrt": (lambda a: a.sqrt(), [r(5, positive=True)]),
    "exp": (lambda a: a.exp(), [r(2, 3)]),
    "log": (lambda a: a.log(), [r(2, 3, positive=True)]),
    "relu": (lambda a: a.relu(), [r(3, 4)]),
    "cast32": (lambda a: a.astype(np.float32).astype(np.float64), [r(3)]),
    "float_double": (lambda a: a.float().double(), [r(2, 2)]),
    "matmul_2d": (lambda a, b: a @ b, [r(2, 3), r(3, 4)]),
    "matmul_vec_mat": (lambda a, b: a @ b, [r(3), r(3, 4)]),
    "matmul_mat_vec": (lambda a, b: a @ b, [r(2, 3), r(3)]),
    "matmul_vec_vec": (lambda a, b: a @ b, [r(3), r(3, seed=1)]),
    "matmul_batched": (lambda a, b: a @ b, [r(2, 2, 3), r(3, 4)]),
    "matmul_broadcast": (lambda a, b: a @ b, [r(2, 3), r(2, 3, 4)]),
    "sum_all": (lambda a: a.sum(), [r(2, 3)]),
    "sum_axis": (lambda a: a.sum(axis=1), [r(2, 3)]),
    "sum_axes_keepdims": (lambda a: a.sum(axis=(0, 2), keepdims=True), [r(2, 3, 4)]),
    "mean_all": (lambda a: a.mean(), [r(2, 3)]),
    "mean_axis": (lambda a: a.mean(axis=-1, keepdims=True), [r(2, 3)]),
    "max_all": (lambda a: a.max(), [r(2, 3)]),
    "max_axis": (lambda a: a.max(axis=1), [r(3, 4)]),
    "max_ties": (lambda a: a.max(axis=0, keepdims=True), [np.array([[1.0, 2.0], [1.0, 0.0]])]),
    "reshape": (lambda a: a.reshape(3, 2), [r(2, 3)]),
    "reshape_tuple": (lambda a: a.reshape((6,)), [r(2, 3)]),
    "transpose": (lambda a: a.T, [r(2, 3)]),
    "transpose_axes": (lambda a: a.transpose(1, 0, 2), [r(2, 3, 4)]),
    "transpose_negative": (lambda a: a.transpose(-1, 0, 1), [r(2, 3, 4)]),
    "getitem_slice": (lambda a: a[1:, ...], [r(3, 2)]),
    "getitem_int": (lambda a: a[0, ...], [r(3, 2)]),
    "log_softmax": (lambda a: a.log_softmax(axis=1), [r(4, 3)]),
    "log_softmax_axis0": (lambda a: F.log_softmax(a, axis=0), [r(4, 3)]),
    "cross_entropy": (lambda a: F.cross_entropy(a, LABELS), [r(4, 3)]),
    "linear": (lambda x, w, b: F.linear(x, w, b), [r(4, 3), r(2, 3), r(2)]),
    "linear_batched": (lambda x, w: F.linear(x, w), [r(2, 4, 3), r(2, 3)]),
    "relu_functional": (lambda a: F.relu(a), [r(5)]),
    "dropout": (lambda a: F.dropout(a, 0.5), [r(4, 5)]),
    "composite": (lambda a, b: ((a @ b).relu() * 2.0 - (a @ b).exp().mean()).sum(axis=0), [r(3, 2), r(2, 4)]),
}
