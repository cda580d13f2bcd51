"""Model-level PEFT: put adapters into a model, switch, merge, disable and count them."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ..nn.layers import Linear
from ..nn.module import Module
from .config import AdapterError, LoraConfig, warn_wide_ranks
from .lora import LoRALinear


def linear_names(model: Module) -> list[str]:
    """Qualified names of the Linear (or already adapted) modules in ``model``."""
    return [n for n, m in model.named_modules() if n and isinstance(m, (Linear, LoRALinear))]


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def inject_adapters(
    model: Module,
    config: LoraConfig | None = None,
    adapter_name: str = "default",
    quantize: str | None = None,
    double_quant: bool = True,
    block_size: int = 64,
    **config_kwargs: Any,
) -> Module:
    """Swap each targeted Linear for a LoRALinear (in place) and freeze every base parameter.

    ``config_kwargs`` are LoraConfig fields (r, lora_alpha, target_modules, ...) when no config is given.
    A target that matches no module is an error listing the modules there are (a silent miss trains
    nothing). ``quantize="nf4"|"fp4"`` stores each targeted base weight in 4 bits (QLoRA / QDoRA).
    """
    config = config or LoraConfig(**config_kwargs)
    candidates = [n for n, m in model.named_modules() if n and isinstance(m, Linear)]
    if config.target_modules == "all-linear":
        chosen = candidates
    else:
        chosen = []
        for target in config.target_modules:
            hits = [n for n in candidates if _matches(n, target)]
            if not hits:
                raise AdapterError(
                    f"target module {target!r} matches no Linear module; available: {', '.join(candidates) or 'none'}"
                )
            chosen.extend(h for h in hits if h not in chosen)
    if not chosen:
        raise AdapterError("the model has no Linear module to adapt")
    notes = []
    for name in chosen:  # check every target before changing anything
        lin = model.get_submodule(name)
        notes.append(config.for_module(name).check_fits(name, lin.in_features, lin.out_features))
        if quantize is not None:
            from .qlora import check_quantizable

            check_quantizable(name, lin, quantize, block_size)
    warn_wide_ranks(notes)
    model.freeze()
    for name in chosen:
        lin = model.get_submodule(name)
        if quantize is not None:
            from .qlora import QLoRALinear

            layer: LoRALinear = QLoRALinear.from_linear(
                lin, config=config.for_module(name), adapter_name=adapter_name,
                quant_type=quantize, double_quant=double_quant, block_size=block_size,
            )
        else:
            layer = LoRALinear.from_linear(lin, config=config.for_module(name), adapter_name=adapter_name)
        model.set_submodule(name, layer)
    return model


def lora_layers(model: Module) -> Iterator[tuple[str, LoRALinear]]:
    """(qualified name, layer) for every adapted layer."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def quantization(model: Module) -> dict[str, Any] | None:
    """What a saved config records of a 4-bit base: {"quant_type", "double_quant", "block_size"} of its
    adapted layers (QLoRA / QDoRA), or None for a float base (or no adapters)."""
    first = next(lora_layers(model), None)
    quant = getattr(first[1], "quant_config", None) if first is not None else None
    return quant() if callable(quant) else None


def quantization_kwargs(quant: dict[str, Any] | None) -> dict[str, Any]:
    """``inject_adapters`` keywords that re-create the 4-bit base ``quantization`` recorded (none: float)."""
    q = quant or {}
    return {"quantize": q.get("quant_type"), "double_quant": q.get("double_quant", True),
            "block_size": q.get("block_size", 64)}


def _require_layers(model: Module) -> list[tuple[str, LoRALinear]]:
    layers = list(lora_layers(model))
    if not layers:
        raise AdapterError("the model has no adapters (call inject_adapters first)")
    return layers


def add_adapter(model: Module, name: str, config: LoraConfig) -> None:
    """Add adapter ``name`` to every adapted layer that ``config.target_modules`` names (inactive, frozen)."""
    layers = _require_layers(model)
    targets = [n for n, _ in layers] if config.target_modules == "all-linear" else config.target_modules
    chosen = [(n, l) for n, l in layers if any(_matches(n, t) for t in targets)]
    missing = [t for t in targets if not any(_matches(n, t) for n, _ in layers)]
    if missing:
        raise AdapterError(
            f"target module(s) {', '.join(missing)} have no adapter layer; adapted: {', '.join(n for n, _ in layers)}"
        )
    notes = []
    for n, layer in chosen:
        notes.append(config.for_module(n).check_fits(n, layer.in_features, layer.out_features))
        if name in layer.configs:
            raise AdapterError(f"adapter {name!r} already exists in {n}")
    warn_wide_ranks(notes)
    for n, layer in chosen:
        layer.add_adapter(name, config.for_module(n))


def set_adapter(model: Module, name: str) -> None:
    """Make ``name`` active (used in forward, trained) in every layer that has it; others go inactive."""
    layers = _require_layers(model)
    if not any(name in l.configs for _, l in layers):
        raise AdapterError(f"unknown adapter {name!r}; the model has: {', '.join(list_adapters(model))}")
    for _, layer in layers:
        if name in layer.configs:
            layer.set_adapter(name)
        else:  # this layer takes no part in adapter `name`: it computes its base output
            for other in layer.configs:
                layer._set_trainable(other, False)
            layer.active_adapter = None


def delete_adapter(model: Module, name: str) -> None:
    layers = _require_layers(model)
    if name not in list_adapters(model):
        raise AdapterError(f"unknown adapter {name!r}; the model has: {', '.join(list_adapters(model))}")
    for _, layer in layers:
        if name in layer.configs:
            layer.delete_adapter(name)


def list_adapters(model: Module) -> list[str]:
    """Adapter names in the order they were added."""
    names: list[str] = []
    for _, layer in lora_layers(model):
        names.extend(n for n in layer.configs if n not in names)
    return names


def active_adapter(model: Module) -> str | None:
    for _, layer in lora_layers(model):
        return layer.active_adapter
    return None


def merge_adapters(model: Module) -> None:
    for _, layer in _require_layers(model):
        layer.merge()


def unmerge_adapters(model: Module) -> None:
    for _, layer in _require_layers(model):
        layer.unmerge()


def merge_and_unload(model: Module) -> Module:
    """Replace every adapted layer by a plain Linear holding W + s B A (in place; returns the model)."""
    for name, layer in _require_layers(model):
        model.set_submodule(name, layer.to_linear(merge=True))
    return model


def unload(model: Module) -> Module:
    """Replace every adapted layer by its plain base Linear, dropping the adapters."""
    for name, layer in _require_layers(model):
        model.set_submodule(name, layer.to_linear(merge=False))
    return model


@contextlib.contextmanager
def disable_adapters(model: Module) -> Iterator[None]:
    """Within the block the model computes exactly its base output (merged adapters are unmerged first)."""
    layers = _require_layers(model)
    remerge = [layer for _, layer in layers if layer.merged]
    for layer in remerge:
        layer.unmerge()
    previous = [layer.adapters_disabled for _, layer in layers]
    for _, layer in layers:
        layer.adapters_disabled = True
    try:
        yield
    finally:
        for (_, layer), flag in zip(layers, previous):
            layer.adapters_disabled = flag
        for layer in remerge:
            layer.merge()


def count_parameters(model: Module, baseline: Module | None = None) -> dict[str, int]:
    """Parameter counts read from the live arrays: total, trainable, frozen (and baseline if given).

    4-bit base weights count as the number of weights they encode (not bytes).
    """
    total = trainable = 0
    for p in model.parameters():
        total += p.size
        trainable += p.size if p.requires_grad else 0
    for _, layer in lora_layers(model):
        total += getattr(layer, "quantized_numel", 0)
    counts = {"total": total, "trainable": trainable, "frozen": total - trainable}
    if baseline is not None:
        counts["baseline"] = baseline.num_parameters()
    return counts
