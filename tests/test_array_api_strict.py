"""The engine on a strict array-API namespace: no NumPy-only call may hide outside ``kernels/``.

A backend over ``array_api_strict`` (arrays with only the standard's functions and methods: no
``.reshape``/``.astype`` methods, no ``swapaxes``/``transpose``, no bool arithmetic, no implicit
NumPy conversion) runs every autograd op, the functional API, Linear, LoRALinear, an MLP with
adapters and the optimizers. Each result must stay a strict array and match the NumPy backend. A
NumPy-only call in ops.py, tensor.py, function.py, functional.py, nn/, optim/ or peft/lora.py makes
these tests fail, and with it the CuPy backend on CuPy versions that lack that call.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import array_api_strict as xs
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import strict_kernels  # noqa: E402
from op_cases import OPS, r  # noqa: E402

import minitorch_peft.backend as backend_module  # noqa: E402
from minitorch_peft import Tensor, manual_seed, nn, optim  # noqa: E402
from minitorch_peft import functional as F  # noqa: E402
from minitorch_peft.backend import Backend, backend_of, get_backend, register_backend  # noqa: E402
from minitorch_peft.peft import LoraConfig  # noqa: E402
from minitorch_peft.peft.lora import LoRALinear  # noqa: E402
from minitorch_peft.peft.model import inject_adapters  # noqa: E402

STRICT_ARRAY = type(xs.asarray(0.0))


@pytest.fixture
def strict(monkeypatch: pytest.MonkeyPatch) -> Backend:
    monkeypatch.setattr(backend_module, "_cache", dict(backend_module._cache))
    return register_backend(Backend("strict", xs, strict_kernels))


def leaves(be: Backend, arrays: list[np.ndarray]) -> list[Tensor]:
    return [Tensor(be.asarray(np.array(a)), requires_grad=True, backend=be) for a in arrays]


def run(be: Backend, fn: Callable[..., Tensor], arrays: list[np.ndarray], seed: int) -> tuple[Tensor, list[Tensor]]:
    """fn on fresh leaves of ``be``, back-propagated with a fixed random output gradient."""
    ts = leaves(be, arrays)
    manual_seed(seed)  # the same dropout mask on both backends
    out = fn(*ts)
    proj = np.random.default_rng(seed).standard_normal(out.shape).astype(np.float64)
    out.backward(be.asarray(proj, dtype=out.data.dtype))
    return out, ts


def check_same(fn: Callable[..., Tensor], *arrays: np.ndarray, strict: Backend, seed: int = 0, rtol: float = 1e-10) -> None:
    out_np, ts_np = run(get_backend("numpy"), fn, list(arrays), seed)
    out_st, ts_st = run(strict, fn, list(arrays), seed)
    assert isinstance(out_st.data, STRICT_ARRAY), f"output fell off the strict backend: {type(out_st.data)}"
    assert out_st.backend is strict
    np.testing.assert_allclose(strict.to_numpy(out_st.data), out_np.numpy(), rtol=rtol, atol=1e-12)
    for i, (a, b) in enumerate(zip(ts_np, ts_st)):
        if a.grad is None:
            assert b.grad is None
            continue
        assert isinstance(b.grad, STRICT_ARRAY), f"input {i}: gradient is a {type(b.grad)}"
        np.testing.assert_allclose(np.asarray(b.grad), a.grad, rtol=rtol, atol=1e-12, err_msg=f"input {i}")


@pytest.mark.parametrize("name", sorted(OPS))
def test_op_forward_backward_on_strict_arrays(name: str, strict: Backend) -> None:
    fn, arrays = OPS[name]
    check_same(fn, *arrays, strict=strict)


def test_backend_of_finds_the_registered_backend(strict: Backend) -> None:
    a = xs.asarray([1.0, 2.0])
    assert backend_of(a) is strict and strict.owns(a) and not strict.owns(np.ones(2))
    assert Tensor(a).backend is strict  # no silent conversion to NumPy
    assert backend_of(np.ones(2)).name == "numpy"


def test_helpers_bind_array_api_names(strict: Backend) -> None:
    assert strict.astype is xs.astype and strict.permute_dims is xs.permute_dims
    assert strict.matrix_transpose is xs.matrix_transpose


def _params(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in model.state_dict().items()}


def _lora_layer(be: Backend, dropout: float) -> LoRALinear:
    manual_seed(3)
    layer = LoRALinear(6, 4, r=2, alpha=4.0, dropout=dropout, backend=be)
    # B starts at zero (so dA would be zero too): give it values, the same on both backends
    layer.lora_B["default"].data = be.asarray(np.random.default_rng(5).standard_normal((4, 2)).astype(np.float32))
    return layer


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_linear_and_adam_on_strict_arrays(strict: Backend, dropout: float) -> None:
    results = {}
    for be in (get_backend("numpy"), strict):
        layer = _lora_layer(be, dropout)
        opt = optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
        x = Tensor(be.asarray(r(5, 6).astype(np.float32)), backend=be)
        manual_seed(11)
        losses = []
        for _ in range(3):
            loss = F.cross_entropy(layer(x), np.array([0, 1, 2, 3, 0]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(be.to_numpy(loss.data)))
        assert layer.weight.grad is None  # the base stays frozen
        if be is strict:
            assert all(isinstance(p.data, STRICT_ARRAY) for p in layer.parameters())
        results[be.name] = (losses, _params(layer))
    np.testing.assert_allclose(results["strict"][0], results["numpy"][0], rtol=1e-5)
    for k, v in results["numpy"][1].items():
        np.testing.assert_allclose(results["strict"][1][k], v, rtol=1e-5, atol=1e-6, err_msg=k)


def _train_on_both(strict: Backend, config: LoraConfig) -> dict[str, list[float]]:
    """Loss curves of four Adam steps of a 12-8-5 MLP with adapters ``config``, on NumPy and on strict arrays."""
    x = np.random.default_rng(0).standard_normal((16, 12)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 5, 16)
    curves = {}
    for be in (get_backend("numpy"), strict):
        manual_seed(0)
        model = nn.MLP([12, 8, 5])
        inject_adapters(model, config)
        model.to(be)
        opt = optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        xb = Tensor(be.asarray(x), backend=be)
        losses = []
        for _ in range(4):
            loss = F.cross_entropy(model(xb), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(be.to_numpy(loss.data)))
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        curves[be.name] = losses
    np.testing.assert_allclose(curves["strict"], curves["numpy"], rtol=1e-5)
    assert curves["numpy"][-1] < curves["numpy"][0]
    return curves


@pytest.mark.parametrize("norm_grad", [False, True])
def test_dora_trains_the_same_on_strict_arrays(strict: Backend, norm_grad: bool) -> None:
    """DoRA's fused op is written once over the array module: it runs on strict array-API arrays as is."""
    _train_on_both(strict, LoraConfig(r=2, lora_alpha=4.0, use_dora=True, dora_norm_grad=norm_grad,
                                      target_modules=["fc1", "fc2"]))


def test_mlp_with_adapters_trains_the_same_on_strict_arrays(strict: Backend) -> None:
    _train_on_both(strict, LoraConfig(r=2, lora_alpha=4.0, target_modules=["fc1", "fc2"]))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_linear_and_sgd_on_strict_arrays(strict: Backend, momentum: float) -> None:
    finals = {}
    for be in (get_backend("numpy"), strict):
        manual_seed(2)
        layer = nn.Linear(3, 2, backend=be)
        opt = optim.SGD(list(layer.parameters()), lr=0.1, momentum=momentum, weight_decay=0.01)
        x = Tensor(be.asarray(r(4, 3).astype(np.float32)), backend=be)
        for _ in range(3):
            loss = (layer(x) ** 2.0).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        finals[be.name] = _params(layer)
    for k, v in finals["numpy"].items():
        np.testing.assert_allclose(finals["strict"][k], v, rtol=1e-5, atol=1e-7, err_msg=k)


def test_no_grad_and_leaf_gradient_accumulation(strict: Backend) -> None:
    a = Tensor(xs.asarray([1.0, -2.0, 3.0]), requires_grad=True)
    (a * a).sum().backward()
    (a * 2.0).sum().backward()  # a second graph: the leaf's gradient accumulates
    np.testing.assert_allclose(np.asarray(a.grad), [4.0, -2.0, 8.0])
    from minitorch_peft import no_grad

    with no_grad():
        b = a * 3.0
    assert not b.requires_grad and isinstance(b.data, STRICT_ARRAY)
