"""A resumable run: the model folder also holds the optimizer state, the epoch reached and the history.

``save_run`` writes, in the same atomic save as the model (``checkpoint.save_model``):

- ``optimizer.npz``: the optimizer's state arrays, keyed ``<tensor index>.<name>`` (``0.m``, ``0.v``,
  ``0.step``, ...; PyTorch's layout, see ``Optimizer.state_dict``);
- ``history.npz``: ``loss_per_step`` (every step's training loss so far);
- in ``config.json``, ``"resume"``: the epoch reached, the optimizer's type and parameter groups (settings
  and tensor indices), which tensors have state, the random generator's state (dropout masks), the
  training seconds and the parameter counts.

``read_run`` reads them back and ``RunState.restore`` puts them into a rebuilt optimizer, so that the
remaining epochs run exactly as they would have without the stop (bit-identical weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import save_model
from .optim import Optimizer, OptimizerStateError
from .random import generator
from .serialize import CheckpointError, load_json, load_npz

OPTIMIZER_FILE = "optimizer.npz"
HISTORY_FILE = "history.npz"


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
            index, _, name = key.partition(".")
            if not index.isdigit() or not name:
                raise CheckpointError(f"{self.source}/{OPTIMIZER_FILE}: unexpected key {key!r}")
            state.setdefault(int(index), {})[name] = value if value.ndim else int(value)
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
    what is missing (e.g. a folder saved before runs were resumable)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: model folder not found")
    config = load_json(path / "config.json")
    training = config.get("training") if isinstance(config, dict) else None
    resume = config.get("resume") if isinstance(config, dict) else None
    if not isinstance(training, dict) or not isinstance(resume, dict):
        raise CheckpointError(f"{path}: no resumable run there (config.json has no 'training'/'resume'; "
                              "folders written by train since resume support have them)")
    epoch, accuracies = resume.get("epoch"), training.get("test_accuracy")
    if not isinstance(epoch, int) or epoch < 1 or not isinstance(accuracies, list) or len(accuracies) != epoch:
        raise CheckpointError(f"{path}/config.json: 'resume.epoch' and 'training.test_accuracy' do not agree")
    optimizer = resume.get("optimizer")
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("param_groups"), list):
        raise CheckpointError(f"{path}/config.json: 'resume.optimizer' must hold the parameter groups")
    history = load_npz(path / HISTORY_FILE)
    losses = history.get("loss_per_step")
    if losses is None or losses.ndim != 1:
        raise CheckpointError(f"{path}/{HISTORY_FILE}: 'loss_per_step' must be a 1-D array")
    return training, RunState(
        epoch=epoch, accuracies=[float(a) for a in accuracies], losses=[float(v) for v in losses],
        train_seconds=float(resume.get("train_seconds", 0.0)), counts=dict(resume.get("params") or {}),
        optimizer=optimizer, optimizer_arrays=load_npz(path / OPTIMIZER_FILE), rng=resume.get("rng"),
        rng_ranks=_random_states(resume.get("rng_ranks"), path), source=str(path),
    )


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
