"""Adam / AdamW: the update runs in one fused kernel per tensor, in place, allocating nothing."""

from __future__ import annotations

from typing import Any, Iterable

from ..tensor import Tensor
from .optimizer import Optimizer


class Adam(Optimizer):
    """m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr * m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps).

    ``weight_decay`` is decoupled (AdamW: p *= 1 - lr*wd) when ``decoupled=True``, else added to g (L2).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Adam betas must be in [0, 1), got {betas}")
        if eps <= 0 or weight_decay < 0:
            raise ValueError(f"Adam needs eps > 0 and weight_decay >= 0, got eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=decoupled))

    def step(self) -> None:
        for group, p in self.trainable():
            state = self.state.get(id(p))
            if state is None:
                xp = p.backend.xp
                state = self.state[id(p)] = {"step": 0, "m": xp.zeros_like(p.data), "v": xp.zeros_like(p.data)}
            state["step"] += 1
            beta1, beta2 = group["betas"]
            p.backend.kernels.adam_step(
                p.data, p.grad, state["m"], state["v"],
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], step=state["step"],
                weight_decay=group["weight_decay"], decoupled=group["decoupled"],
            )


class AdamW(Adam):
    """Adam with decoupled weight decay (default 0.01), as in PyTorch."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decoupled=True)
