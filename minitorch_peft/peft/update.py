"""Adapter updates as objects: what one named adapter adds to a layer, and how it folds into W.

An update owns its adapter's whole life in a layer: ``init`` (its parameters, made so the output starts
unchanged), ``forward`` (the fused op it runs), ``merged_weight`` / ``unmerge`` (folding into W and back)
and ``remove``. ``LoRALinear`` only keeps the bookkeeping (which adapter is active, merged, trainable) and
asks the active adapter's update for everything else, so a new variant (PiSSA init, VeRA, ...) is one new
class, not a flag tested across files. Its parameters stay in the layer's ``lora_A`` / ``lora_B`` /
``lora_magnitude_vector`` dicts, under Hugging Face PEFT's names, so state dicts keep their keys.

``LoRAUpdate`` is here; ``DoRAUpdate`` (in ``peft.dora``) extends it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..nn.layers import kaiming_uniform
from ..nn.module import Parameter
from ..random import generator
from ..tensor import Tensor
from .config import LoraConfig
from .fused import LoRAFunction

if TYPE_CHECKING:
    from .lora import LoRALinear


class LoRAUpdate:
    """LoRA (Hu et al., 2021): W' = W + s B A, with A (r x in), B (out x r) and s = alpha / r (or alpha / sqrt r).

    A starts Kaiming-uniform (or normal with standard deviation 1/r, PEFT's "gaussian"), B at zero, so a new
    adapter changes nothing.
    """

    label = ""  # what the layer's repr adds after r and alpha

    def __init__(self, name: str, config: LoraConfig) -> None:
        self.name, self.config = name, config

    def init(self, layer: "LoRALinear") -> None:
        """Create this adapter's parameters in ``layer``."""
        config, be, dtype = self.config, layer.weight.backend, layer.weight.dtype
        # drawn in float64 on the host and rounded once, by the backend, to the weight's dtype (which may
        # be a device library's dtype object that NumPy cannot read)
        if config.init_lora_weights == "gaussian":
            a = generator().normal(0.0, 1.0 / config.r, size=(config.r, layer.in_features))
        else:
            a = kaiming_uniform((config.r, layer.in_features), layer.in_features, a=math.sqrt(5), dtype=float)
        layer.lora_A[self.name] = Parameter(be.asarray(a, dtype=dtype))
        layer.lora_B[self.name] = Parameter(be.xp.zeros((layer.out_features, config.r), dtype=dtype))

    def parameters(self, layer: "LoRALinear") -> list[Parameter]:
        return [layer.lora_A[self.name], layer.lora_B[self.name]]

    def shapes(self, n_in: int, n_out: int) -> dict[str, tuple[int, ...]]:
        """The shape of each of this adapter's parameters in an (n_in -> n_out) layer, by state-dict kind."""
        return {"lora_A": (self.config.r, n_in), "lora_B": (n_out, self.config.r)}

    def remove(self, layer: "LoRALinear") -> None:
        """Drop this adapter's parameters (and any merge state) from ``layer``."""
        del layer.lora_A[self.name], layer.lora_B[self.name]

    def forward(self, layer: "LoRALinear", x: Tensor, w: Tensor, mask: Any) -> Tensor:
        """The layer's output with this adapter: y = x W^T + b + s (x_d A^T) B^T (one fused op)."""
        return LoRAFunction.apply(x, w, layer.lora_A[self.name], layer.lora_B[self.name], layer.bias,
                                  scaling=self.config.scaling, mask=mask)

    def delta(self, layer: "LoRALinear") -> Any:
        """s B A: the (out x in) update this adapter adds to W."""
        return (layer.lora_B[self.name].data * self.config.scaling) @ layer.lora_A[self.name].data

    def merged_weight(self, layer: "LoRALinear", w0: Any, record: bool = True) -> Any:
        """The plain weight that gives, without an adapter, exactly this adapter's output: W0 + s B A.
        (``record``: keep what ``unmerge`` will need; LoRA needs nothing.)"""
        return w0 + self.delta(layer)

    def weight_change(self, layer: "LoRALinear", w0: Any) -> Any:
        """merged_weight - W0: what this adapter does to the weight, as an (out x in) array."""
        return self.delta(layer)

    def unmerge(self, layer: "LoRALinear", w: Any) -> None:
        """Turn the merged weight ``w`` (in place) back into W0: w -= s B A (exact up to float rounding)."""
        w -= self.delta(layer)
