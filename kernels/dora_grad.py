"""DoRA's backward, written once over any array module: both backends call it with their own kernels."""

from __future__ import annotations

from typing import Any, Callable


def dora_backward(
    g: Any, x: Any, w: Any, a: Any, bm: Any, mag: Any, u: Any, z: Any, n: Any, wa: Any, scaling: float,
    need: tuple[bool, bool, bool, bool, bool, bool], xd: Any | None, mask: Any | None, norm_grad: bool,
    *, lora_backward: Callable[..., tuple[Any, ...]], coldot: Callable[[Any, Any], Any],
) -> tuple[Any | None, ...]:
    """Gradients of dora_forward for (x, W, b, A, B, m); see kernels.cpu.dora_backward for the math.

    With c = m / n, DoRA's output is c * (the LoRA output without bias), so everything but dm and db is
    the LoRA backward of gz = g * c. ``coldot(p, q)`` is sum over the batch of p * q, per column.
    """
    need_x, need_w, need_b, need_a, need_bm, need_m = need
    out = g.shape[-1]
    g2 = g.reshape(-1, out)
    c = mag / n
    gm = coldot(g2, z.reshape(-1, out)) / n if (need_m or norm_grad) else None
    gx, gw, _, ga, gbm = lora_backward(g * c, x, w, a, bm, u, scaling, (need_x, need_w, False, need_a, need_bm), xd, mask)
    gb = g2.sum(axis=0) if need_b else None
    if norm_grad and (need_a or need_bm or need_w):
        h = -c * gm / n
        hb = bm * h[:, None]
        if need_bm:
            gbm += scaling * (h[:, None] * wa + scaling * (hb @ (a @ a.T)))
        if need_a:
            ga += scaling * (hb.T @ w + scaling * ((hb.T @ bm) @ a))
        if need_w:
            gw += h[:, None] * (w + scaling * (bm @ a))
    return gx, gw, gb, ga, gbm, (gm if need_m else None)
