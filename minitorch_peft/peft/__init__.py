"""Parameter-efficient fine-tuning: LoRA and its family as plain modules over the engine."""

from .config import AdapterError, LoraConfig
from .lora import LoRAFunction, LoRALinear
from .model import (
    active_adapter, add_adapter, count_parameters, delete_adapter, disable_adapters, inject_adapters,
    linear_names, list_adapters, lora_layers, merge_adapters, merge_and_unload, set_adapter, unload,
    unmerge_adapters,
)

__all__ = [
    "AdapterError", "LoRAFunction", "LoRALinear", "LoraConfig", "active_adapter", "add_adapter",
    "count_parameters", "delete_adapter", "disable_adapters", "inject_adapters", "linear_names",
    "list_adapters", "lora_layers", "merge_adapters", "merge_and_unload", "set_adapter", "unload",
    "unmerge_adapters",
]
