"""Our side of the benchmark: the models (full, LoRA, merged LoRA, DoRA, QLoRA) and what we measure on them.

Every variant starts from the same seeded base MLP, so they differ only in the method. A method whose
module has not landed (or fails to build) becomes a ``Variant`` with ``note`` set and no model: the
report prints "(not available: ...)" for it and the rest of the benchmark runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .. import functional as F
from ..backend import Backend
from ..nn.layers import MLP
from ..nn.module import Module
from ..optim import Adam
from ..peft.config import LoraConfig
from ..peft.model import count_parameters, inject_adapters, lora_layers, merge_adapters
from ..random import manual_seed
from ..tensor import Tensor, no_grad

MODELS: dict[str, list[int]] = {"small": [784, 512, 256, 10], "medium": [784, 2048, 1024, 10]}
RANK, ALPHA, LR = 8, 16.0, 1e-3
QUANT = dict(quantize="nf4", double_quant=True, block_size=64)


@dataclass
class Variant:
    """One method on one model: the model and its optimizer, or the reason it is not available."""

    name: str
    model: Module | None = None
    optimizer: Adam | None = None
    note: str | None = None

    @property
    def available(self) -> bool:
        return self.model is not None


def base_model(dims: list[int], backend: Backend, seed: int) -> MLP:
    """The same randomly initialised MLP every time for a given seed."""
    manual_seed(seed)
    return MLP(dims).to(backend)


def lora_config(use_dora: bool = False) -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=ALPHA, use_dora=use_dora, target_modules="all-linear")


def _why(e: BaseException) -> str:
    if isinstance(e, ImportError):
        return f"not available: {e}"
    return f"not available: {type(e).__name__}: {e}"


def build(kind: str, dims: list[int], backend: Backend, seed: int, train: bool = True) -> Variant:
    """``kind`` is full, lora, lora_merged, dora or qlora; with ``train`` an Adam optimizer comes too."""
    model = base_model(dims, backend, seed)
    try:
        if kind == "full":
            model.unfreeze()
        elif kind in ("lora", "lora_merged"):
            inject_adapters(model, lora_config())
        elif kind == "dora":
            inject_adapters(model, lora_config(use_dora=True))
        elif kind == "qlora":
            inject_adapters(model, lora_config(), **QUANT)
        else:
            raise ValueError(f"unknown variant {kind!r}")
    except (ImportError, NotImplementedError, AttributeError, TypeError, RuntimeError, ValueError) as e:
        if kind not in ("dora", "qlora"):
            raise
        return Variant(kind, note=_why(e))
    model.to(backend)
    if kind != "full":
        _nonzero_adapters(model, seed)
    if kind == "lora_merged":
        merge_adapters(model)
    optimizer = Adam([p for p in model.parameters() if p.requires_grad], lr=LR) if train else None
    return Variant(kind, model, optimizer)


def _nonzero_adapters(model: Module, seed: int) -> None:
    """Give B small random values (it starts at zero), so that merged, DoRA and LoRA outputs all differ
    from the base output: a benchmark of a layer whose update is exactly zero could hide a shortcut."""
    rng = np.random.default_rng(seed + 1)
    for _, layer in lora_layers(model):
        for name in layer.lora_B.keys():
            p = layer.lora_B[name]
            p.data[...] = p.backend.asarray(rng.normal(0.0, 0.01, size=p.shape).astype(np.float32))


# --------------------------------------------------------------------------------------------- calls


def batch(dims: list[int], batch_size: int, backend: Backend, seed: int) -> tuple[Tensor, Tensor, np.ndarray, np.ndarray]:
    """A fixed random batch (x, labels) as tensors of ``backend``, and as host arrays."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, dims[0])).astype(np.float32)
    y = rng.integers(0, dims[-1], size=batch_size).astype(np.int64)
    return Tensor._make(backend.asarray(x), backend, False), Tensor._make(backend.asarray(y), backend, False), x, y


def forward_call(model: Module, x: Tensor) -> Callable[[], Any]:
    """One inference forward pass (no graph recorded)."""
    def call() -> Any:
        with no_grad():
            return model(x)
    return call


def step_call(variant: Variant, x: Tensor, y: Tensor) -> Callable[[], Any]:
    """One training step as the training loop does it: forward, loss, zero_grad, backward, Adam."""
    model, optimizer = variant.model, variant.optimizer
    assert model is not None and optimizer is not None

    def call() -> Any:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss
    return call


# --------------------------------------------------------------------------------------------- counts


def param_counts(full: Module, lora: Module) -> dict[str, int]:
    """Element counts read from the live parameter arrays."""
    c = count_parameters(lora)
    return {"full": full.num_parameters(), "lora_total": c["total"], "lora_trainable": c["trainable"],
            "lora_frozen": c["frozen"]}


def param_bytes(model: Module, trainable_only: bool = False) -> int:
    return sum(p.nbytes for p in model.parameters() if p.requires_grad or not trainable_only)


def grad_bytes(model: Module) -> int:
    """Bytes of the .grad arrays the last backward pass left (frozen tensors have none)."""
    return sum(int(p.grad.nbytes) for p in model.parameters() if p.grad is not None)


def quantized_base_bytes(full: Module, double_quant: bool) -> int:
    """Bytes of the frozen base with every Linear weight in NF4 (block 64): packed codes plus the quant
    state, plus the biases, which stay float32."""
    total = 0
    for name, p in full.named_parameters():
        if name.endswith("weight"):
            quantize_4bit = p.backend.kernels.quantize_4bit
            packed, state = quantize_4bit(p.data, "nf4", QUANT["block_size"], double_quant)
            total += int(packed.nbytes) + int(state.nbytes())
        else:
            total += p.nbytes
    return total


# --------------------------------------------------------------------------------------------- memory


def peak_step_bytes(call: Callable[[], Any], backend: Backend) -> int:
    """Peak bytes allocated while ``call`` runs, above what was live before it, as the backend's kernels
    measure it (tracemalloc on the CPU, the memory pool on a GPU)."""
    return backend.kernels.peak_bytes(call)


def sync_for(backend: Backend) -> Callable[[], None] | None:
    """What makes the clock honest on this backend: wait for the GPU (nothing to wait for on the CPU)."""
    return backend.kernels.synchronize
