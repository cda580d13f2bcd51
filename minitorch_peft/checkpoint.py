"""A saved model is a folder: ``config.json`` + ``base.npz`` (frozen base) + ``adapters.npz`` (small).

Keeping the adapters in their own file means a fine-tune ships as a few kilobytes beside a base that
never changes. The folder is written whole or not at all (``atomic_directory``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .backend import Backend
from .nn.layers import MLP
from .nn.module import Module, StateDictError
from .peft.config import AdapterError, LoraConfig, RankWarning
from .peft.model import add_adapter, inject_adapters, lora_layers, quantization, quantization_kwargs, set_adapter
from .schema import FLOAT_DTYPES, FORMAT, VERSION, check_against_arrays, implied_shapes, validate_model_config
from .serialize import CheckpointError, atomic_directory, check_finite, load_json, load_npz, npz_headers, save_json, save_npz

ADAPTER_KEYS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.")



def _float_dtype(model: Module) -> str:
    """The floating dtype of the model's parameters (biases stay full precision even over a 4-bit base)."""
    return next((str(p.dtype) for p in model.parameters()), "float32")


def is_adapter_key(key: str) -> bool:
    return any(k in key for k in ADAPTER_KEYS)


def model_config(model: MLP) -> dict[str, Any]:
    """Everything needed to rebuild ``model``'s structure (not its values)."""
    layers = list(lora_layers(model))
    dtype = _float_dtype(model)
    config: dict[str, Any] = {"format": FORMAT, "version": VERSION,
                              "architecture": {"type": "MLP", "dims": model.dims, "dtype": dtype}}
    if layers:
        adapters: dict[str, Any] = {}
        for name, layer in layers:
            for adapter, cfg in layer.configs.items():
                entry = adapters.setdefault(adapter, {**cfg.to_dict(), "target_modules": []})
                entry["target_modules"].append(name)
                # layers may differ in r / alpha (a combined adapter, say): the patterns record each one
                if cfg.r != entry["r"]:
                    entry["rank_pattern"][name] = cfg.r
                if cfg.lora_alpha != entry["lora_alpha"]:
                    entry["alpha_pattern"][name] = cfg.lora_alpha
        config["adapters"] = adapters
        config["active_adapter"] = next((l.active_adapter for _, l in layers if l.active_adapter), None)
        config["quantization"] = quantization(model)
    return config


def save_model(model: MLP, path: str | Path, extra: dict[str, Any] | None = None,
               files: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write the folder ``path`` atomically: the previous checkpoint there survives any failure.

    ``extra``: more top-level keys for ``config.json`` (e.g. the training settings). ``files``: more
    ``.npz`` files written inside the same atomic save, file name -> {array name -> array} (e.g. an
    optimizer's state for resuming: ``{"optimizer.npz": {...}}``); ``load_npz(path / name)`` reads one back.
    A model holding NaN or infinity is refused before anything is written: it could never be loaded.
    """
    path = Path(path)
    state = model.state_dict()
    config = {**model_config(model), **(extra or {})}
    files = dict(files or {})
    for name in files:
        if name in RESERVED_FILES or not name.endswith(".npz") or "/" in name or name.startswith("."):
            raise ValueError(f"save_model: extra file name {name!r} must be a plain '*.npz' name other than {', '.join(RESERVED_FILES)}")
    check_finite(state, f"model to save to {path}")
    with atomic_directory(path) as tmp:
        save_npz(tmp / "base.npz", {k: v for k, v in state.items() if not is_adapter_key(k)})
        adapters = {k: v for k, v in state.items() if is_adapter_key(k)}
        if adapters:
            save_npz(tmp / "adapters.npz", adapters)
        for name, arrays in (files or {}).items():
            save_npz(tmp / name, arrays)
        save_json(tmp / "config.json", config)
    return path


RESERVED_FILES = ("config.json", "base.npz", "adapters.npz")


def read_config(path: str | Path) -> dict[str, Any]:
    """The checked ``config.json`` of model folder ``path``, and its arrays' shapes checked from the headers.

    Nothing is allocated here beyond the JSON: ``load_model`` calls it before building the model.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model folder not found{_interrupted_hint(path)}")
    source = str(path / "config.json")
    config = load_json(path / "config.json")
    validate_model_config(config, source)
    base, adapters = implied_shapes(config)
    budget = 8 * sum(int(np.prod(s)) for s in (*base.values(), *adapters.values())) + (1 << 20)
    check_against_arrays(base, npz_headers(path / "base.npz", max_bytes=budget), str(path / "base.npz"))
    if "adapters" in config:
        check_against_arrays(adapters, npz_headers(path / "adapters.npz", max_bytes=budget), str(path / "adapters.npz"))
    return config


def _interrupted_hint(path: Path) -> str:
    """Where a save killed between its two renames (file systems without an atomic exchange) left the old copy."""
    olds = sorted(path.parent.glob(f".{path.name}.*.old")) if path.parent.is_dir() else []
    return f" (an interrupted save left the previous copy in {olds[-1]})" if olds else ""


def load_model(path: str | Path, backend: str | Backend = "numpy") -> tuple[MLP, dict[str, Any]]:
    """Rebuild and fill the model saved in folder ``path``; every problem is one CheckpointError."""
    path = Path(path)
    config = read_config(path)  # schema and shapes checked before anything is allocated
    model = build_from_config(config, str(path / "config.json"))
    state = load_npz(path / "base.npz")
    if "adapters" in config:
        state.update(load_npz(path / "adapters.npz"))
    try:
        model.load_state_dict(state, source=str(path))  # keys, shapes, dtypes, 4-bit state: named errors
    except StateDictError as e:
        raise CheckpointError(str(e)) from None
    for name in ("base.npz", "adapters.npz"):  # then no NaN / inf anywhere (the model is dropped if so)
        check_finite({k: v for k, v in state.items() if (name == "adapters.npz") == is_adapter_key(k)}, str(path / name))
    return model.to(backend), config


def build_from_config(config: Any, source: str) -> MLP:
    """An MLP of the saved structure (random values), with the saved adapters and quantization."""
    validate_model_config(config, source)  # types, ranges, names and size: before allocating anything
    arch = config["architecture"]
    dims, dtype = arch["dims"], arch.get("dtype", "float32")
    model = MLP(dims, dtype=dtype)
    adapters = config.get("adapters")
    if adapters is None:
        return model
    # a saved rank above a layer's width was reported when the adapter was made, not on every load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RankWarning)
        return _add_saved_adapters(model, config, adapters, source)


def _add_saved_adapters(model: MLP, config: dict[str, Any], adapters: Any, source: str) -> MLP:
    try:
        if not isinstance(adapters, dict) or not adapters:
            raise AdapterError("'adapters' must map adapter names to configs")
        quant = config.get("quantization") or {}
        if not isinstance(quant, dict):
            raise AdapterError("'quantization' must be an object or null")
        for i, (name, raw) in enumerate(adapters.items()):
            if not isinstance(raw, dict):
                raise AdapterError(f"adapter {name!r}: config must be an object")
            cfg = LoraConfig.from_dict(raw)
            if i == 0:
                inject_adapters(model, cfg, adapter_name=name, **quantization_kwargs(quant))
            else:
                add_adapter(model, name, cfg)
        active = config.get("active_adapter") or next(iter(adapters))
        set_adapter(model, active)
    except (AdapterError, ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    return model


def base_state(model: Module) -> dict[str, Any]:
    """The state of ``model`` without its adapters."""
    return {k: v for k, v in model.state_dict().items() if not is_adapter_key(k)}
