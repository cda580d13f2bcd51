"""SGD with optional momentum and L2 weight decay, one fused in-place kernel per tensor."""

from __future__ import annotations

from typing import Any, Iterable

from ..tensor import Tensor
from .optimizer import Optimizer


class SGD(Optimizer):
    """g' = g + wd p;  buf = mu buf + g' (buf = g' at first);  p -= lr * buf  (PyTorch's convention)."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD needs momentum >= 0 and weight_decay >= 0, got {momentum}, {weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def step(self) -> None:
        for group, p in self.trainable():
            state = self.state.get(id(p))
            first = state is None
            if first:
                buf = p.backend.xp.zeros_like(p.data) if group["momentum"] else None
                state = self.state[id(p)] = {"momentum_buffer": buf} if buf is not None else {}
            p.backend.kernels.sgd_step(
                p.data, p.grad, state.get("momentum_buffer"),
                lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"], first=first,
            )
