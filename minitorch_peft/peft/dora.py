"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024), as an adapter update object.

W' = m * (W0 + s B A) / ||W0 + s B A||_row: a trainable magnitude ``m`` (one per output row, started at
the row norms of W0) times a unit direction that LoRA adapts. The forward never forms W':

    y = (m / n) * (x W0^T + s (x_d A^T) B^T) + b,    n = ||W0 + s B A||_row,

so the big matmul is the base layer's own x W0^T, and n comes from thin (out x r) products (see
``peft.fused.DoRAFunction``, which owns the forward and backward). As in the paper (section 4.3) and
Hugging Face PEFT, n is treated as a constant in backward by default; ``LoraConfig(dora_norm_grad=True)``
lets the gradient flow through it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..nn.module import Parameter
from ..tensor import Tensor
from .config import AdapterError
from .fused import DoRAFunction, dora_weight_norm
from .update import LoRAUpdate

if TYPE_CHECKING:
    from .lora import LoRALinear


class DoRAUpdate(LoRAUpdate):
    """LoRA's A and B plus a magnitude m (out,): W' = (m / ||W0 + s B A||_row) (W0 + s B A)."""

    label = ", dora"

    def init(self, layer: "LoRALinear") -> None:
        """A and B as LoRA's; m = ||W0 + s B A||_row = ||W0||_row (B = 0), computed by the same code as the
        forward's norm, so m / n is exactly 1 and a new adapter changes nothing."""
        super().init(layer)
        layer.lora_magnitude_vector[self.name] = Parameter(self.weight_norm(layer, layer.base_weight()))

    def parameters(self, layer: "LoRALinear") -> list[Parameter]:
        return super().parameters(layer) + [layer.lora_magnitude_vector[self.name]]

    def shapes(self, n_in: int, n_out: int) -> dict[str, tuple[int, ...]]:
        return {**super().shapes(n_in, n_out), "lora_magnitude_vector": (n_out,)}

    def remove(self, layer: "LoRALinear") -> None:
        super().remove(layer)
        del layer.lora_magnitude_vector[self.name]
        layer.dora_merge_state.pop(self.name, None)

    def weight_norm(self, layer: "LoRALinear", w0: Any) -> Any:
        """||W0 + s B A|| per output row (an array of shape (out,), no graph)."""
        n, _ = dora_weight_norm(layer.weight.backend, w0, layer.lora_A[self.name].data,
                                layer.lora_B[self.name].data, self.config.scaling)
        return n

    def forward(self, layer: "LoRALinear", x: Tensor, w: Tensor, mask: Any) -> Tensor:
        return DoRAFunction.apply(x, w, layer.lora_A[self.name], layer.lora_B[self.name],
                                  layer.lora_magnitude_vector[self.name], layer.bias,
                                  scaling=self.config.scaling, mask=mask, norm_grad=self.config.dora_norm_grad)

    def merged_weight(self, layer: "LoRALinear", w0: Any, record: bool = True) -> Any:
        """W' = (m / n)[:, None] * (W0 + s B A): the plain weight that gives this adapter's output.

        With ``record``, the row scale m / n is kept on the layer, so that ``unmerge`` can undo the merge
        exactly (n depends on W0, which is gone once W' overwrites it). Rows scaled by zero lose W0, so
        then W0 itself is kept.
        """
        xp = layer.weight.backend.xp
        scale = layer.lora_magnitude_vector[self.name].data / self.weight_norm(layer, w0)
        if record:
            lossy = not bool(xp.all(scale != 0))
            layer.dora_merge_state[self.name] = (scale, xp.array(w0, copy=True) if lossy else None)
        return scale[:, None] * (w0 + self.delta(layer))

    def weight_change(self, layer: "LoRALinear", w0: Any) -> Any:
        return self.merged_weight(layer, w0, record=False) - w0

    def unmerge(self, layer: "LoRALinear", w: Any) -> None:
        """W0 = W' / (m / n)[:, None] - s B A, with the row scale saved when the adapter was merged."""
        state = layer.dora_merge_state.pop(self.name, None)
        if state is None:
            raise AdapterError(f"adapter {self.name!r} was not merged by this layer; cannot unmerge it")
        scale, w0 = state
        w[...] = w0 if w0 is not None else w / scale[:, None] - self.delta(layer)
