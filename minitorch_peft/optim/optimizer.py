"""Optimizer base: parameter groups, each with its own hyper-parameters, and per-tensor state."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from ..tensor import Tensor


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
