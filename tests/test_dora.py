"""DoRA: the fused op's gradients (norm detached, and through the norm), magnitude init, forward, merge."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gradcheck import as_leaf, gradcheck, numerical_grad  # noqa: E402

import minitorch_peft.kernels.cpu as cpu  # noqa: E402
from minitorch_peft import get_backend  # noqa: E402
from minitorch_peft.peft.fused import dora_weight_norm  # noqa: E402
from minitorch_peft import Tensor, manual_seed, no_grad  # noqa: E402
from minitorch_peft import functional as F  # noqa: E402
from minitorch_peft.checkpoint import load_model, save_model  # noqa: E402
from minitorch_peft.nn import MLP  # noqa: E402
from minitorch_peft.optim import Adam  # noqa: E402
from minitorch_peft.peft import (  # noqa: E402
    DoRAFunction, LoRALinear, LoraConfig, disable_adapters, inject_adapters, merge_adapters, merge_and_unload,
    unmerge_adapters,
)
from minitorch_peft.random import generator  # noqa: E402

S = 0.7


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def arrays(seed: int = 0, batch: int = 5, n_in: int = 7, n_out: int = 6, r: int = 3) -> list[np.ndarray]:
    """x, W, A, B, m, b in float64, with m away from zero and B non-zero."""
    g = rng(seed)
    return [g.standard_normal((batch, n_in)), g.standard_normal((n_out, n_in)), g.standard_normal((r, n_in)),
            g.standard_normal((n_out, r)), g.uniform(0.5, 2.0, n_out), g.standard_normal(n_out)]


def dense_norm(w: np.ndarray, a: np.ndarray, bm: np.ndarray, s: float) -> np.ndarray:
    return np.linalg.norm(w + s * bm @ a, axis=1)


def out(model, x: np.ndarray) -> np.ndarray:
    with no_grad():
        return model(Tensor(x)).numpy()


# ------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("dropout", [False, True])
def test_gradients_through_the_norm_match_finite_differences(dropout: bool) -> None:
    x, w, a, bm, m, b = arrays(1)
    mask = (rng(9).random(x.shape) >= 0.3) / 0.7 if dropout else None
    grads = gradcheck(lambda *t: DoRAFunction.apply(*t, scaling=S, mask=mask, norm_grad=True), x, w, a, bm, m, b)
    assert all(np.abs(g).max() > 0 for g in grads)


@pytest.mark.parametrize("dropout", [False, True])
def test_detached_norm_gradients_are_those_of_a_constant_norm(dropout: bool) -> None:
    """Default DoRA (paper section 4.3): the gradients of y = (m / n) (...) + b with n held at its value."""
    x, w, a, bm, m, b = arrays(2)
    mask = (rng(8).random(x.shape) >= 0.3) / 0.7 if dropout else None
    xd_mask = np.ones_like(x) if mask is None else mask
    n0 = dense_norm(w, a, bm, S)

    def reference(x: Tensor, w: Tensor, a: Tensor, bm: Tensor, m: Tensor, b: Tensor) -> Tensor:
        z = x @ w.T + S * ((x * xd_mask) @ a.T) @ bm.T
        return (m / n0) * z + b

    tensors = [as_leaf(v) for v in (x, w, a, bm, m, b)]
    y = DoRAFunction.apply(*tensors, scaling=S, mask=mask)
    np.testing.assert_allclose(y.numpy(), reference(*tensors).numpy(), rtol=1e-12, atol=1e-12)
    projection = rng(0).standard_normal(y.shape)
    y.backward(projection)
    for k, t in enumerate(tensors):
        numeric = numerical_grad(reference, tensors, k, projection)
        np.testing.assert_allclose(t.grad, numeric, rtol=1e-5, atol=1e-7, err_msg=f"input {k}")
    # and they are not the full gradients: the option changes A's and B's, never m's
    full = [as_leaf(v) for v in (x, w, a, bm, m, b)]
    DoRAFunction.apply(*full, scaling=S, mask=mask, norm_grad=True).backward(projection)
    assert not np.allclose(full[2].grad, tensors[2].grad) and not np.allclose(full[3].grad, tensors[3].grad)
    np.testing.assert_allclose(full[4].grad, tensors[4].grad, rtol=1e-12)


def test_frozen_base_gets_no_gradient() -> None:
    x, w, a, bm, m, b = arrays(3)
    ws, bs = as_leaf(w, False), as_leaf(b, False)
    grads = gradcheck(lambda *t: DoRAFunction.apply(*t, scaling=S, norm_grad=True), x, ws, a, bm, m, bs)
    assert grads[1] is None and grads[5] is None and ws.grad is None and bs.grad is None


def test_layer_with_dora_norm_grad_matches_finite_differences() -> None:
    manual_seed(0)
    layer = LoRALinear.from_linear(
        LoRALinear(9, 5, r=1, dtype=np.float64).to_linear(merge=False),
        config=LoraConfig(r=2, lora_alpha=3, use_dora=True, dora_norm_grad=True),
    )
    layer.lora_B["default"].data[...] = rng(1).standard_normal((5, 2))
    x = as_leaf(rng(2).standard_normal((4, 9)), requires_grad=False)
    a, bm, m = layer.lora_A["default"], layer.lora_B["default"], layer.lora_magnitude_vector["default"]
    gradcheck(lambda x, a, bm, m: layer(x), x, a, bm, m)


# ------------------------------------------------------------------------------ norm, init, forward


def test_weight_norm_equals_the_dense_row_norm() -> None:
    _, w, a, bm, _, _ = arrays(4, n_in=50, n_out=40, r=6)
    numpy_backend = get_backend("numpy")
    n, wa = dora_weight_norm(numpy_backend, w, a, bm, S)
    np.testing.assert_allclose(n, dense_norm(w, a, bm, S), rtol=1e-12)
    np.testing.assert_allclose(wa, w @ a.T, rtol=1e-12)
    n32, _ = dora_weight_norm(numpy_backend, *(v.astype(np.float32) for v in (w, a, bm)), S)
    assert n32.dtype == np.float32
    np.testing.assert_allclose(n32, dense_norm(w, a, bm, S), rtol=1e-5)


def test_magnitude_starts_at_the_row_norms_and_the_output_is_exactly_the_base() -> None:
    manual_seed(0)
    model = MLP([40, 30, 10])
    x = rng(0).standard_normal((8, 40)).astype(np.float32)
    base_out = out(model, x)
    w0 = model.fc1.weight.numpy().copy()
    inject_adapters(model, r=4, lora_alpha=8, use_dora=True, target_modules=["fc1", "fc2"])
    m = model.fc1.lora_magnitude_vector["default"]
    assert m.shape == (30,) and m.requires_grad
    np.testing.assert_allclose(m.numpy(), np.linalg.norm(w0.astype(np.float64), axis=1), rtol=1e-6)
    np.testing.assert_array_equal(out(model, x), base_out)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{l}.{k}.default" for l in ("fc1", "fc2") for k in ("lora_A", "lora_B", "lora_magnitude_vector")
    }


def dora_model(seed: int = 0, dropout: float = 0.0) -> MLP:
    manual_seed(seed)
    model = MLP([40, 30, 10])
    inject_adapters(model, r=4, lora_alpha=8, lora_dropout=dropout, use_dora=True, target_modules=["fc1", "fc2"])
    g = rng(seed + 1)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data[...] = 0.3 * g.standard_normal(p.shape)
        if ".lora_magnitude_vector." in name:
            p.data[...] *= g.uniform(0.5, 1.5, p.shape).astype(np.float32)
    return model


def test_forward_matches_the_dense_definition_with_and_without_dropout() -> None:
    model = dora_model(dropout=0.4)
    layer = model.fc1
    x = rng(3).standard_normal((6, 40)).astype(np.float32)
    w0, b, a, bm, m = (v.astype(np.float64) for v in (layer.weight.numpy(), layer.bias.numpy(), layer.lora_A["default"].numpy(),
                                                        layer.lora_B["default"].numpy(), layer.lora_magnitude_vector["default"].numpy()))
    v = w0 + 2.0 * bm @ a
    w_dora = m[:, None] * v / np.linalg.norm(v, axis=1, keepdims=True)
    layer.eval()
    np.testing.assert_allclose(out(layer, x), x @ w_dora.T + b, rtol=1e-5, atol=1e-5)
    layer.train()
    manual_seed(11)
    y = out(layer, x)
    manual_seed(11)
    mask = cpu.dropout_mask(x.shape, 0.4, np.dtype(np.float32), generator())
    expected = (m / np.linalg.norm(v, axis=1)) * (x @ w0.T + 2.0 * ((x * mask) @ a.T) @ bm.T) + b
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ merge


def test_merge_and_unmerge_are_exact() -> None:
    model = dora_model()
    x = rng(4).standard_normal((8, 40)).astype(np.float32)
    with disable_adapters(model):
        base_out = out(model, x)
    w0 = model.fc1.weight.numpy().copy()
    y = out(model, x)
    for _ in range(3):  # repeated cycles must not drift
        merge_adapters(model)
        np.testing.assert_allclose(out(model, x), y, rtol=1e-5, atol=1e-5)
        unmerge_adapters(model)
        np.testing.assert_allclose(model.fc1.weight.numpy(), w0, rtol=0, atol=2e-6)
        assert not model.fc1.dora_merge_state
    np.testing.assert_allclose(out(model, x), y, rtol=1e-5, atol=1e-5)
    merge_adapters(model)
    with disable_adapters(model):
        np.testing.assert_allclose(out(model, x), base_out, rtol=0, atol=1e-5)
    merge_and_unload(model)
    np.testing.assert_allclose(out(model, x), y, rtol=1e-5, atol=1e-5)


def test_unmerge_restores_rows_whose_magnitude_is_zero() -> None:
    model = dora_model()
    model.fc1.lora_magnitude_vector["default"].data[:3] = 0.0
    w0 = model.fc1.weight.numpy().copy()
    model.fc1.merge()
    assert not model.fc1.weight.numpy()[:3].any()
    model.fc1.unmerge()
    np.testing.assert_array_equal(model.fc1.weight.numpy(), w0)


def test_dora_trains_and_survives_a_checkpoint(tmp_path) -> None:
    model = dora_model()
    x = rng(5).standard_normal((32, 40)).astype(np.float32)
    y = rng(6).integers(0, 10, 32)
    opt = Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    m_before = model.fc1.lora_magnitude_vector["default"].numpy().copy()
    for _ in range(40):
        loss = F.cross_entropy(model(Tensor(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert not np.allclose(model.fc1.lora_magnitude_vector["default"].numpy(), m_before)
    save_model(model, tmp_path / "m")
    loaded, config = load_model(tmp_path / "m")
    assert config["adapters"]["default"]["use_dora"]
    np.testing.assert_array_equal(out(loaded, x), out(model, x))
