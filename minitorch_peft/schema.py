"""The schema of a model folder's ``config.json`` and of an adapter entry, checked before anything is allocated.

``validate_model_config`` checks types (a bool is a bool, an int is not a float), ranges, adapter names and
a sane total size; ``check_against_arrays`` then compares the shapes the config implies with the shapes
the ``.npz`` headers declare (``serialize.npz_headers``: no array data read), so a config claiming a
layer of 10**12 units is refused in microseconds instead of allocating memory. Every problem is one
``CheckpointError`` naming the file and the field.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .serialize import CheckpointError

FORMAT = "minitorch_peft"
VERSION = 1
FLOAT_DTYPES = ("float32", "float64")
MAX_LAYERS = 64
MAX_PARAMETERS = 1 << 30  # about 4 GiB of float32: far above any model this project trains
MAX_RANK = 1 << 16
ADAPTER_NAME = re.compile(r"^[^.\s/\\]{1,128}$")  # a key part of fc1.lora_A.<name>: no dots, spaces or slashes


def check_adapter_name(name: Any, what: str = "adapter name") -> str:
    """An adapter name is 1 to 128 characters without dots, whitespace or slashes: it becomes part of array keys."""
    if not isinstance(name, str) or not ADAPTER_NAME.match(name):
        raise CheckpointError(f"{what} must be 1 to 128 characters without dots, spaces or slashes, got {name!r}")
    return name


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


def validate_adapter_entry(name: Any, raw: Any, where: str) -> None:
    """One adapter's settings as saved (LoraConfig's fields): every field typed and in range, none unknown."""
    from .peft.config import INITS, LoraConfig

    check_adapter_name(name, f"{where}: adapter name")
    at = f"{where}: adapter {name!r}"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{at}: settings must be an object, got {_type_name(raw)}")
    known = set(LoraConfig.__dataclass_fields__) | {"method"}  # 'method' is written by save_adapters
    unknown = sorted(k for k in raw if k not in known)
    if unknown:
        raise CheckpointError(f"{at}: unknown field(s) {', '.join(map(repr, unknown))}")

    def field(key: str, ok: bool, want: str) -> None:
        if key in raw and not ok:
            raise CheckpointError(f"{at}: '{key}' must be {want}, got {raw[key]!r}")

    r, alpha, dropout = raw.get("r", 8), raw.get("lora_alpha", 16.0), raw.get("lora_dropout", 0.0)
    field("r", _is_int(r) and 1 <= r <= MAX_RANK, f"an integer from 1 to {MAX_RANK}")
    field("lora_alpha", _is_number(alpha) and alpha > 0, "a finite number > 0")
    field("lora_dropout", _is_number(dropout) and 0 <= dropout < 1, "a number in [0, 1)")
    for key in ("use_rslora", "use_dora", "dora_norm_grad"):
        field(key, isinstance(raw.get(key), bool), "true or false")
    field("init_lora_weights", raw.get("init_lora_weights") in INITS, f"one of {', '.join(INITS)}")
    field("method", raw.get("method") in ("lora", "dora"), "'lora' or 'dora'")
    targets = raw.get("target_modules", [])
    field("target_modules", targets == "all-linear" or (isinstance(targets, list) and 0 < len(targets) <= MAX_LAYERS * 4
                                                          and all(isinstance(t, str) and t for t in targets)),
          "a non-empty list of module names or 'all-linear'")
    for key, check, want in (("rank_pattern", lambda v: _is_int(v) and 1 <= v <= MAX_RANK, f"integers from 1 to {MAX_RANK}"),
                             ("alpha_pattern", lambda v: _is_number(v) and v > 0, "finite numbers > 0")):
        pattern = raw.get(key, {})
        if not isinstance(pattern, dict):
            raise CheckpointError(f"{at}: '{key}' must map module names to {want}, got {pattern!r}")
        for module, v in pattern.items():
            if not check(v):
                raise CheckpointError(f"{at}: '{key}[{module!r}]' must be one of {want}, got {v!r}")


def validate_model_config(config: Any, source: str) -> None:
    """A model folder's ``config.json``: format, version, architecture, adapters, quantization; sizes sane."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not a {FORMAT} model config")
    if config.get("version") != VERSION:
        raise CheckpointError(f"{source}: config version {config.get('version')!r}, this build reads {VERSION}")
    arch = config.get("architecture")
    if not isinstance(arch, dict):
        raise CheckpointError(f"{source}: 'architecture' must be an object, got {_type_name(arch)}")
    if arch.get("type", "MLP") != "MLP":
        raise CheckpointError(f"{source}: 'architecture.type' {arch.get('type')!r} is not known; this build reads 'MLP'")
    dims = arch.get("dims")
    if (not isinstance(dims, list) or not 2 <= len(dims) <= MAX_LAYERS + 1
            or not all(_is_int(d) and 0 < d for d in dims)):
        raise CheckpointError(f"{source}: 'architecture.dims' must be a list of 2 to {MAX_LAYERS + 1} positive integers, got {dims!r}")
    n_params = sum(a * b + b for a, b in zip(dims[:-1], dims[1:]))
    if n_params > MAX_PARAMETERS:
        raise CheckpointError(f"{source}: 'architecture.dims' {dims} means {n_params:,} parameters, "
                              f"more than the {MAX_PARAMETERS:,} this build loads")
    dtype = arch.get("dtype", "float32")  # absent in folders written before dtypes were recorded
    if dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"{source}: 'architecture.dtype' must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    adapters = config.get("adapters")
    if adapters is None:
        return
    if not isinstance(adapters, dict) or not adapters:
        raise CheckpointError(f"{source}: 'adapters' must map adapter names to their settings")
    for name, raw in adapters.items():
        validate_adapter_entry(name, raw, source)
    active = config.get("active_adapter")
    if active is not None and (not isinstance(active, str) or active not in adapters):
        raise CheckpointError(f"{source}: 'active_adapter' {active!r} is not one of the adapters ({', '.join(adapters)})")
    validate_quantization(config.get("quantization"), source)


def _matches(module: str, target: str) -> bool:
    return module == target or module.endswith("." + target)


def implied_shapes(config: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(base, adapters): key -> shape the arrays must have, for a config ``validate_model_config`` accepted.

    A base layer's weight is ``fcN.weight`` (out, in), or ``fcN.weight_packed`` (ceil(out*in/2),) when 4-bit.
    """
    from .peft.config import LoraConfig

    dims = config["architecture"]["dims"]
    names = [f"fc{i + 1}" for i in range(len(dims) - 1)]
    quantized = bool(config.get("quantization")) and bool(config.get("adapters"))
    base: dict[str, tuple[int, ...]] = {}
    adapters: dict[str, tuple[int, ...]] = {}
    targeted: set[str] = set()
    for adapter, raw in (config.get("adapters") or {}).items():
        cfg = LoraConfig.from_dict(raw)
        targets = names if cfg.target_modules == "all-linear" else cfg.target_modules
        for name, n_in, n_out in zip(names, dims[:-1], dims[1:]):
            if not any(_matches(name, t) for t in targets):
                continue
            targeted.add(name)
            r = cfg.for_module(name).r
            adapters[f"{name}.lora_A.{adapter}"] = (r, n_in)
            adapters[f"{name}.lora_B.{adapter}"] = (n_out, r)
            if cfg.use_dora:
                adapters[f"{name}.lora_magnitude_vector.{adapter}"] = (n_out,)
    for name, n_in, n_out in zip(names, dims[:-1], dims[1:]):
        base[f"{name}.bias"] = (n_out,)
        if quantized and name in targeted:
            base[f"{name}.weight_packed"] = (-(-n_in * n_out // 2),)
        else:
            base[f"{name}.weight"] = (n_out, n_in)
    return base, adapters


def check_against_arrays(expected: dict[str, tuple[int, ...]], headers: dict[str, tuple[tuple[int, ...], Any]],
                         source: str) -> None:
    """Every array the config implies is in the file with that shape (checked on headers, before loading)."""
    for key, shape in expected.items():
        if key not in headers:
            raise CheckpointError(f"{source}: missing array {key!r} that the config implies")
        if headers[key][0] != shape:
            raise CheckpointError(f"{source}: array {key!r} has shape {headers[key][0]}, the config implies {shape}")


def validate_quantization(quant: Any, source: str) -> None:
    """A saved 'quantization' entry: null, or {"quant_type", "double_quant", "block_size"} with sane values."""
    if quant is not None:
        from .backend import QUANT_TYPES

        if not isinstance(quant, dict):
            raise CheckpointError(f"{source}: 'quantization' must be an object or null, got {_type_name(quant)}")
        unknown = sorted(k for k in quant if k not in ("quant_type", "double_quant", "block_size"))
        if unknown:
            raise CheckpointError(f"{source}: 'quantization' has unknown field(s) {', '.join(map(repr, unknown))}")
        if quant.get("quant_type") not in QUANT_TYPES:
            raise CheckpointError(f"{source}: 'quantization.quant_type' must be one of {', '.join(QUANT_TYPES)}, got {quant.get('quant_type')!r}")
        if not isinstance(quant.get("double_quant", True), bool):
            raise CheckpointError(f"{source}: 'quantization.double_quant' must be true or false, got {quant.get('double_quant')!r}")
        block = quant.get("block_size", 64)
        if not (_is_int(block) and 32 <= block <= 4096 and block & (block - 1) == 0):
            raise CheckpointError(f"{source}: 'quantization.block_size' must be a power of two from 32 to 4096, got {block!r}")
