"""LoRA: the fused op's gradients, LoRALinear's initialisation and forward, injection, merging, adapters."""

from __future__ import annotations

import math
import os
import sys
import warnings

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gradcheck import as_leaf, gradcheck  # noqa: E402

from minitorch_peft import Tensor, manual_seed, no_grad  # noqa: E402
from minitorch_peft import functional as F  # noqa: E402
from minitorch_peft.checkpoint import load_model, save_model  # noqa: E402
from minitorch_peft.random import generator  # noqa: E402
from minitorch_peft.nn import MLP, Linear, Module, Sequential  # noqa: E402
from minitorch_peft.optim import SGD, Adam  # noqa: E402
from minitorch_peft.peft import (  # noqa: E402
    AdapterError, LoRAFunction, LoRALinear, LoraConfig, RankWarning, active_adapter, add_adapter, count_parameters,
    delete_adapter, disable_adapters, inject_adapters, list_adapters, lora_layers, merge_adapters, merge_and_unload,
    set_adapter, unmerge_adapters,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def out(model: Module, x: np.ndarray) -> np.ndarray:
    with no_grad():
        return model(Tensor(x)).numpy()


def randomize_b(model: Module, seed: int = 1, scale: float = 0.5) -> None:
    """Give every adapter a non-zero B (B starts at zero, which would hide most mistakes)."""
    r = rng(seed)
    for name, p in model.named_parameters():
        if name.startswith("lora_B.") or ".lora_B." in name:
            p.data[...] = (scale * r.standard_normal(p.shape)).astype(p.dtype)


# ------------------------------------------------------------------------------ the fused op


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_lora_function_gradients_match_finite_differences(dropout: bool, with_bias: bool) -> None:
    r = rng(3)
    x, w, a, bm, b = (r.standard_normal(s) for s in [(5, 7), (6, 7), (3, 7), (6, 3), (6,)])
    mask = (r.random((5, 7)) >= 0.4) / 0.6 if dropout else None

    def f(*t: Tensor) -> Tensor:
        return LoRAFunction.apply(*t, scaling=0.7, mask=mask)

    grads = gradcheck(f, x, w, a, bm, *((b,) if with_bias else ()))
    assert all(g is not None and np.abs(g).max() > 0 for g in grads)


def test_lora_function_frozen_base_gets_no_gradient_and_batched_input_works() -> None:
    r = rng(4)
    x = as_leaf(r.standard_normal((2, 3, 7)))  # leading axes beyond the batch
    w, b = as_leaf(r.standard_normal((6, 7)), False), as_leaf(r.standard_normal(6), False)
    grads = gradcheck(lambda x, w, a, bm, b: LoRAFunction.apply(x, w, a, bm, b, scaling=2.0),
                      x, w, r.standard_normal((3, 7)), r.standard_normal((6, 3)), b)
    assert grads[1] is None and grads[4] is None and w.grad is None


# ------------------------------------------------------------------------------ LoRALinear


def test_from_linear_kaiming_init_zero_b_and_exact_base_output() -> None:
    manual_seed(0)
    lin = Linear(400, 300)
    x = rng(1).standard_normal((8, 400)).astype(np.float32)
    base = out(lin, x)
    layer = LoRALinear.from_linear(lin, r=16, alpha=32)
    a = layer.lora_A["default"].numpy()
    bound = math.sqrt(6.0 / ((1 + 5) * 400))  # Kaiming uniform with a = sqrt(5)
    assert a.shape == (16, 400) and np.abs(a).max() <= bound and np.abs(a).max() > 0.95 * bound
    assert abs(a.std() - bound / math.sqrt(3)) < 0.05 * bound
    assert layer.lora_B["default"].shape == (300, 16) and not layer.lora_B["default"].numpy().any()
    assert layer.scaling() == 2.0
    assert layer.weight is lin.weight and not layer.weight.requires_grad and not layer.bias.requires_grad
    np.testing.assert_array_equal(out(layer, x), base)  # exactly: B = 0 adds nothing
    layer.train()
    np.testing.assert_array_equal(out(layer, x), base)


def test_gaussian_init_and_rslora_scaling() -> None:
    manual_seed(0)
    layer = LoRALinear(300, 200, r=4, alpha=8, init="gaussian")
    a = layer.lora_A["default"].numpy()
    assert abs(a.mean()) < 0.01 and abs(a.std() - 1 / 4) < 0.01  # N(0, std 1/r), as PEFT's "gaussian"
    assert layer.scaling() == 2.0
    rs = LoRALinear(300, 200, r=4, alpha=8, use_rslora=True)
    assert rs.scaling() == pytest.approx(8 / math.sqrt(4))


def test_forward_matches_formula_and_dropout_only_in_training() -> None:
    manual_seed(0)
    layer = LoRALinear(20, 12, r=3, alpha=6, dropout=0.5)
    randomize_b(layer)
    x = rng(2).standard_normal((9, 20)).astype(np.float32)
    w, b, a, bm = (p.numpy().astype(np.float64) for p in (layer.weight, layer.bias, layer.lora_A["default"], layer.lora_B["default"]))
    expected = x @ w.T + b + 2.0 * (x @ a.T) @ bm.T
    layer.eval()
    np.testing.assert_allclose(out(layer, x), expected, rtol=1e-5, atol=1e-5)
    layer.train()
    manual_seed(7)
    y_train = out(layer, x)
    manual_seed(7)  # the same draw: the mask the layer used
    mask = layer.weight.backend.kernels.dropout_mask(x.shape, 0.5, np.dtype(np.float32), generator())
    expected_train = x @ w.T + b + 2.0 * ((x * mask) @ a.T) @ bm.T  # dropout on the adapter's input only
    np.testing.assert_allclose(y_train, expected_train, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y_train, expected, atol=1e-3)


def test_bad_settings_are_adapter_errors() -> None:
    lin = Linear(10, 4)
    with pytest.raises(AdapterError, match=">= 1"):
        LoRALinear.from_linear(lin, r=0)
    with pytest.raises(AdapterError, match="lora_alpha"):
        LoRALinear.from_linear(lin, r=2, alpha=0)
    with pytest.raises(AdapterError, match="dropout"):
        LoRALinear.from_linear(lin, r=2, dropout=1.0)
    with pytest.raises(AdapterError, match="init"):
        LoRALinear.from_linear(lin, r=2, init="orthogonal")


# ------------------------------------------------------------------------------ injection


class Net(Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = Sequential(Linear(6, 8), Linear(8, 8))
        self.head = Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.enc(x)))


def test_inject_by_exact_name_suffix_and_all_linear_freezes_the_base() -> None:
    manual_seed(0)
    net = Net()
    inject_adapters(net, r=2, target_modules=["1", "head"])  # "1" is a suffix of "enc.1"
    assert [n for n, _ in lora_layers(net)] == ["enc.1", "head"]
    assert isinstance(net.enc._modules["0"], Linear)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"enc.1.lora_A.default", "enc.1.lora_B.default", "head.lora_A.default", "head.lora_B.default"}
    manual_seed(0)
    net2 = inject_adapters(Net(), r=2, target_modules="all-linear")
    assert [n for n, _ in lora_layers(net2)] == ["enc.0", "enc.1", "head"]
    counts = count_parameters(net2)
    assert counts["trainable"] == 2 * (6 + 8) + 2 * (8 + 8) + 2 * (8 + 3)
    assert counts["total"] == counts["trainable"] + Net().num_parameters()


def test_unknown_target_lists_available_names_and_changes_nothing() -> None:
    net = Net()
    with pytest.raises(AdapterError, match=r"'fc9'.*enc\.0, enc\.1, head"):
        inject_adapters(net, r=2, target_modules=["head", "fc9"])
    assert not list(lora_layers(net)) and all(p.requires_grad for p in net.parameters())


# ------------------------------------------------------------------------------ a rank above a layer's width


def test_rank_above_the_width_is_accepted_with_one_warning() -> None:
    """As PEFT: any r >= 1 on any layer; r > min(in, out) adds parameters, not expressive power: one warning."""
    manual_seed(0)
    net = Net()  # head is 8 -> 3
    with pytest.warns(RankWarning) as record:
        inject_adapters(net, r=5, target_modules=["enc.0", "head"])
    assert len(record) == 1
    message = str(record[0].message)
    assert "r=5 exceeds min(in, out) = 3 of module 'head'" in message and "enc.0" not in message
    assert net.head.lora_A["default"].shape == (5, 8) and net.head.lora_B["default"].shape == (3, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a rank that fits says nothing
        inject_adapters(Net(), r=3, target_modules=["head"])
    with pytest.warns(RankWarning, match="'head'"):
        add_adapter(net, "wide", LoraConfig(r=9, target_modules=["head"]))


@pytest.mark.parametrize("use_dora", [False, True])
def test_rank_above_the_width_gradients_match_finite_differences(use_dora: bool) -> None:
    manual_seed(1)
    base = Linear(7, 3, dtype=np.float64)
    layer = LoRALinear.from_linear(base, config=LoraConfig(r=6, lora_alpha=4, use_dora=use_dora, dora_norm_grad=True))
    layer.lora_B["default"].data[...] = rng(2).standard_normal((3, 6))
    x = as_leaf(rng(3).standard_normal((5, 7)))
    params = [layer.lora_A["default"], layer.lora_B["default"]] + ([layer.lora_magnitude_vector["default"]] if use_dora else [])
    grads = gradcheck(lambda x, *p: layer(x), x, *params)
    assert all(np.abs(g).max() > 0 for g in grads)
    expected = x.data @ (layer.merged_weight()).T + layer.bias.data  # merging a wide adapter is still exact
    np.testing.assert_allclose(layer(Tensor(x.data)).data, expected, rtol=1e-10, atol=1e-10)


def test_rank_pattern_gives_a_module_its_own_rank_and_survives_a_checkpoint(tmp_path) -> None:
    manual_seed(0)
    model = MLP([12, 9, 5])
    inject_adapters(model, r=3, lora_alpha=6, target_modules=["fc1", "fc2"], rank_pattern={"fc2": 2}, alpha_pattern={"fc2": 1.0})
    assert model.fc1.lora_A["default"].shape == (3, 12) and model.fc2.lora_A["default"].shape == (2, 9)
    assert model.fc1.scaling() == 2.0 and model.fc2.scaling() == 0.5
    randomize_b(model)
    x = rng(0).standard_normal((4, 12)).astype(np.float32)
    save_model(model, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    np.testing.assert_array_equal(out(loaded, x), out(model, x))


# ------------------------------------------------------------------------------ merge, disable


@pytest.fixture
def adapted() -> tuple[MLP, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    manual_seed(0)
    model = MLP([30, 20, 10])
    x = rng(5).standard_normal((16, 30)).astype(np.float32)
    base_out = out(model, x)
    base_w = {n: p.numpy().copy() for n, p in model.named_parameters()}
    inject_adapters(model, r=4, lora_alpha=8, target_modules=["fc1", "fc2"])
    randomize_b(model)
    return model, x, base_out, base_w


def test_merge_unmerge_and_merge_and_unload(adapted) -> None:
    model, x, base_out, base_w = adapted
    y = out(model, x)
    assert not np.allclose(y, base_out, atol=1e-3)
    merge_adapters(model)
    assert model.fc1.merged
    np.testing.assert_allclose(out(model, x), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterError, match="unmerge"):
        model.fc1.merged_weight()  # would count the update twice
    with pytest.raises(AdapterError, match="unmerge"):
        model.fc1.set_adapter("default")
    unmerge_adapters(model)
    for n in ("fc1.weight", "fc2.weight"):
        np.testing.assert_allclose(dict(model.named_parameters())[n].numpy(), base_w[n], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out(model, x), y, rtol=1e-5, atol=1e-5)
    merge_and_unload(model)
    assert not list(lora_layers(model)) and isinstance(model.fc1, Linear)
    np.testing.assert_allclose(out(model, x), y, rtol=1e-5, atol=1e-5)


def test_disable_adapters_gives_exactly_the_base_output(adapted) -> None:
    model, x, base_out, _ = adapted
    y = out(model, x)
    with disable_adapters(model):
        np.testing.assert_array_equal(out(model, x), base_out)
    np.testing.assert_array_equal(out(model, x), y)
    merge_adapters(model)
    with disable_adapters(model):  # merged adapters are taken out for the block, then put back
        np.testing.assert_allclose(out(model, x), base_out, rtol=0, atol=1e-5)
    assert model.fc1.merged
    np.testing.assert_allclose(out(model, x), y, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ named adapters


def test_named_adapters_only_the_active_one_trains(adapted) -> None:
    model, x, base_out, base_w = adapted
    add_adapter(model, "other", LoraConfig(r=2, lora_alpha=2, target_modules=["fc2"]))
    assert list_adapters(model) == ["default", "other"] and active_adapter(model) == "default"
    randomize_b(model, seed=9)
    opt = Adam(model.parameters(), lr=1e-2)

    def train_step() -> dict[str, np.ndarray]:
        before = {n: p.numpy().copy() for n, p in model.named_parameters()}
        loss = F.cross_entropy(model(Tensor(x)), rng(0).integers(0, 10, len(x)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {n for n, p in model.named_parameters() if not np.array_equal(p.numpy(), before[n])}

    assert train_step() == {f"{l}.lora_{k}.default" for l in ("fc1", "fc2") for k in "AB"}
    set_adapter(model, "other")
    assert model.fc1.active_adapter is None  # "other" does not touch fc1: it computes its base output
    assert train_step() == {"fc2.lora_A.other", "fc2.lora_B.other"}
    with pytest.raises(AdapterError, match="unknown adapter 'nope'"):
        set_adapter(model, "nope")
    with pytest.raises(AdapterError, match="already exists"):
        add_adapter(model, "other", LoraConfig(r=2, target_modules=["fc2"]))
    with pytest.raises(AdapterError, match="fc9"):
        add_adapter(model, "third", LoraConfig(r=2, target_modules=["fc9"]))
    delete_adapter(model, "other")
    assert list_adapters(model) == ["default"] and "other" not in model.fc2.lora_A
    set_adapter(model, "default")
    assert model.fc2.lora_A["default"].requires_grad


def test_sgd_leaves_frozen_base_and_inactive_adapter_untouched() -> None:
    manual_seed(0)
    layer = LoRALinear(8, 6, r=2, alpha=2)
    layer.add_adapter("b", LoraConfig(r=2))
    randomize_b(layer)
    frozen = {n: p.numpy().copy() for n, p in layer.named_parameters() if not p.requires_grad}
    assert set(frozen) == {"weight", "bias", "lora_A.b", "lora_B.b"}
    opt = SGD(layer.parameters(), lr=0.1)
    layer(Tensor(rng(1).standard_normal((3, 8)).astype(np.float32))).sum().backward()
    opt.step()
    for n, p in layer.named_parameters():
        if n in frozen:
            np.testing.assert_array_equal(p.numpy(), frozen[n])
            assert p.grad is None
