"""LoRALinear: a drop-in for Linear with a frozen base and named low-rank adapters.

y = x @ W^T + b + s * dropout(x) @ A^T @ B^T, with A (r x in), B (out x r) and s = alpha / r.
Several adapters can live in one layer (``lora_A["name"]``); one is active at a time.
"""

from __future__ import annotations

import math
from typing import Any

from .. import functional as F
from ..backend import Backend
from ..function import Context, Function
from ..nn.layers import Linear, kaiming_uniform
from ..nn.containers import ParameterDict
from ..nn.module import Module, Parameter
from ..random import generator
from ..tensor import Tensor
from .config import AdapterError, LoraConfig


class LoRAFunction(Function):
    """y = x W^T + b + s (x A^T) B^T in one fused op; dx, dA, dB (and dW, db if unfrozen) in one backward."""

    @staticmethod
    def forward(ctx: Context, x: Any, w: Any, a: Any, bm: Any, b: Any = None, *, scaling: float, mask: Any = None) -> Any:
        k = ctx.backend.kernels
        xd = None if mask is None else x * mask
        y, u = k.lora_forward(x, w, b, a, bm, scaling, xd)
        ctx.save_for_backward(x, w, a, bm, u, xd, mask)
        ctx.scaling = scaling
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, ...]:
        x, w, a, bm, u, xd, mask = ctx.saved
        need = ctx.needs_input_grad
        need_b = len(need) > 4 and need[4]
        gx, gw, gb, ga, gbm = ctx.backend.kernels.lora_backward(
            g, x, w, a, bm, u, ctx.scaling, (need[0], need[1], need_b, need[2], need[3]), xd, mask
        )
        return (gx, gw, ga, gbm) + ((gb,) if len(need) > 4 else ())


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
        self.add_adapter(adapter_name, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                  use_rslora=use_rslora, init_lora_weights=init))

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
            config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora, init_lora_weights=init)
        layer.add_adapter(adapter_name, config)
        return layer

    def _init_from(self, linear: Linear) -> None:
        Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad = False
        if self.bias is not None:
            self.bias.requires_grad = False
        self.lora_A = ParameterDict()
        self.lora_B = ParameterDict()
        self.lora_magnitude_vector = ParameterDict()  # DoRA's m, one entry per DoRA adapter
        self.configs: dict[str, LoraConfig] = {}
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.dora_merge_state: dict[str, Any] = {}  # DoRA: what unmerge needs (n depends on the W0 that merge overwrites)
        self.adapters_disabled = False

    # ------------------------------------------------------------------------------ adapters

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        """Create adapter ``name``: A Kaiming-uniform (or N(0, 1/r)), B zeros, so the output is unchanged."""
        if name in self.configs:
            raise AdapterError(f"adapter {name!r} already exists in this layer")
        be, dtype = self.weight.backend, self.weight.dtype
        # drawn in float64 on the host and rounded once, by the backend, to the weight's dtype (which may
        # be a device library's dtype object that NumPy cannot read)
        if config.init_lora_weights == "gaussian":
            a = generator().normal(0.0, 1.0 / config.r, size=(config.r, self.in_features))
        else:
            a = kaiming_uniform((config.r, self.in_features), self.in_features, a=math.sqrt(5), dtype=float)
        self.lora_A[name] = Parameter(be.asarray(a, dtype=dtype))
        self.lora_B[name] = Parameter(be.xp.zeros((self.out_features, config.r), dtype=dtype))
        self.configs[name] = config
        if config.use_dora:
            from .dora import init_magnitude

            self.lora_magnitude_vector[name] = Parameter(init_magnitude(self))
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
        del self.lora_A[name], self.lora_B[name], self.configs[name]
        if name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]
        if self.active_adapter == name:
            self.active_adapter = None
            if self.configs:
                self.set_adapter(next(iter(self.configs)))

    def _set_trainable(self, name: str, flag: bool) -> None:
        self.lora_A[name].requires_grad = flag
        self.lora_B[name].requires_grad = flag
        if name in self.lora_magnitude_vector:
            self.lora_magnitude_vector[name].requires_grad = flag

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
        """The base weight as the tensor forward multiplies by (QLoRA: a dequantized scratch buffer)."""
        return self.weight

    def delta_weight(self, name: str | None = None) -> Any:
        """s * B @ A: the update adapter ``name`` adds to W, as an (out x in) array."""
        name = name or self._active()
        return (self.lora_B[name].data * self.scaling(name)) @ self.lora_A[name].data

    def merged_weight(self, name: str | None = None) -> Any:
        """The weight that gives, without an adapter, exactly the output this adapter gives."""
        name = name or self._active()
        if self.merged:  # the weight already holds W0 + update: building on it would count the update twice
            raise AdapterError("the layer is merged; unmerge() first")
        if self.configs[name].use_dora:
            from .dora import dora_merged_weight

            return dora_merged_weight(self, name)
        return self.base_weight() + self.delta_weight(name)

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
            if self.configs[name].use_dora:
                from .dora import dora_unmerged_weight

                self.weight.data[...] = dora_unmerged_weight(self, name)
            else:
                self.weight.data -= self.delta_weight(name)
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
            return F.linear(x, self.weight, self.bias)
        config = self.configs[name]
        mask = None
        if self.training and config.lora_dropout > 0.0:
            mask = x.backend.kernels.dropout_mask(x.shape, config.lora_dropout, x.dtype, generator())
        if config.use_dora:
            from .dora import dora_forward

            return dora_forward(self, x, name, mask)
        inputs = (x, self.base_weight_tensor(), self.lora_A[name], self.lora_B[name]) + ((self.bias,) if self.bias is not None else ())
        return LoRAFunction.apply(*inputs, scaling=config.scaling, mask=mask)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}, out_features={self.out_features}"]
        for name, c in self.configs.items():
            star = "*" if name == self.active_adapter else ""
            parts.append(f"{name}{star}: r={c.r}, alpha={c.lora_alpha:g}{', dora' if c.use_dora else ''}")
        return "; ".join(parts)
