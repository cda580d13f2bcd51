"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), as hooks that LoRALinear calls.

W' = m * (W0 + s B A) / ||W0 + s B A||_row: a trainable magnitude ``m`` (one per output row, started at
the row norms of W0) times a unit direction that LoRA adapts. The forward never forms W':

    y = (m / n) * (x W0^T + s (x_d A^T) B^T) + b,    n = ||W0 + s B A||_row,

so the big matmul is the base layer's own x W0^T, and n comes from thin (out x r) products (see
``kernels.cpu.dora_weight_norm``). As in the paper (section 4.3) and Hugging Face PEFT, n is treated as
a constant in backward by default; ``LoraConfig(dora_norm_grad=True)`` lets the gradient flow through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..function import Context, Function
from ..tensor import Tensor
from .config import AdapterError

if TYPE_CHECKING:
    from .lora import LoRALinear


class DoRAFunction(Function):
    """y = (m / ||W + s B A||_row) * (x W^T + s (x A^T) B^T) + b;  dx, dA, dB, dm (dW, db if unfrozen) in one backward."""

    @staticmethod
    def forward(
        ctx: Context, x: Any, w: Any, a: Any, bm: Any, mag: Any, b: Any = None, *,
        scaling: float, mask: Any = None, norm_grad: bool = False,
    ) -> Any:
        xd = None if mask is None else x * mask
        y, z, u, n, wa = ctx.backend.kernels.dora_forward(x, w, b, a, bm, mag, scaling, xd)
        ctx.save_for_backward(x, w, a, bm, mag, u, z, n, wa, xd, mask)
        ctx.scaling, ctx.norm_grad = scaling, norm_grad
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, ...]:
        x, w, a, bm, mag, u, z, n, wa, xd, mask = ctx.saved
        need = ctx.needs_input_grad
        need_b = len(need) > 5 and need[5]
        gx, gw, gb, ga, gbm, gm = ctx.backend.kernels.dora_backward(
            g, x, w, a, bm, mag, u, z, n, wa, ctx.scaling,
            (need[0], need[1], need_b, need[2], need[3], need[4]), xd, mask, ctx.norm_grad,
        )
        return (gx, gw, ga, gbm, gm) + ((gb,) if len(need) > 5 else ())


def weight_norm(layer: "LoRALinear", name: str, weight: Any = None) -> Any:
    """||W0 + s B A|| per output row for adapter ``name`` (an array of shape (out,), no graph)."""
    w = layer.base_weight() if weight is None else weight
    n, _ = layer.weight.backend.kernels.dora_weight_norm(
        w, layer.lora_A[name].data, layer.lora_B[name].data, layer.scaling(name)
    )
    return n


def init_magnitude(layer: "LoRALinear") -> Any:
    """m = ||W0 + s B A||_row of the adapter being added (B = 0, so ||W0||_row): the output starts unchanged.

    Computed by the same kernel as the forward's norm, so m / n is exactly 1 at initialisation.
    """
    name = next(reversed(layer.configs))  # add_adapter registers the config just before calling this
    return weight_norm(layer, name)  # a fresh array from the kernel: nothing else holds it


def dora_forward(layer: "LoRALinear", x: Tensor, name: str, mask: Any) -> Tensor:
    """The layer's output with DoRA adapter ``name`` active (``mask``: the dropout mask on x, or None)."""
    inputs: tuple[Tensor, ...] = (
        x, layer.base_weight_tensor(), layer.lora_A[name], layer.lora_B[name], layer.lora_magnitude_vector[name],
    )
    if layer.bias is not None:
        inputs += (layer.bias,)
    config = layer.configs[name]
    return DoRAFunction.apply(*inputs, scaling=config.scaling, mask=mask, norm_grad=config.dora_norm_grad)


def dora_merged_weight(layer: "LoRALinear", name: str) -> Any:
    """W' = (m / n)[:, None] * (W0 + s B A): the plain weight that gives this adapter's output.

    The row scale m / n is kept on the layer, so that ``dora_unmerged_weight`` can undo the merge
    exactly (n depends on W0, which is gone once W' overwrites it). Rows scaled by zero lose W0, so
    then W0 itself is kept.
    """
    if layer.merged:
        raise AdapterError("the layer is merged: unmerge() before computing a DoRA merged weight")
    w0 = layer.base_weight()
    xp = layer.weight.backend.xp
    scale = layer.lora_magnitude_vector[name].data / weight_norm(layer, name, w0)
    lossy = not bool(xp.all(scale != 0))
    layer.dora_merge_state[name] = (scale, xp.array(w0, copy=True) if lossy else None)
    return scale[:, None] * (w0 + layer.delta_weight(name))


def dora_unmerged_weight(layer: "LoRALinear", name: str) -> Any:
    """W0 = W' / (m / n)[:, None] - s B A, with the row scale saved when the adapter was merged."""
    state = layer.dora_merge_state.pop(name, None)
    if state is None:
        raise AdapterError(f"adapter {name!r} was not merged by this layer; cannot unmerge it")
    scale, w0 = state
    if w0 is not None:
        return w0
    return layer.weight.data / scale[:, None] - layer.delta_weight(name)
