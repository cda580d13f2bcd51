"""LoRA+ (Hayou et al., 2024): train B with a larger learning rate than A.

With B starting at zero and A random, equal learning rates leave the update B A learning slowly; LoRA+
gives B the rate ``lr * ratio`` (the paper suggests a ratio around 16) and everything else ``lr``.
"""

from __future__ import annotations

from typing import Any

from ..nn.module import Module
from .config import AdapterError
from .model import lora_layers


def loraplus_param_groups(model: Module, lr: float, ratio: float = 16.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups: every adapter's B at ``lr * ratio``; A, DoRA magnitudes and any other
    trainable tensor (an unfrozen bias, say) at ``lr``.

    All adapters' tensors are included, frozen ones too (optimizers skip tensors that do not require
    grad), so switching the active adapter later needs no new optimizer.
    """
    if not lr > 0:
        raise AdapterError(f"LoRA+ learning rate must be > 0, got {lr!r}")
    if not ratio > 0:
        raise AdapterError(f"LoRA+ ratio must be > 0, got {ratio!r}")
    layers = list(lora_layers(model))
    if not layers:
        raise AdapterError("LoRA+ needs a model with adapters (call inject_adapters first)")
    b_params = [p for _, layer in layers for _, p in layer.lora_B.items()]
    adapter_params = b_params + [p for _, layer in layers for d in (layer.lora_A, layer.lora_magnitude_vector) for _, p in d.items()]
    taken = {id(p) for p in adapter_params}
    others = [p for _, layer in layers for _, p in layer.lora_A.items()]
    others += [p for _, layer in layers for _, p in layer.lora_magnitude_vector.items()]
    others += [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    groups = [{"params": others, "lr": lr, "name": "lora_A+other"}, {"params": b_params, "lr": lr * ratio, "name": "lora_B"}]
    return [g for g in groups if g["params"]]
