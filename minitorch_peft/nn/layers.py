"""Layers: Linear, ReLU, Dropout, Sequential and the MLP of the main job."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from .. import functional as F
from ..backend import Backend, get_backend
from ..random import generator
from ..tensor import Tensor, get_default_dtype
from .module import Module, Parameter


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, a: float = math.sqrt(5), dtype: Any = None) -> np.ndarray:
    """U(-b, b) with b = sqrt(6 / ((1 + a^2) fan_in)): PyTorch's default for Linear weights."""
    bound = math.sqrt(6.0 / ((1.0 + a * a) * fan_in))
    return generator().uniform(-bound, bound, size=shape).astype(dtype or get_default_dtype())


class Linear(Module):
    """y = x @ W^T + b with W (out_features, in_features), initialised as PyTorch does."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: Any = None,
        backend: str | Backend = "numpy",
    ) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"Linear needs positive sizes, got in={in_features}, out={out_features}")
        self.in_features, self.out_features = in_features, out_features
        be = get_backend(backend)
        self.weight = Parameter(be.asarray(kaiming_uniform((out_features, in_features), in_features, dtype=dtype)))
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            b = generator().uniform(-bound, bound, size=out_features).astype(dtype or get_default_dtype())
            self.bias: Parameter | None = Parameter(be.asarray(b))
        else:
            self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class ReLU(Module):
    """y = max(x, 0)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x)


class Dropout(Module):
    """Inverted dropout in training mode, identity in eval mode."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Sequential(Module):
    """Modules applied in order; children are named "0", "1", ..."""

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        for i, m in enumerate(modules):
            setattr(self, str(i), m)

    def forward(self, x: Tensor) -> Tensor:
        for m in self._modules.values():
            x = m(x)
        return x


class MLP(Module):
    """Linear layers ``fc1..fcN`` with ReLU between them: MLP([784, 512, 256, 10]) is the main job's net."""

    def __init__(self, dims: Sequence[int] = (784, 512, 256, 10), dtype: Any = None, backend: str | Backend = "numpy") -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"MLP needs at least an input and an output size, got {list(dims)}")
        self.dims = list(dims)
        self.layer_names = [f"fc{i + 1}" for i in range(len(dims) - 1)]
        for name, n_in, n_out in zip(self.layer_names, dims[:-1], dims[1:]):
            setattr(self, name, Linear(n_in, n_out, dtype=dtype, backend=backend))

    def forward(self, x: Tensor) -> Tensor:
        # look layers up by name each call: adapter injection swaps them in place
        *hidden, last = self.layer_names
        for name in hidden:
            x = F.relu(getattr(self, name)(x))
        return getattr(self, last)(x)

    def extra_repr(self) -> str:
        return " -> ".join(map(str, self.dims))
