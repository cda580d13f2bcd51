"""Stateless functions over tensors (PyTorch's ``torch.nn.functional``)."""

from __future__ import annotations

from typing import Any

from . import ops
from .random import generator
from .tensor import Tensor


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x @ weight^T + bias."""
    return ops.Linear.apply(x, weight) if bias is None else ops.Linear.apply(x, weight, bias)


def relu(x: Tensor) -> Tensor:
    """y = max(x, 0)."""
    return ops.ReLU.apply(x)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """y = x - logsumexp(x, axis)."""
    return ops.LogSoftmax.apply(x, axis=axis)


def cross_entropy(logits: Tensor, labels: Any) -> Tensor:
    """Mean over the batch of -log softmax(logits)[label]; labels are integer class indices."""
    if not isinstance(labels, Tensor):
        labels = Tensor._make(logits.backend.asarray(labels), logits.backend, False)
    return ops.CrossEntropy.apply(logits, labels)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: zero each element with probability p and scale the rest by 1/(1-p)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return x
    mask = x.backend.kernels.dropout_mask(x.shape, p, x.dtype, generator())
    return ops.Dropout.apply(x, Tensor._make(mask, x.backend, False))
