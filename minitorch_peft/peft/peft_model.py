"""PeftModel: Hugging Face PEFT's entry point (``get_peft_model``) over this package's functions.

    model = get_peft_model(MLP([784, 512, 256, 10]), LoraConfig(r=8, lora_alpha=16))
    model.print_trainable_parameters()
    ...train...
    model.save_pretrained("out/")                       # adapter_config.json + adapter_model.npz
    model = PeftModel.from_pretrained(MLP([784, 512, 256, 10]), "out/")
    plain = model.merge_and_unload()                    # the base model with W + s B A folded in

The wrapper owns nothing of its own: every method calls the model-level functions of ``peft.model`` and
``peft.adapter_io`` (``inject_adapters``, ``save_adapters``, ...), which stay the lower-level API. The
wrapped model is adapted in place (as PEFT does) and is ``peft_model.base_model``; attributes the wrapper
does not have are looked up there (``peft_model.fc1`` is the adapted layer).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

from ..nn.module import Module
from .adapter_io import CONFIG_FILE, PEFT_WEIGHTS_FILE, WEIGHTS_FILE, load_adapters, load_peft, save_adapters, save_peft
from .config import AdapterError, LoraConfig
from .model import (
    active_adapter, add_adapter, count_parameters, delete_adapter, disable_adapters, inject_adapters,
    list_adapters, lora_layers, merge_adapters, merge_and_unload, set_adapter, unload, unmerge_adapters,
)


class PeftModel(Module):
    """A model with named adapters, driven by PEFT's method names.

    ``PeftModel(model, config, adapter_name)`` injects adapter ``adapter_name`` into ``model`` (in place;
    the base is frozen). ``PeftModel(model)`` wraps a model that already holds adapters (e.g. one loaded
    by ``checkpoint.load_model``).
    """

    def __init__(self, model: Module, peft_config: LoraConfig | None = None, adapter_name: str = "default",
                 **inject_kwargs: Any) -> None:
        super().__init__()
        if isinstance(model, PeftModel):
            raise AdapterError("the model is already a PeftModel; use add_adapter to give it another adapter")
        if peft_config is not None:
            if next(lora_layers(model), None) is not None:
                raise AdapterError(
                    f"the model already holds adapters ({', '.join(list_adapters(model))}): wrap it with "
                    "PeftModel(model) and call add_adapter"
                )
            inject_adapters(model, peft_config, adapter_name=adapter_name, **inject_kwargs)
        elif next(lora_layers(model), None) is None:
            raise AdapterError("PeftModel(model) without a config needs a model that already holds adapters")
        self.base_model = model  # registered as a submodule: parameters(), state_dict(), train()/eval() reach it

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: forward the wrapped model's attributes (PEFT does the same).
        # Dunder names and base_model itself are never forwarded (copy/pickle probe them on a bare instance).
        if name.startswith("__") or name in ("base_model", "_modules", "_parameters", "_buffers"):
            raise AttributeError(name)
        return getattr(self.__dict__["_modules"]["base_model"], name)

    # ------------------------------------------------------------------------------ calling

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def get_base_model(self) -> Module:
        """The wrapped model (adapted in place: its targeted layers are LoRALinear)."""
        return self.base_model

    # ------------------------------------------------------------------------------ counting

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, read from the live arrays (a 4-bit weight counts its weights)."""
        counts = count_parameters(self.base_model)
        return counts["trainable"], counts["total"]

    def print_trainable_parameters(self) -> None:
        """One line, as PEFT prints it: trainable params, all params, trainable %."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    # ------------------------------------------------------------------------------ adapters

    @property
    def active_adapter(self) -> str | None:
        return active_adapter(self.base_model)

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        """Adapter name -> its config (target modules as adapted; per-layer ranks in rank_pattern)."""
        from .adapter_io import _adapter_configs

        return {n: LoraConfig.from_dict(c) for n, c in _adapter_configs(self.base_model, list_adapters(self.base_model)).items()}

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add another adapter (inactive and frozen until ``set_adapter``), on layers that already have adapters."""
        add_adapter(self.base_model, adapter_name, peft_config)

    def set_adapter(self, adapter_name: str) -> None:
        """Make ``adapter_name`` the adapter used in forward and the only one that trains."""
        set_adapter(self.base_model, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        delete_adapter(self.base_model, adapter_name)

    def list_adapters(self) -> list[str]:
        return list_adapters(self.base_model)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block the model computes exactly its base output (``with model.disable_adapter(): ...``)."""
        with disable_adapters(self.base_model):
            yield

    def merge_adapter(self) -> None:
        """Fold the active adapter into the base weights (forward costs one matmul); ``unmerge_adapter`` undoes it."""
        merge_adapters(self.base_model)

    def unmerge_adapter(self) -> None:
        unmerge_adapters(self.base_model)

    def merge_and_unload(self) -> Module:
        """The base model with every adapted layer replaced by a plain Linear holding W + s B A."""
        return merge_and_unload(self.base_model)

    def unload(self) -> Module:
        """The base model with its original Linears back, adapters dropped."""
        return unload(self.base_model)

    # ------------------------------------------------------------------------------ files

    def save_pretrained(self, save_directory: str | Path, selected_adapters: list[str] | None = None,
                        peft_format: bool = False) -> Path:
        """Write the adapters (never the base) to folder ``save_directory``, atomically.

        Default: this package's adapter files (``adapter_config.json`` + ``adapter_model.npz``, every adapter,
        or ``selected_adapters``). ``peft_format=True``: Hugging Face PEFT's layout (``adapter_config.json`` +
        ``adapter_model.safetensors``, one adapter: the active one or the single selected one; needs the
        ``safetensors`` extra), which PEFT itself can load onto a PyTorch model of the same shapes.
        """
        if peft_format:
            names = selected_adapters or [self.active_adapter]
            if len(names) != 1:
                raise AdapterError("peft_format=True writes one adapter per folder; select one")
            return save_peft(self.base_model, save_directory, names[0])
        return save_adapters(self.base_model, save_directory, selected_adapters)

    @classmethod
    def from_pretrained(cls, model: Module, model_id: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False) -> "PeftModel":
        """Load the adapters saved in folder ``model_id`` onto ``model`` (its base, same shapes).

        Either layout is read: ours (every saved adapter, under its saved names; the saved active one is
        active) or Hugging Face PEFT's (one adapter, named ``adapter_name``). As in PEFT, the model comes
        back for inference (adapters frozen, eval mode) unless ``is_trainable=True``.
        """
        path = Path(model_id)
        if (path / PEFT_WEIGHTS_FILE).is_file() and not (path / WEIGHTS_FILE).is_file():
            load_peft(model, path, adapter_name)
        elif (path / CONFIG_FILE).is_file():
            load_adapters(model, path)
        else:
            raise AdapterError(f"{path}: no {CONFIG_FILE} there (not an adapter folder)")
        peft = cls(model)
        if not is_trainable:
            for p in peft.parameters():
                p.requires_grad = False
            peft.eval()
        return peft

    def extra_repr(self) -> str:
        return f"adapters={self.list_adapters()}, active={self.active_adapter!r}"


def get_peft_model(model: Module, peft_config: LoraConfig, adapter_name: str = "default", **inject_kwargs: Any) -> PeftModel:
    """Put adapter ``adapter_name`` (per ``peft_config``) into ``model`` and wrap it: PEFT's entry point.

    ``inject_kwargs`` go to ``inject_adapters`` (``quantize="nf4"`` for QLoRA, ``double_quant``, ``block_size``).
    """
    return PeftModel(model, peft_config, adapter_name, **inject_kwargs)
