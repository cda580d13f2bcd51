"""Parameter-efficient fine-tuning: LoRA and its family as plain modules over the engine."""

from .adapter_io import load_adapters, load_peft, save_adapters, save_peft
from .compose import COMBINATIONS, combine_adapters
from .config import AdapterError, LoraConfig, RankWarning
from .dora import DoRAUpdate
from .fused import BaseLinearFunction, DoRAFunction, LoRAFunction
from .lora import LoRALinear
from .update import LoRAUpdate
from .weights import DenseWeight, PackedWeight
from .loraplus import loraplus_param_groups
from .qlora import QLoRALinear, base_weight_nbytes
from .peft_model import PeftModel, get_peft_model
from .model import (
    active_adapter, add_adapter, count_parameters, delete_adapter, disable_adapters, inject_adapters,
    linear_names, list_adapters, lora_layers, merge_adapters, merge_and_unload, set_adapter, unload,
    unmerge_adapters,
)

__all__ = [
    "COMBINATIONS", "DoRAFunction", "combine_adapters", "load_adapters", "load_peft", "loraplus_param_groups",
    "save_adapters", "save_peft",
    "AdapterError", "LoRAFunction", "LoRALinear", "LoraConfig", "RankWarning", "active_adapter", "add_adapter",
    "count_parameters", "delete_adapter", "disable_adapters", "inject_adapters", "linear_names",
    "list_adapters", "lora_layers", "merge_adapters", "merge_and_unload", "set_adapter", "unload",
    "unmerge_adapters", "QLoRALinear", "base_weight_nbytes", "PeftModel", "get_peft_model",
    "BaseLinearFunction", "DenseWeight", "DoRAUpdate", "LoRAUpdate", "PackedWeight",
]
