"""A resumable run: the model folder also holds the optimizer state, the epoch reached and the history.

``save_run`` writes, in the same atomic save as the model (``checkpoint.save_model``):

- ``optimizer.npz``: the optimizer's state arrays, keyed ``<tensor index>.<name>`` (``0.m``, ``0.v``,
  ``0.step``, ...; PyTorch's layout, see ``Optimizer.state_dict``);
- ``history.npz``: ``loss_per_step`` (every step's training loss so far);
- in ``config.json``, ``"resume"``: the epoch reached, the optimizer's type and parameter groups (settings
  and tensor indices), which tensors have state, the random generator's state (dropout masks), the
  training seconds and the parameter counts.

``read_run`` reads them back and ``RunState.restore`` puts them into a rebuilt optimizer, so that the
remaining epochs run exactly as they would have without the stop (bit-identical weights). The folder is
untrusted: ``read_run`` checks every saved field's type and range (one CheckpointError naming the file and
the field) and reads each ``.npz`` within what the run can hold, before anything is built.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .checkpoint import read_config, save_model
from .data.datasets import IMAGE_SHAPE
from .data.idx import MAX_IDX_BYTES
from .optim import Optimizer, OptimizerStateError
from .random import generator
from .schema import ADAPTER_NAME, MAX_LAYERS, _is_int, _is_number, _type_name, implied_shapes
from .serialize import CheckpointError, load_json, load_npz

OPTIMIZER_FILE = "optimizer.npz"
HISTORY_FILE = "history.npz"
# The most training samples a data file can hold (an image file is at most MAX_IDX_BYTES): so the most
# steps an epoch can take (batch size 1), hence the most losses history.npz can hold per epoch.
MAX_TRAIN_SAMPLES = MAX_IDX_BYTES // math.prod(IMAGE_SHAPE)
_STATE_KEY = re.compile(r"([0-9]+)\.(.+)")  # optimizer.npz: '<tensor index>.<name>' (fullmatch)

Check = tuple[Callable[[Any], bool], str]  # (test, what the value must be)


def _text(v: Any) -> bool:
    return isinstance(v, str)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


# config.json's "training": TrainConfig's fields as train saves them. The types, and the ranges that
# TrainConfig.validate holds for every method, so a damaged file is named here rather than failing later
# (the method-specific ranges, e.g. --block-size for qlora only, are validate's, as for a flag).
TRAINING_FIELDS: dict[str, Check] = {
    **{k: (_text, "a string") for k in ("backend", "dataset", "method", "quant", "output")},
    **{k: (_optional(_text), "a string or null") for k in ("data_dir", "base", "resume")},
    **{k: (lambda v: isinstance(v, bool), "true or false") for k in ("rslora", "double_quant", "save_every_epoch")},
    **{k: (lambda v: _is_int(v) and v >= 1, "an integer >= 1") for k in ("rank", "epochs", "batch_size")},
    **{k: (_is_number, "a finite number") for k in ("alpha", "dropout", "loraplus_ratio")},
    "block_size": (_is_int, "an integer"),
    "lr": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**63, "an integer from 0 to 2**63 - 1"),
    "limit": (_optional(lambda v: _is_int(v) and v >= 1), "an integer >= 1 or null"),
    "targets": (lambda v: isinstance(v, list) and 0 < len(v) <= MAX_LAYERS * 4 and all(isinstance(t, str) and t for t in v),
                "a non-empty list of module names"),
    "adapter_name": (lambda v: isinstance(v, str) and ADAPTER_NAME.match(v) is not None,
                     "1 to 128 characters without dots, spaces or slashes"),
}
# a parameter group's settings in "resume.optimizer" (Adam's, AdamW's, SGD's; the optimizer refuses others)
GROUP_SETTINGS: dict[str, Check] = {
    "lr": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "eps": (lambda v: _is_number(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "momentum": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "betas": (lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v),
              "a list of two numbers in [0, 1)"),
    "decoupled": (lambda v: isinstance(v, bool), "true or false"),
    "name": (_optional(_text), "a string or null"),
}


@dataclass
class RunState:
    """Where a run stands after ``epoch`` epochs."""

    epoch: int = 0
    accuracies: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)
    optimizer_arrays: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] | None = None
    rng_ranks: list[dict[str, Any]] | None = None  # data parallel: every rank's generator state, rank order
    source: str = ""

    def restore(self, optimizer: Optimizer) -> None:
        """Load the saved optimizer state into ``optimizer`` and the saved random state into the generator."""
        if self.optimizer.get("type") != type(optimizer).__name__:
            raise CheckpointError(f"{self.source}: optimizer {self.optimizer.get('type')!r} saved, {type(optimizer).__name__} here")
        state: dict[int, dict[str, Any]] = {int(i): {} for i in self.optimizer.get("with_state", [])}
        for key, value in self.optimizer_arrays.items():
            m = _STATE_KEY.fullmatch(key)
            if m is None:
                raise CheckpointError(f"{self.source}/{OPTIMIZER_FILE}: unexpected key {key!r}")
            state.setdefault(int(m.group(1)), {})[m.group(2)] = value if value.ndim else int(value)
        try:
            optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.get("param_groups", [])})
        except OptimizerStateError as e:
            raise CheckpointError(f"{self.source}: {e}") from None
        if self.rng is not None:
            try:
                generator().bit_generator.state = self.rng
            except (TypeError, ValueError, KeyError) as e:
                raise CheckpointError(f"{self.source}: bad random generator state ({e})") from None


def optimizer_files(optimizer: Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(JSON part, arrays) of ``optimizer.state_dict()``: counts go to 0-d int64 arrays beside the buffers."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # a wrapper (DistributedOptimizer) saves what it wraps
    sd = optimizer.state_dict()
    arrays: dict[str, Any] = {}
    for i, entry in sd["state"].items():
        for name, value in entry.items():
            if value is not None:
                arrays[f"{i}.{name}"] = value if hasattr(value, "shape") else np.asarray(value, dtype=np.int64)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return {"type": type(optimizer).__name__, "param_groups": groups, "with_state": sorted(sd["state"])}, arrays


def save_run(model: Any, optimizer: Optimizer, path: str | Path, training: dict[str, Any], state: RunState) -> Path:
    """Save ``model`` to folder ``path`` with everything ``read_run`` needs to continue the run."""
    meta, arrays = optimizer_files(optimizer)
    resume = {"epoch": state.epoch, "optimizer": meta, "rng": generator().bit_generator.state,
              "train_seconds": state.train_seconds, "params": state.counts}
    if state.rng_ranks is not None:
        resume["rng_ranks"] = state.rng_ranks
    extra = {"training": {**training, "test_accuracy": state.accuracies}, "resume": resume}
    files = {OPTIMIZER_FILE: arrays, HISTORY_FILE: {"loss_per_step": np.asarray(state.losses, dtype=np.float64)}}
    return save_model(model, path, extra=extra, files=files)


def read_run(path: str | Path) -> tuple[dict[str, Any], RunState]:
    """The saved run's settings (``config.json``'s "training") and its ``RunState``; a CheckpointError names
    the file and the field of anything missing (e.g. a folder saved before runs were resumable), mistyped or
    out of range. Everything is checked here, before a model or optimizer is built: the settings' types,
    the model's schema (``read_config``), and the ``.npz`` files' sizes from their headers, bounded by what
    the run can hold."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model folder not found")
    source = f"{path}/config.json"
    config = load_json(path / "config.json")
    training = config.get("training") if isinstance(config, dict) else None
    resume = config.get("resume") if isinstance(config, dict) else None
    if not isinstance(training, dict) or not isinstance(resume, dict):
        raise CheckpointError(f"{path}: no resumable run there (config.json has no 'training'/'resume'; "
                              "folders written by train since resume support have them)")
    epoch, accuracies = resume.get("epoch"), training.get("test_accuracy")
    if not _is_int(epoch) or epoch < 1 or not isinstance(accuracies, list) or len(accuracies) != epoch:
        raise CheckpointError(f"{source}: 'resume.epoch' and 'training.test_accuracy' do not agree")
    bad = [a for a in accuracies if not (_is_number(a) and 0 <= a <= 1)]
    if bad:
        raise CheckpointError(f"{source}: 'training.test_accuracy' must be a list of accuracies (numbers in [0, 1]), "
                              f"it holds {bad[0]!r}")
    _check_fields(training, TRAINING_FIELDS, "training", source)
    _check_fields(resume, {"train_seconds": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
                           "params": (lambda v: isinstance(v, dict) and all(_is_int(n) and n >= 0 for n in v.values()),
                                      "an object mapping names to parameter counts (integers >= 0)")}, "resume", source)
    optimizer = _check_optimizer(resume.get("optimizer"), source)
    model_config = read_config(path)  # the model's schema, and its arrays' shapes from the headers: they bound the files
    # history.npz: one float64 loss per step, at most MAX_TRAIN_SAMPLES steps an epoch (batch size 1)
    history = load_npz(path / HISTORY_FILE, finite=True, max_bytes=8 * epoch * MAX_TRAIN_SAMPLES)
    losses = history.get("loss_per_step")
    if losses is None or losses.ndim != 1:
        raise CheckpointError(f"{path}/{HISTORY_FILE}: 'loss_per_step' must be a 1-D array")
    return training, RunState(
        epoch=epoch, accuracies=[float(a) for a in accuracies], losses=[float(v) for v in losses],
        train_seconds=float(resume.get("train_seconds", 0.0)), counts=dict(resume.get("params") or {}),
        optimizer=optimizer, optimizer_arrays=_optimizer_arrays(path, model_config), rng=resume.get("rng"),
        rng_ranks=_random_states(resume.get("rng_ranks"), path), source=str(path),
    )


def _check_fields(section: dict[str, Any], checks: dict[str, Check], name: str, source: str) -> None:
    """Every field of ``section`` that ``checks`` knows and that is there passes its test; else one CheckpointError
    naming the file and the field (``name.field``), as ``schema`` does for a model's fields."""
    for key, (ok, want) in checks.items():
        if key in section and not ok(section[key]):
            raise CheckpointError(f"{source}: '{name}.{key}' must be {want}, got {section[key]!r}")


def _check_optimizer(optimizer: Any, source: str) -> dict[str, Any]:
    """'resume.optimizer': its type, parameter groups (tensor indices and settings) and the tensors with state."""
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list):
        raise CheckpointError(f"{source}: 'resume.optimizer' must hold the parameter groups")
    _check_fields(optimizer, {"type": (_text, "a string"),
                              "with_state": (lambda v: isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v),
                                             "a list of tensor indices (integers >= 0)")}, "resume.optimizer", source)
    for i, group in enumerate(optimizer["param_groups"]):
        at = f"resume.optimizer.param_groups[{i}]"
        if not isinstance(group, dict):
            raise CheckpointError(f"{source}: '{at}' must be an object (settings and tensor indices), got {_type_name(group)}")
        _check_fields(group, {"params": (lambda v: isinstance(v, list) and all(_is_int(j) and j >= 0 for j in v),
                                         "a list of tensor indices (integers >= 0)"), **GROUP_SETTINGS}, at, source)
    return optimizer


def _optimizer_arrays(path: Path, model: dict[str, Any]) -> dict[str, np.ndarray]:
    """optimizer.npz, read within what the model saved in ``path`` can need: two moments (Adam's m and v) of
    every parameter, 8 bytes each at most, and a step count per tensor. Keys ``<index>.<name>``; a 0-d array
    is a count (>= 0: a negative Adam step reaches the square root of a negative number); the moments finite."""
    base, adapters = implied_shapes(model)
    dims = model["architecture"]["dims"]
    n_params = sum(a * b + b for a, b in zip(dims[:-1], dims[1:])) + sum(math.prod(s) for s in adapters.values())
    arrays = load_npz(path / OPTIMIZER_FILE, finite=True, max_bytes=16 * n_params + 8 * (len(base) + len(adapters)))
    for key, value in arrays.items():
        if _STATE_KEY.fullmatch(key) is None:
            raise CheckpointError(f"{path}/{OPTIMIZER_FILE}: unexpected key {key!r} (not '<tensor index>.<name>')")
        if value.ndim == 0 and (value.dtype.kind not in "iu" or value < 0):
            raise CheckpointError(f"{path}/{OPTIMIZER_FILE}: {key!r} must be a count (an integer >= 0), got {value.item()!r}")
    return arrays


def _random_states(value: Any, path: Path) -> list[dict[str, Any]] | None:
    """'resume.rng_ranks' (absent in a one-process run): a list of generator states, one per rank."""
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise CheckpointError(f"{path}/config.json: 'resume.rng_ranks' must be a list of generator states, one per rank")
    scratch = generator().bit_generator.__class__()
    for rank, v in enumerate(value):  # checked here, where every rank reads the same file and fails alike
        try:
            scratch.state = v
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}/config.json: bad random generator state of rank {rank} ({e})") from None
    return value
