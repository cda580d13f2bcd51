"""Adapter files: only the adapters and their settings, loaded onto a base that has the right shapes.

Two layouts, each a folder written whole or not at all:

- ours: ``adapter_config.json`` (method, r, alpha, targets, rsLoRA, DoRA, names, and the base shapes the
  adapters were made for) + ``adapter_model.npz`` with the model's own keys (``fc1.lora_A.<name>``).
- Hugging Face PEFT's: ``adapter_config.json`` (peft_type "LORA", ...) + ``adapter_model.safetensors``
  with PEFT's key names (``base_model.model.fc1.lora_A.weight``, ``...lora_B.weight``,
  ``...lora_magnitude_vector`` for DoRA), one adapter per folder. Needs the ``safetensors`` package.

Every check (config, keys, shapes) runs before the model is touched, so a bad file changes nothing.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..nn.layers import Linear
from ..nn.module import Module
from ..serialize import CheckpointError, atomic_directory, check_finite, load_json, load_npz, save_json, save_npz
from .config import AdapterError, LoraConfig
from .lora import LoRALinear, make_update
from .model import (
    active_adapter, add_adapter, inject_adapters, list_adapters, lora_layers, quantization, quantization_kwargs,
    set_adapter,
)

FORMAT = "minitorch_peft.adapters"
VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.npz"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _adapter_configs(model: Module, names: list[str]) -> dict[str, dict[str, Any]]:
    """name -> config dict with the exact target modules and per-module r / alpha patterns."""
    from ..checkpoint import model_config  # checkpoint imports the peft package: import late

    adapters = model_config(model).get("adapters") or {}
    return {n: adapters[n] for n in names}


def _names(model: Module, names: list[str] | None) -> list[str]:
    known = list_adapters(model)
    if not known:
        raise AdapterError("the model has no adapters to save")
    names = known if names is None else list(names)
    for n in names:
        if n not in known:
            raise AdapterError(f"unknown adapter {n!r}; the model has: {', '.join(known)}")
    return names


def _module_shapes(model: Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every Linear or adapted module, by qualified name."""
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules() if n and isinstance(m, (Linear, LoRALinear))}


def _host(a: Any, layer: LoRALinear) -> np.ndarray:
    return np.ascontiguousarray(layer.weight.backend.to_numpy(a))


def _check_base(model: Module, shapes: dict[str, tuple[int, int]], source: str) -> None:
    have = _module_shapes(model)
    for module, shape in shapes.items():
        if module not in have:
            raise AdapterError(f"{source}: the adapters were made for module {module!r}, which this base lacks; "
                               f"it has: {', '.join(have) or 'none'}")
        if have[module] != tuple(shape):
            raise AdapterError(f"{source}: module {module!r} is (out, in) = {have[module]} in this base, "
                               f"the adapters were made for {tuple(shape)}")


def _expected_shapes(name: str, cfg: LoraConfig, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
    """Our state-dict key -> shape for adapter ``name`` on the modules of ``shapes``."""
    out: dict[str, tuple[int, ...]] = {}
    for module, (n_out, n_in) in shapes.items():
        for kind, shape in make_update(name, cfg.for_module(module)).shapes(n_in, n_out).items():
            out[f"{module}.{kind}.{name}"] = shape
    return out


def _check_arrays(arrays: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], source: str) -> None:
    missing = [k for k in expected if k not in arrays]
    unexpected = [k for k in arrays if k not in expected]
    if missing:
        raise AdapterError(f"{source}: missing key(s) {', '.join(missing)}")
    if unexpected:
        raise AdapterError(f"{source}: unexpected key(s) {', '.join(unexpected)}")
    for k, shape in expected.items():
        if tuple(arrays[k].shape) != shape:
            raise AdapterError(f"{source}: key {k!r} has shape {tuple(arrays[k].shape)}, the base needs {shape}")
        if arrays[k].dtype.kind != "f":
            raise AdapterError(f"{source}: key {k!r} has dtype {arrays[k].dtype}, expected floating point")


def _attach(model: Module, name: str, cfg: LoraConfig, quant: dict[str, Any] | None = None) -> None:
    """Put adapter ``name`` into the model: inject into a plain model (its targeted base weights in 4 bits
    if ``quant``, as the adapter was trained), add beside existing adapters (whose base stays as it is)."""
    if name in list_adapters(model):
        raise AdapterError(f"the model already has an adapter named {name!r}")
    if next(lora_layers(model), None) is None:
        inject_adapters(model, cfg, adapter_name=name, **quantization_kwargs(quant))
    else:
        add_adapter(model, name, cfg)


def _fill(model: Module, arrays: dict[str, np.ndarray]) -> None:
    """Copy arrays (our keys) into the model's live adapter tensors, in the model's dtype."""
    params = dict(model.named_parameters())
    for k, v in arrays.items():
        p = params[k]
        p.data[...] = p.backend.asarray(v.astype(p.dtype, copy=False))


# ------------------------------------------------------------------------------------ our format


def save_adapters(model: Module, path: str | Path, names: list[str] | None = None) -> Path:
    """Write adapters ``names`` (default: all) and their configs to folder ``path``; the base is not saved."""
    names = _names(model, names)
    configs = _adapter_configs(model, names)
    state = model.state_dict()
    arrays: dict[str, Any] = {}
    shapes = _module_shapes(model)
    base_shapes: dict[str, list[int]] = {}
    for n, cfg in configs.items():
        for module in cfg["target_modules"]:
            base_shapes[module] = list(shapes[module])
            for kind in ("lora_A", "lora_B", "lora_magnitude_vector"):
                key = f"{module}.{kind}.{n}"
                if key in state:
                    arrays[key] = state[key]
        cfg["method"] = "dora" if cfg.get("use_dora") else "lora"
    active = active_adapter(model)
    config = {
        "format": FORMAT, "version": VERSION,
        "method": configs[active]["method"] if active in configs else configs[names[0]]["method"],
        "adapters": configs, "active_adapter": active if active in configs else names[0], "base_shapes": base_shapes,
    }
    quant = quantization(model)
    if quant is not None:  # QLoRA / QDoRA: loading re-creates the 4-bit base the adapters were trained on
        config["quantization"] = quant
    path = Path(path)
    with atomic_directory(path) as tmp:
        save_npz(tmp / WEIGHTS_FILE, arrays)
        save_json(tmp / CONFIG_FILE, config)
    return path


def load_adapters(model: Module, path: str | Path) -> list[str]:
    """Load the adapters saved in folder ``path`` onto ``model`` (a base, or a model with other adapters).

    The base must have the modules and shapes the adapters were made for; returns the loaded names and
    makes the saved active adapter active. Adapters saved from a 4-bit base (QLoRA / QDoRA: the config's
    "quantization") put a plain base's targeted weights in 4 bits the same way, so the outputs are the
    ones the adapters were trained with.
    """
    path = Path(path)
    source = str(path / CONFIG_FILE)
    raw = load_json(path / CONFIG_FILE)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise AdapterError(f"{source}: not a {FORMAT} adapter config")
    if raw.get("version") != VERSION:
        raise AdapterError(f"{source}: version {raw.get('version')!r}, this build reads {VERSION}")
    adapters, shapes = raw.get("adapters"), raw.get("base_shapes")
    if not isinstance(adapters, dict) or not adapters or not isinstance(shapes, dict):
        raise AdapterError(f"{source}: 'adapters' and 'base_shapes' must be objects")
    active = raw.get("active_adapter")
    if active is not None and (not isinstance(active, str) or active not in adapters):
        raise AdapterError(f"{source}: 'active_adapter' {active!r} is not one of the adapters ({', '.join(adapters)})")
    from ..schema import validate_adapter_entry, validate_quantization

    quant = raw.get("quantization")  # absent in folders saved before it was recorded, and for a float base
    try:
        validate_quantization(quant, source)
        for n, c in adapters.items():
            validate_adapter_entry(n, c, source)
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    if not all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s)
               for s in shapes.values()):
        raise AdapterError(f"{source}: 'base_shapes' must map module names to [out, in] positive integers")
    shapes = {m: (s[0], s[1]) for m, s in shapes.items()}
    configs = {n: LoraConfig.from_dict(c) for n, c in adapters.items()}
    _check_base(model, shapes, str(path))
    known = list_adapters(model)
    expected: dict[str, tuple[int, ...]] = {}
    for n, cfg in configs.items():
        if n in known:
            raise AdapterError(f"{path}: the model already has an adapter named {n!r}")
        if cfg.target_modules == "all-linear" or any(m not in shapes for m in cfg.target_modules):
            raise AdapterError(f"{source}: adapter {n!r} lists modules without saved shapes")
        expected.update(_expected_shapes(n, cfg, {m: shapes[m] for m in cfg.target_modules}))
    adapted = {n for n, _ in lora_layers(model)}
    if adapted:  # beside existing adapters a new one can only go where there are adapter layers
        plain = [m for m in shapes if m not in adapted]
        if plain:
            raise AdapterError(f"{path}: the model has adapters, but not on {', '.join(plain)}; load onto its base instead")
    arrays = load_npz(path / WEIGHTS_FILE, finite=True, max_bytes=8 * sum(int(np.prod(s)) for s in expected.values()) + (1 << 16))
    _check_arrays(arrays, expected, str(path / WEIGHTS_FILE))
    for n, cfg in configs.items():
        _attach(model, n, cfg, quant)
    _fill(model, arrays)
    active = raw.get("active_adapter")
    set_adapter(model, active if active in configs else next(iter(configs)))
    return list(configs)


# ------------------------------------------------------------------------------- Hugging Face PEFT


def _safetensors() -> Any:
    try:
        import safetensors.numpy
    except ImportError:
        raise AdapterError(
            "Hugging Face PEFT files need the safetensors package: pip install 'minitorch_peft[safetensors]'"
        ) from None
    return safetensors.numpy


def save_peft(model: Module, path: str | Path, adapter: str | None = None) -> Path:
    """Write one adapter (default: the active one) in Hugging Face PEFT's layout to folder ``path``."""
    st = _safetensors()
    if not list_adapters(model):
        raise AdapterError("the model has no adapters (a plain model): there is nothing to export")
    name = adapter or active_adapter(model)
    if name is None:
        raise AdapterError(f"the model has no active adapter; name one to export ({', '.join(list_adapters(model))})")
    cfg = _adapter_configs(model, _names(model, [name]))[name]
    tensors: dict[str, np.ndarray] = {}
    for module, layer in lora_layers(model):
        if name not in layer.configs:
            continue
        prefix = PEFT_PREFIX + module
        tensors[f"{prefix}.lora_A.weight"] = _host(layer.lora_A[name].data, layer)
        tensors[f"{prefix}.lora_B.weight"] = _host(layer.lora_B[name].data, layer)
        if name in layer.lora_magnitude_vector:
            tensors[f"{prefix}.lora_magnitude_vector"] = _host(layer.lora_magnitude_vector[name].data, layer)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": cfg["r"],
        "lora_alpha": cfg["lora_alpha"],
        "lora_dropout": cfg["lora_dropout"],
        "target_modules": list(cfg["target_modules"]),
        "use_rslora": cfg["use_rslora"],
        "use_dora": cfg["use_dora"],
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True if cfg["init_lora_weights"] == "kaiming" else cfg["init_lora_weights"],
        "rank_pattern": dict(cfg["rank_pattern"]),
        "alpha_pattern": dict(cfg["alpha_pattern"]),
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    path = Path(path)
    with atomic_directory(path) as tmp:
        # the extra metadata key lets the output policy recognise this folder as ours (PEFT ignores it)
        st.save_file(tensors, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt", "minitorch_peft": str(VERSION)})
        save_json(tmp / CONFIG_FILE, config)
    return path


def _peft_pattern(pattern: Any, module: str, default: Any) -> Any:
    """PEFT's rank/alpha patterns: a key names a module exactly, or as a regex matching its end."""
    for key, value in (pattern or {}).items():
        if module == key or re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _peft_targets(targets: Any, linear: list[str], keyed: list[str], source: str) -> list[str]:
    """The modules PEFT's target_modules names in this model (list: exact or suffix; string: regex)."""
    if targets == "all-linear":
        return keyed  # PEFT leaves out the output layer of some models: trust the file's keys here
    if isinstance(targets, str):
        return [m for m in linear if re.fullmatch(targets, m)]
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        return [m for m in linear if any(m == t or m.endswith("." + t) for t in targets)]
    raise AdapterError(f"{source}: target_modules must be a list of names, a regex or 'all-linear', got {targets!r}")


# Fields of a PEFT LoraConfig this import reads, or that are only metadata.
PEFT_FIELDS_READ = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora", "bias", "init_lora_weights",
    "rank_pattern", "alpha_pattern",
})
# Fields PEFT writes with a default that means "feature off" although it is not null / false / empty.
PEFT_NEUTRAL_DEFAULTS: dict[str, Any] = {
    "megatron_core": "megatron.core", "qalora_group_size": 16, "runtime_config": {"ephemeral_gpu_offload": False},
    "fan_in_fan_out": False, "lora_bias": False,
}


def _neutral(key: str, value: Any) -> bool:
    return value is None or value is False or value in ({}, [], "") or PEFT_NEUTRAL_DEFAULTS.get(key, object()) == value


def _check_peft_fields(raw: dict[str, Any], source: str) -> None:
    """Refuse, naming them, the settings this import does not implement, and mistyped ones.

    A field that changes what the adapter means (``layers_to_transform``, ``modules_to_save``,
    ``exclude_modules``, a PiSSA / LoftQ initialisation that rewrote the base...) must not be ignored:
    any field outside ``PEFT_FIELDS_READ`` is accepted only at its "off" value.
    """
    unsupported = sorted(k for k, v in raw.items() if k not in PEFT_FIELDS_READ and not _neutral(k, v))
    if raw.get("bias", "none") != "none":
        unsupported.insert(0, "bias")
    init = raw.get("init_lora_weights", True)
    if init not in (True, False, "gaussian"):
        unsupported.append("init_lora_weights")
    if unsupported:
        shown = ", ".join(f"{k}={raw[k]!r}" for k in unsupported)
        raise AdapterError(f"{source}: setting(s) not supported by this import: {shown}")

    from ..schema import MAX_RANK

    def bad(key: str, want: str) -> AdapterError:
        return AdapterError(f"{source}: '{key}' must be {want}, got {raw[key]!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_pos(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    # the ranks a saved model folder may hold (schema.MAX_RANK): a larger one would be imported, saved, then refused on load
    if "r" in raw and not (is_int(raw["r"]) and 1 <= raw["r"] <= MAX_RANK):
        raise bad("r", f"an integer from 1 to {MAX_RANK}")
    if "lora_alpha" in raw and not is_pos(raw["lora_alpha"]):
        raise bad("lora_alpha", "a finite number > 0")
    d = raw.get("lora_dropout", 0.0)
    if not (isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d < 1):
        raise bad("lora_dropout", "a number in [0, 1)")
    for key in ("use_rslora", "use_dora", "inference_mode"):
        if key in raw and not isinstance(raw[key], bool):
            raise bad(key, "true or false")
    for key, ok, want in (("rank_pattern", lambda v: is_int(v) and 1 <= v <= MAX_RANK, f"integers from 1 to {MAX_RANK}"),
                          ("alpha_pattern", is_pos, "finite numbers > 0")):
        pattern = raw.get(key) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and ok(v) for k, v in pattern.items()):
            raise bad(key, f"an object mapping module names to {want}")
        for k in pattern:
            try:
                re.compile(k)
            except re.error:
                raise AdapterError(f"{source}: '{key}' key {k!r} is not a valid pattern") from None
    targets = raw.get("target_modules")
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error:
            raise bad("target_modules", "a list of names, a valid regex or 'all-linear'") from None


def load_peft(model: Module, path: str | Path, adapter_name: str = "default") -> str:
    """Load a Hugging Face PEFT LoRA / DoRA adapter folder onto ``model`` as adapter ``adapter_name`` (made active)."""
    st = _safetensors()
    path = Path(path)
    source = str(path / CONFIG_FILE)
    raw = load_json(path / CONFIG_FILE)
    if not isinstance(raw, dict):
        raise AdapterError(f"{source}: not a PEFT adapter config")
    if raw.get("peft_type") != "LORA":
        raise AdapterError(f"{source}: peft_type {raw.get('peft_type')!r}; only 'LORA' (LoRA, rsLoRA, DoRA) is supported")
    _check_peft_fields(raw, source)
    weights_file = path / PEFT_WEIGHTS_FILE
    if not weights_file.is_file():
        other = " (adapter_model.bin is a PyTorch pickle: re-save it with safe_serialization=True)" if (path / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{weights_file}: file not found{other}")
    try:
        tensors = st.load_file(str(weights_file))
    except Exception as e:  # safetensors raises its own error types for damage and for dtypes NumPy lacks
        raise CheckpointError(f"{weights_file}: cannot read it ({e})") from None

    use_dora = bool(raw.get("use_dora", False))
    mapped: dict[str, tuple[str, str]] = {}  # PEFT key -> (module, kind)
    for key in tensors:
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)", key)
        if m is None:
            raise AdapterError(f"{weights_file}: unexpected key {key!r} (only lora_A, lora_B and lora_magnitude_vector are read)")
        mapped[key] = (m.group(1), m.group(2).split(".")[0])
    shapes = _module_shapes(model)
    keyed = list(dict.fromkeys(mod for mod, _ in mapped.values()))
    for mod in keyed:
        if mod not in shapes:
            raise AdapterError(f"{weights_file}: has weights for module {mod!r}, which this base lacks; it has: {', '.join(shapes)}")
    keyed.sort(key=list(shapes).index)
    modules = _peft_targets(raw.get("target_modules"), list(shapes), keyed, source)
    if not modules:
        raise AdapterError(f"{source}: target_modules {raw.get('target_modules')!r} matches no module of this base")
    kinds = ["lora_A", "lora_B"] + (["lora_magnitude_vector"] if use_dora else [])
    present = {(mod, kind) for mod, kind in mapped.values()}
    missing = [f"{PEFT_PREFIX}{mod}.{kind}" + ("" if kind == "lora_magnitude_vector" else ".weight")
               for mod in modules for kind in kinds if (mod, kind) not in present]
    if missing:
        raise AdapterError(f"{weights_file}: missing key(s) {', '.join(missing)}")
    extra = [k for k, (mod, kind) in mapped.items() if mod not in modules or kind not in kinds]
    if extra:
        raise AdapterError(f"{weights_file}: unexpected key(s) {', '.join(extra)} (not among the config's targets)")

    r, alpha = raw.get("r", 8), raw.get("lora_alpha", 8)
    arrays: dict[str, np.ndarray] = {}
    for key, (mod, kind) in mapped.items():
        arrays[f"{mod}.{kind}.{adapter_name}"] = np.asarray(tensors[key])
    check_finite(arrays, str(weights_file))
    ranks: dict[str, int] = {}
    for mod in modules:  # the config's rank (and rank_pattern) must be the tensors' rank: alpha / r depends on it
        a_shape = arrays[f"{mod}.lora_A.{adapter_name}"].shape
        want = _peft_pattern(raw.get("rank_pattern"), mod, r)
        if len(a_shape) != 2 or a_shape[0] != want:
            raise AdapterError(f"{weights_file}: lora_A of {mod!r} has shape {tuple(a_shape)}, but {source} says rank {want}")
        ranks[mod] = want
    alphas = {mod: _peft_pattern(raw.get("alpha_pattern"), mod, alpha) for mod in modules}
    init = raw.get("init_lora_weights", True)
    try:
        cfg = LoraConfig(
            r=r, lora_alpha=alpha, lora_dropout=raw.get("lora_dropout", 0.0),
            use_rslora=raw.get("use_rslora", False), use_dora=use_dora,
            init_lora_weights="gaussian" if init == "gaussian" else "kaiming",
            target_modules=modules,
            rank_pattern={mod: rm for mod, rm in ranks.items() if rm != r},
            alpha_pattern={mod: am for mod, am in alphas.items() if am != alpha},
        )
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{source}: {e}") from None
    if adapter_name in list_adapters(model):
        raise AdapterError(f"the model already has an adapter named {adapter_name!r}")
    _check_arrays(arrays, _expected_shapes(adapter_name, cfg, {m: shapes[m] for m in modules}), str(weights_file))
    _attach(model, adapter_name, cfg)
    _fill(model, arrays)
    set_adapter(model, adapter_name)
    return adapter_name
