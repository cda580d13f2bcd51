"""The same models in PyTorch, for ``bench --compare torch``. PyTorch is optional: importing this module
is the only place it is needed, and a missing install is one clear error.

The PyTorch models get exactly our weights (copied from the same seeded base MLP and adapters), the same
batch, the same Adam settings and the same number of threads. LoRA is computed the way Hugging Face PEFT
does it for a Linear without dropout: base(x) + B(A(x)) * s with a frozen base. DoRA follows PEFT's
formula too: with n = ||W + s B A||_row (detached, as in the paper), y = (m / n) * (x W^T + s B(A(x))) + b.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ..errors import MinitorchPeftError
from ..nn.module import Module
from ..peft.model import lora_layers


class TorchMissing(MinitorchPeftError, ValueError):
    """--compare torch without PyTorch installed."""


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise TorchMissing("--compare torch needs PyTorch, which is not installed here (pip install torch); "
                           "run without --compare to benchmark minitorch_peft alone") from None
    return torch


def torch_device(device: str) -> tuple[str | None, str | None]:
    """(device PyTorch runs on, None) or (None, why the comparison is skipped).

    ``device`` is where the backend's arrays live (its kernels' DEVICE: "cpu" or "cuda"). On a GPU
    backend the comparison needs PyTorch on the GPU too: a CPU-only PyTorch beside a GPU run
    would compare two different machines, so it is skipped (with the reason shown) rather than faked.
    """
    torch = import_torch()
    if device == "cuda":
        if not torch.cuda.is_available():
            return None, (f"PyTorch {torch.__version__} sees no CUDA device; comparing it on the CPU with a GPU "
                          "run would not be like for like")
        return "cuda", None
    return "cpu", None


def _np(a: Any) -> np.ndarray:
    return np.array(a.get() if hasattr(a, "get") else a, dtype=np.float32, copy=True)


def model_spec(ours: Module) -> list[dict[str, Any]]:
    """Our model as plain host arrays, one dict per Linear: weight, bias and, for an adapted layer, lora_A,
    lora_B, scaling (and magnitude for DoRA). This is what crosses to the PyTorch worker process (by file)."""
    adapters = {name: layer for name, layer in lora_layers(ours)}
    spec = []
    for name in ours.layer_names:
        mine = ours.get_submodule(name)
        w = adapters[name].base_weight() if name in adapters else mine.weight.data
        layer: dict[str, Any] = {"weight": _np(w), "bias": _np(mine.bias.data)}
        if name in adapters:
            ad_layer = adapters[name]
            ad = ad_layer.active_adapter
            layer.update(lora_A=_np(ad_layer.lora_A[ad].data), lora_B=_np(ad_layer.lora_B[ad].data),
                         scaling=float(ad_layer.scaling(ad)))
            if ad in ad_layer.lora_magnitude_vector:
                layer["magnitude"] = _np(ad_layer.lora_magnitude_vector[ad].data)
        spec.append(layer)
    return spec


def save_spec(spec: list[dict[str, Any]], path: str) -> None:
    """Write a model spec as one .npz (arrays as ``i.name``; the scalings as float arrays)."""
    arrays = {f"{i}.{k}": np.asarray(v, dtype=np.float32) for i, layer in enumerate(spec) for k, v in layer.items()}
    np.savez(path, **arrays)


def load_spec(path: str) -> list[dict[str, Any]]:
    with np.load(path, allow_pickle=False) as f:
        n = 1 + max(int(k.split(".", 1)[0]) for k in f.files)
        spec: list[dict[str, Any]] = [{} for _ in range(n)]
        for key in f.files:
            i, name = key.split(".", 1)
            spec[int(i)][name] = float(f[key]) if name == "scaling" else np.array(f[key])
    return spec


def build_model(ours: Module | list[dict[str, Any]], kind: str, device: str) -> tuple[Any, Any]:
    """(PyTorch module, its Adam optimizer) holding the same weights as ``ours`` (our model of variant ``kind``, or
    its ``model_spec``)."""
    torch = import_torch()
    nn = torch.nn
    spec = ours if isinstance(ours, list) else model_spec(ours)

    class LoRALinear(nn.Module):
        def __init__(self, base: Any, a: np.ndarray, b: np.ndarray, scaling: float, mag: np.ndarray | None) -> None:
            super().__init__()
            self.base = base.requires_grad_(False)
            self.lora_A = nn.Linear(a.shape[1], a.shape[0], bias=False)
            self.lora_B = nn.Linear(b.shape[1], b.shape[0], bias=False)
            with torch.no_grad():
                self.lora_A.weight.copy_(torch.from_numpy(a))
                self.lora_B.weight.copy_(torch.from_numpy(b))
            self.scaling = scaling
            self.magnitude = None if mag is None else nn.Parameter(torch.from_numpy(mag))

        def forward(self, x: Any) -> Any:
            if self.magnitude is None:
                return self.base(x) + self.lora_B(self.lora_A(x)) * self.scaling
            w = self.base.weight
            lora_w = self.lora_B.weight @ self.lora_A.weight
            norm = torch.linalg.vector_norm(w + self.scaling * lora_w.detach(), dim=1).detach()
            scale = (self.magnitude / norm).view(1, -1)
            y = scale * (torch.nn.functional.linear(x, w) + self.lora_B(self.lora_A(x)) * self.scaling)
            return y + self.base.bias if self.base.bias is not None else y

    class MLP(nn.Module):
        def __init__(self, layers: list[Any]) -> None:
            super().__init__()
            self.layers = nn.ModuleList(layers)

        def forward(self, x: Any) -> Any:
            for layer in self.layers[:-1]:
                x = torch.relu(layer(x))
            return self.layers[-1](x)

    layers = []
    for s in spec:
        w = s["weight"]
        lin = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)))
            lin.bias.copy_(torch.from_numpy(np.ascontiguousarray(s["bias"], dtype=np.float32)))
        if "lora_A" in s:
            mod: Any = LoRALinear(lin, np.array(s["lora_A"], dtype=np.float32), np.array(s["lora_B"], dtype=np.float32),
                                  s["scaling"], None if "magnitude" not in s else np.array(s["magnitude"], dtype=np.float32))
            if kind == "lora_merged":
                mod = _merged(torch, nn, mod)
            layers.append(mod)
        else:
            layers.append(lin)
    model = MLP(layers).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.Adam(trainable, lr=1e-3)


def _merged(torch: Any, nn: Any, mod: Any) -> Any:
    lin = nn.Linear(mod.base.in_features, mod.base.out_features)
    with torch.no_grad():
        lin.weight.copy_(mod.base.weight + mod.scaling * (mod.lora_B.weight @ mod.lora_A.weight))
        lin.bias.copy_(mod.base.bias)
    return lin


def batch(x: np.ndarray, y: np.ndarray, device: str) -> tuple[Any, Any]:
    torch = import_torch()
    return torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)


def forward_call(model: Any, x: Any) -> Callable[[], Any]:
    torch = import_torch()

    def call() -> Any:
        with torch.no_grad():
            return model(x)
    return call


def step_call(model: Any, optimizer: Any, x: Any, y: Any) -> Callable[[], Any]:
    torch = import_torch()
    ce = torch.nn.functional.cross_entropy

    def call() -> Any:
        loss = ce(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss
    return call


def sync_for(device: str) -> Callable[[], None] | None:
    if device == "cuda":
        torch = import_torch()
        return torch.cuda.synchronize
    return None


def set_threads(n: int) -> int:
    """Give PyTorch's intra-op pool ``n`` threads (what NumPy's BLAS uses) and return what it reports."""
    torch = import_torch()
    torch.set_num_threads(n)
    return int(torch.get_num_threads())
