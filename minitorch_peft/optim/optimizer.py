"""Optimizer base: parameter groups, each with its own hyper-parameters, and per-tensor state."""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

import numpy as np

from ..backend import backend_of
from ..errors import MinitorchPeftError
from ..tensor import Tensor


class OptimizerStateError(MinitorchPeftError, ValueError):
    """An optimizer state dict that does not fit this optimizer (other groups, tensors or shapes)."""


class Optimizer:
    """Holds ``param_groups`` (dicts with "params" and settings) and ``state`` (per trainable tensor).

    State is created lazily on a tensor's first update, so a frozen tensor (``requires_grad=False``)
    never gets any: no buffers, no work, its array untouched.
    """

    defaults: dict[str, Any]

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        self.defaults = defaults
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups: list[dict[str, Any]] = []
        for g in groups:
            group = {**defaults, **g, "params": list(g["params"])}
            unknown = set(group) - set(defaults) - {"params", "name"}
            if unknown:
                raise ValueError(f"unknown optimizer setting(s): {', '.join(sorted(unknown))}")
            if group["lr"] <= 0:
                raise ValueError(f"learning rate must be > 0, got {group['lr']}")
            self.param_groups.append(group)
        self.state: dict[int, dict[str, Any]] = {}  # keyed by id(tensor): tensors are not hashable by value

    def trainable(self) -> Iterator[tuple[dict[str, Any], Tensor]]:
        """(group, tensor) for every tensor that requires grad and has one."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is not None:
                    yield group, p

    def zero_grad(self) -> None:
        """Drop gradients (set to None, as PyTorch does by default: nothing to zero-fill)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def state_nbytes(self) -> int:
        """Bytes held by optimizer state arrays (measured from the live buffers)."""
        return sum(int(v.nbytes) for s in self.state.values() for v in s.values() if hasattr(v, "nbytes"))

    def step(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------ state

    def _indexed_params(self) -> list[Tensor]:
        """Every tensor of every group, in group order: position i is index i in ``state_dict``."""
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict[str, Any]:
        """PyTorch's layout: ``{"state": {i: {name: value}}, "param_groups": [{settings, "params": [i, ...]}]}``.

        Tensors are numbered 0, 1, ... through the groups in order (the state is keyed by that index, not
        by the tensor, so it can be saved and loaded into a fresh optimizer over a rebuilt model). Arrays are
        the live buffers, not copies, as in PyTorch; a tensor never updated (frozen) has no entry.
        """
        params = self._indexed_params()
        index = {id(p): i for i, p in enumerate(params)}
        groups: list[dict[str, Any]] = []
        start = 0
        for group in self.param_groups:
            n = len(group["params"])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + n))})
            start += n
        state = {index[k]: dict(v) for k, v in self.state.items() if k in index}
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()`` output: per-tensor state (copied, on each tensor's backend and dtype) and the
        groups' settings. Everything is checked (group sizes, indices, shapes) before anything changes."""
        try:
            saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        except (KeyError, TypeError):
            raise OptimizerStateError("an optimizer state dict needs 'state' and 'param_groups'") from None
        if not isinstance(saved_groups, (list, tuple)) or not all(isinstance(g, dict) for g in saved_groups):
            raise OptimizerStateError("'param_groups' must be a list of parameter groups (objects)")
        if not isinstance(saved_state, dict) or not all(isinstance(e, dict) for e in saved_state.values()):
            raise OptimizerStateError("'state' must map tensor indices to their state (objects)")
        if len(saved_groups) != len(self.param_groups):
            raise OptimizerStateError(
                f"the state has {len(saved_groups)} parameter group(s), this optimizer {len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if not isinstance(saved.get("params", ()), (list, tuple)):
                raise OptimizerStateError(f"parameter group {i}: 'params' must be a list of tensor indices, got {saved['params']!r}")
            if len(saved.get("params", ())) != len(group["params"]):
                raise OptimizerStateError(f"parameter group {i} has {len(saved.get('params', ()))} tensor(s) in the state, "
                                          f"{len(group['params'])} here")
            unknown = set(saved) - set(group) - {"params"}
            if unknown:
                raise OptimizerStateError(f"parameter group {i}: unknown setting(s) {', '.join(sorted(unknown))}")
            for k, v in saved.items():
                if k != "params" and (not _fits(v, group[k]) or k == "lr" and not v > 0):
                    raise OptimizerStateError(f"parameter group {i}: setting {k!r} is {v!r}, this optimizer's is {group[k]!r}")
        params = self._indexed_params()
        state: dict[int, dict[str, Any]] = {}
        for key, entry in saved_state.items():
            i = _index(key)
            if not 0 <= i < len(params):
                raise OptimizerStateError(f"state for tensor {i}, but the optimizer has {len(params)}")
            p = params[i]
            restored: dict[str, Any] = {}
            for name, value in entry.items():
                if hasattr(value, "shape") and getattr(value, "ndim", 0) > 0:
                    if tuple(value.shape) != tuple(p.shape):
                        raise OptimizerStateError(
                            f"state {name!r} of tensor {i} has shape {tuple(value.shape)}, the tensor {tuple(p.shape)}")
                    host = backend_of(value).to_numpy(value)
                    restored[name] = p.backend.asarray(np.array(host, copy=True), dtype=p.data.dtype)  # never aliased
                elif value is None:
                    restored[name] = None
                else:  # a count such as Adam's step (a 0-d array once it has been through a file)
                    count = _count(value)
                    if count is None:  # a negative step would reach sqrt(1 - beta2**step) < 0
                        raise OptimizerStateError(f"state {name!r} of tensor {i} must be a count (a whole number >= 0), got {value!r}")
                    restored[name] = count
            state[id(p)] = restored
        for saved, group in zip(saved_groups, self.param_groups):
            for k, v in saved.items():
                if k != "params":
                    group[k] = tuple(v) if isinstance(group.get(k), tuple) else v
        self.state = state


def _index(key: Any) -> int:
    """A state key as a tensor index: an int, or its decimal digits once it has been through a file."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key)
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    raise OptimizerStateError(f"state key {key!r} is not a tensor index")


def _count(value: Any) -> int | None:
    """``value`` as a count (a whole number >= 0, maybe a 0-d array), or None if it is not one."""
    if hasattr(value, "shape"):
        value = backend_of(value).to_numpy(value)
    a = np.asarray(value)
    if a.ndim or a.dtype.kind not in "iuf":
        return None
    x = a.item()
    return int(x) if math.isfinite(x) and x >= 0 and float(x).is_integer() else None


def _fits(saved: Any, current: Any) -> bool:
    """Whether a saved group setting can take the place of ``current``: the same kind of value (a bool for a
    bool, a finite number for a number, as many finite numbers for a tuple, a string or None for a name)."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and bool(np.isfinite(v))

    if isinstance(current, bool):
        return isinstance(saved, bool)
    if number(current):
        return number(saved)
    if isinstance(current, tuple):
        return isinstance(saved, (list, tuple)) and len(saved) == len(current) and all(number(v) for v in saved)
    if current is None or isinstance(current, str):
        return saved is None or isinstance(saved, str)
    return True
