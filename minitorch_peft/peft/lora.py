"""LoRALinear: a drop-in for Linear with a frozen base and named low-rank adapters.

y = x @ W^T + b + s * dropout(x) @ A^T @ B^T, with A (r x in), B (out x r) and s = alpha / r.
Several adapters can live in one layer (``lora_A["name"]``); one is active at a time. What an adapter
does (LoRA, DoRA) is its update object's business (``peft.update``, ``peft.dora``); the math of the ops
is in ``peft.fused``; this module keeps the bookkeeping: which adapter is active, merged, trainable.
"""

from __future__ import annotations

from typing import Any

from ..backend import Backend
from ..nn.layers import Linear
from ..nn.containers import ParameterDict
from ..nn.module import Module, Parameter
from ..random import generator
from ..tensor import Tensor
from .config import AdapterError, LoraConfig
from .dora import DoRAUpdate
from .fused import BaseLinearFunction, LoRAFunction
from .update import LoRAUpdate

__all__ = ["LoRALinear", "LoRAFunction", "make_update"]


def make_update(name: str, config: LoraConfig) -> LoRAUpdate:
    """The update object for adapter ``name``: the one place where ``config.use_dora`` picks the class."""
    return (DoRAUpdate if config.use_dora else LoRAUpdate)(name, config)


def layer_config(r: int, alpha: float, dropout: float, use_rslora: bool, init: str, use_dora: bool = False) -> LoraConfig:
    """The LoraConfig a layer's short keywords stand for (``alpha``, ``dropout`` and ``init`` are PEFT's
    ``lora_alpha``, ``lora_dropout`` and ``init_lora_weights``)."""
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora, use_dora=use_dora,
                      init_lora_weights=init)


class LoRALinear(Module):
    """A Linear whose ``weight``/``bias`` are frozen and whose output gains the active adapter's update."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        adapter_name: str = "default",
        dtype: Any = None,
        backend: str | Backend = "numpy",
    ) -> None:
        base = Linear(in_features, out_features, bias=bias, dtype=dtype, backend=backend)
        self._init_from(base)
        self.add_adapter(adapter_name, layer_config(r, alpha, dropout, use_rslora, init))

    @classmethod
    def from_linear(
        cls,
        linear: Linear,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        adapter_name: str = "default",
        config: LoraConfig | None = None,
    ) -> "LoRALinear":
        """Wrap an existing Linear (its arrays are shared, not copied, and become frozen)."""
        layer = cls.__new__(cls)
        layer._init_from(linear)
        if config is None:
            config = layer_config(r, alpha, dropout, use_rslora, init)
        layer.add_adapter(adapter_name, config)
        return layer

    def _init_from(self, linear: Linear) -> None:
        self._init_layer(linear)
        self.weight = linear.weight
        self.weight.requires_grad = False

    def _init_layer(self, linear: Linear) -> None:
        """Everything but the base weight's storage: sizes, the (frozen) bias, the adapter bookkeeping."""
        Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad = False
        self.lora_A = ParameterDict()
        self.lora_B = ParameterDict()
        self.lora_magnitude_vector = ParameterDict()  # DoRA's m, one entry per DoRA adapter
        self.configs: dict[str, LoraConfig] = {}
        self.updates: dict[str, LoRAUpdate] = {}  # one update object per adapter, made from its config
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.dora_merge_state: dict[str, Any] = {}  # DoRA: what unmerge needs (n depends on the W0 that merge overwrites)
        self.adapters_disabled = False

    # ------------------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        """Create adapter ``name`` (its update object makes its parameters so the output is unchanged)."""
        if name in self.configs:
            raise AdapterError(f"adapter {name!r} already exists in this layer")
        config.check_fits(name, self.in_features, self.out_features)
        update = make_update(name, config)
        update.init(self)
        self.configs[name], self.updates[name] = config, update
        if self.active_adapter is None:
            self.set_adapter(name)
        else:
            self._set_trainable(name, False)

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the adapter used in forward and the only one that trains."""
        if name not in self.configs:
            raise AdapterError(f"unknown adapter {name!r}; this layer has: {', '.join(self.configs) or 'none'}")
        if self.merged_adapters:
            raise AdapterError("unmerge() before switching adapters")
        for other in self.configs:
            self._set_trainable(other, other == name)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name not in self.configs:
            raise AdapterError(f"unknown adapter {name!r}; this layer has: {', '.join(self.configs) or 'none'}")
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged; unmerge() before deleting it")
        self.updates.pop(name).remove(self)
        del self.configs[name]
        if self.active_adapter == name:
            self.active_adapter = None
            if self.configs:
                self.set_adapter(next(iter(self.configs)))

    def _set_trainable(self, name: str, flag: bool) -> None:
        for p in self.updates[name].parameters(self):
            p.requires_grad = flag

    def scaling(self, name: str | None = None) -> float:
        return self.configs[name or self._active()].scaling

    def _active(self) -> str:
        if self.active_adapter is None:
            raise AdapterError("this layer has no adapter")
        return self.active_adapter

    # ------------------------------------------------------------------------------ weights

    def base_weight(self) -> Any:
        """The base weight as a full-precision array (QLoRA overrides this to dequantize)."""
        return self.weight.data

    def base_weight_tensor(self) -> Tensor:
        """The base weight as the ops take it: here the weight tensor (QLoRA: a packed 4-bit operand)."""
        return self.weight

    def delta_weight(self, name: str | None = None) -> Any:
        """s * B @ A: the update adapter ``name``'s A and B add to W, as an (out x in) array."""
        name = name or self._active()
        return self.updates[name].delta(self)

    def merged_weight(self, name: str | None = None) -> Any:
        """The weight that gives, without an adapter, exactly the output this adapter gives."""
        name = name or self._active()
        if self.merged:  # the weight already holds W0 + update: building on it would count the update twice
            raise AdapterError("the layer is merged; unmerge() first")
        return self.updates[name].merged_weight(self, self.base_weight())

    def merge(self) -> None:
        """Fold the active adapter into W, so forward costs one plain matmul."""
        name = self._active()
        if name in self.merged_adapters:
            return
        self.weight.data[...] = self.merged_weight(name)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Undo merge(): W back to the base weight (exact up to float rounding)."""
        for name in reversed(self.merged_adapters):
            self.updates[name].unmerge(self, self.weight.data)
        self.merged_adapters = []

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def to_linear(self, merge: bool = True) -> Linear:
        """A plain Linear with this layer's (merged or base) weights, detached from the adapters."""
        lin = Linear.__new__(Linear)
        Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        if merge and self.active_adapter is not None and not self.merged:
            w = self.merged_weight()
        elif not merge and self.merged:
            self.unmerge()
            w = self.weight.data
        else:
            w = self.weight.data
        be: Backend = self.weight.backend
        lin.weight = Parameter(be.xp.array(w, copy=True))
        lin.bias = Parameter(be.xp.array(self.bias.data, copy=True)) if self.bias is not None else None
        return lin

    # ------------------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        name = self.active_adapter
        if name is None or self.adapters_disabled or self.merged:
            return BaseLinearFunction.apply(x, self.base_weight_tensor(), self.bias)
        config = self.configs[name]
        mask = None
        if self.training and config.lora_dropout > 0.0:
            mask = x.backend.kernels.dropout_mask(x.shape, config.lora_dropout, x.dtype, generator())
        return self.updates[name].forward(self, x, self.base_weight_tensor(), mask)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}, out_features={self.out_features}"]
        for name, c in self.configs.items():
            star = "*" if name == self.active_adapter else ""
            parts.append(f"{name}{star}: r={c.r}, alpha={c.lora_alpha:g}{self.updates[name].label}")
        return "; ".join(parts)
