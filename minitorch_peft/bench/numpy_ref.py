"""The training step written by hand over the array module: no graph, no Tensor, no Function.

This is what the engine's step costs without the engine: the same matmuls, the same fused cross-entropy,
the same Adam update, written directly as array code with preallocated scratch buffers. The ratio
engine / hand-written is the engine's overhead. The hand-written LoRA step is the "BLAS floor" of a LoRA
step: no implementation that does the same arithmetic in NumPy can be much faster.

Adam here is plain array code (a handful of passes over memory per tensor); the engine's Adam is one
fused Numba loop, so on large models the engine can beat this reference in the optimizer. Both are shown
as they are.
"""

from __future__ import annotations

import math
from typing import Any


class _Adam:
    """Adam (no weight decay) as in-place array ops over preallocated buffers."""

    def __init__(self, xp: Any, params: list[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        self.xp, self.params, self.lr, self.eps = xp, params, lr, eps
        self.b1, self.b2 = betas
        self.m = [xp.zeros_like(p) for p in params]
        self.v = [xp.zeros_like(p) for p in params]
        self.tmp = [xp.empty_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[Any]) -> None:
        xp, b1, b2 = self.xp, self.b1, self.b2
        self.t += 1
        step_size = self.lr / (1.0 - b1**self.t)
        inv_bc2_sqrt = 1.0 / math.sqrt(1.0 - b2**self.t)
        for p, g, m, v, tmp in zip(self.params, grads, self.m, self.v, self.tmp):
            m *= b1
            xp.multiply(g, 1.0 - b1, out=tmp)
            m += tmp
            v *= b2
            xp.multiply(g, g, out=tmp)
            tmp *= 1.0 - b2
            v += tmp
            xp.sqrt(v, out=tmp)  # denominator: sqrt(v / bc2) + eps
            tmp *= inv_bc2_sqrt
            tmp += self.eps
            xp.divide(m, tmp, out=tmp)
            tmp *= step_size
            p -= tmp

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.m + self.v)


def _cross_entropy(xp: Any, z: Any, y: Any) -> tuple[Any, Any]:
    """(loss, dz) of mean softmax cross-entropy; z is overwritten."""
    n = z.shape[0]
    z -= z.max(axis=1, keepdims=True)
    e = xp.exp(z)
    s = e.sum(axis=1, keepdims=True)
    rows = xp.arange(n)
    loss = xp.mean(xp.log(s[:, 0]) - z[rows, y])
    e *= 1.0 / n / s
    e[rows, y] -= 1.0 / n
    return loss, e


class HandMLP:
    """An MLP (ReLU between layers) trained by hand-written forward, backward and Adam.

    ``lora=None`` trains every weight and bias (full fine-tuning). ``lora=(As, Bs, scaling)`` freezes the
    weights and biases and trains the adapters A (r x in) and B (out x r) of every layer:
    y = x W^T + b + s (x A^T) B^T.
    """

    def __init__(self, xp: Any, weights: list[Any], biases: list[Any],
                 lora: tuple[list[Any], list[Any], float] | None = None, lr: float = 1e-3) -> None:
        self.xp = xp
        self.w = [xp.array(w, copy=True) for w in weights]
        self.b = [xp.array(b, copy=True) for b in biases]
        if lora is None:
            self.lora = None
            params = [p for pair in zip(self.w, self.b) for p in pair]
        else:
            a, bm, self.scaling = lora
            self.a = [xp.array(x, copy=True) for x in a]
            self.bm = [xp.array(x, copy=True) for x in bm]
            self.lora = True
            params = [p for pair in zip(self.a, self.bm) for p in pair]
        self.opt = _Adam(xp, params, lr=lr)

    def forward(self, x: Any) -> Any:
        """Logits, without recording anything (inference)."""
        xp, last = self.xp, len(self.w) - 1
        h = x
        for i, (w, b) in enumerate(zip(self.w, self.b)):
            z = h @ w.T
            z += b
            if self.lora:
                z += ((h @ self.a[i].T) * self.scaling) @ self.bm[i].T
            h = xp.maximum(z, 0, out=z) if i < last else z
        return h

    def step(self, x: Any, y: Any) -> Any:
        """One training step on (x, y); returns the loss (an array scalar: no device sync)."""
        xp, last = self.xp, len(self.w) - 1
        hs, us = [x], []
        h = x
        for i, (w, b) in enumerate(zip(self.w, self.b)):
            z = h @ w.T
            z += b
            if self.lora:
                u = h @ self.a[i].T
                u *= self.scaling
                us.append(u)
                z += u @ self.bm[i].T
            if i < last:
                xp.maximum(z, 0, out=z)
                hs.append(z)
            h = z
        loss, g = _cross_entropy(xp, h, y)
        grads: list[Any] = []
        for i in range(last, -1, -1):
            hin = hs[i]
            if self.lora:
                gbm = g.T @ us[i]
                gu = g @ self.bm[i]
                gu *= self.scaling
                grads += [gbm, gu.T @ hin]  # reversed below: (A, B) per layer
                if i > 0:
                    gx = g @ self.w[i]
                    gx += gu @ self.a[i]
            else:
                grads += [g.sum(axis=0), g.T @ hin]  # (b, W) reversed below to (W, b)
                if i > 0:
                    gx = g @ self.w[i]
            if i > 0:
                gx *= hin > 0  # ReLU: hin is the layer's input, the previous layer's ReLU output
                g = gx
        grads.reverse()
        self.opt.step(grads)
        return loss

    def grad_nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.opt.params)
