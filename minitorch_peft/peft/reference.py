"""The specification of the fused ops, written with plain engine ops.

``LoRAFunction`` and ``DoRAFunction`` each compute a LoRA / DoRA layer in one graph node with a backward
written by hand (fewer temporaries, no ``out x in`` update ever formed). The two functions below compute
the same thing the slow, obvious way: a chain of matmuls, transposes, products and sums, each recorded in
the graph, so autograd derives every gradient by itself. They are the definition the fused ops are held to
(``tests/test_reference.py``: outputs and every gradient, float64, with and without dropout and bias), and
the version to read first. They are slower and keep more activations; never train with them.

Shapes: x (..., in), W (out, in), A (r, in), B (out, r), b (out,), m (out,), mask like x.
"""

from __future__ import annotations

from typing import Any

from ..tensor import Tensor

__all__ = ["lora_reference", "dora_reference"]


def _dropped(x: Tensor, mask: Any) -> Tensor:
    """x * mask (the dropout the adapter path sees), or x itself without a mask."""
    return x if mask is None else x * mask


def lora_reference(
    x: Tensor, W: Tensor, A: Tensor, B: Tensor, b: Tensor | None, scaling: float, mask: Any = None,
) -> Tensor:
    """y = x W^T + b + s ((x * mask) A^T) B^T.

    The base path sees x itself; only the adapter path sees dropout. The update s B A is never formed:
    (x A^T) is (..., r), r numbers per sample, then B lifts it back to ``out``.
    """
    y = x @ W.T
    y = y + ((_dropped(x, mask) @ A.T) @ B.T) * scaling
    return y if b is None else y + b


def dora_reference(
    x: Tensor, W: Tensor, A: Tensor, B: Tensor, m: Tensor, b: Tensor | None, scaling: float,
    mask: Any = None, norm_grad: bool = False,
) -> Tensor:
    """y = (m / n) * (x W^T + s ((x * mask) A^T) B^T) + b,  n = ||W + s B A|| per output row.

    This is m * V / ||V||_row applied to x with V = W + s B A (magnitude times unit direction), written
    so that the base matmul is the base layer's own. ``n`` is detached from the graph (a constant in
    backward, as in the DoRA paper section 4.3 and Hugging Face PEFT) unless ``norm_grad``; the forward
    value is the same either way. Here V is formed (out x in) to take its norm: the fused op gets the
    same n from thin products instead.
    """
    V = W + (B @ A) * scaling
    n = (V * V).sum(axis=1).sqrt()
    if not norm_grad:
        n = n.detach()
    z = x @ W.T + ((_dropped(x, mask) @ A.T) @ B.T) * scaling
    y = (m / n) * z
    return y if b is None else y + b
