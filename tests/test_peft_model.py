"""The PEFT-style entry point (get_peft_model / PeftModel) and copying / pickling of models."""

from __future__ import annotations

import copy
import json
import pickle

import numpy as np
import pytest

import minitorch_peft.functional as F
from minitorch_peft import Tensor, manual_seed
from minitorch_peft.checkpoint import load_model, save_model
from minitorch_peft.nn import MLP, Linear
from minitorch_peft.optim import Adam
from minitorch_peft.peft import (
    AdapterError, LoraConfig, LoRALinear, PeftModel, QLoRALinear, get_peft_model, inject_adapters, list_adapters,
)

DIMS = [20, 16, 12, 4]


def batch(seed: int = 0, n: int = 8) -> tuple[Tensor, Tensor]:
    rng = np.random.default_rng(seed)
    return Tensor(rng.normal(size=(n, DIMS[0])).astype(np.float32)), Tensor(rng.integers(0, DIMS[-1], size=n))


def trained(model, steps: int = 5):
    """A few Adam steps, so B is non-zero and the adapter changes the output."""
    opt = Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for i in range(steps):
        x, y = batch(i)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def out(model, x: Tensor) -> np.ndarray:
    model.eval()
    return np.array(model(x).data)


def test_get_peft_model_injects_freezes_and_counts() -> None:
    manual_seed(0)
    base = MLP(DIMS)
    n_base = base.num_parameters()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
    assert isinstance(model, PeftModel) and model.get_base_model() is base and model.base_model is base
    assert isinstance(base.fc1, LoRALinear) and isinstance(base.fc3, Linear) and not isinstance(base.fc3, LoRALinear)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * (20 + 16) + 2 * (16 + 12)
    assert total == n_base + trainable
    assert trainable == sum(p.size for p in model.parameters() if p.requires_grad)
    assert model.active_adapter == "default" and model.fc1 is base.fc1  # attributes reach the wrapped model
    assert model.peft_config["default"].target_modules == ["fc1", "fc2"]
    assert {k.split(".", 1)[0] for k in model.state_dict()} == {"base_model"}


def test_print_trainable_parameters_prints_peft_line(capsys: pytest.CaptureFixture[str]) -> None:
    model = get_peft_model(MLP(DIMS), LoraConfig(r=2))
    model.print_trainable_parameters()
    trainable, total = model.get_nb_trainable_parameters()
    line = capsys.readouterr().out.strip()
    assert line == f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def test_save_pretrained_from_pretrained_round_trip_and_inference_mode(tmp_path) -> None:
    manual_seed(1)
    base_state = {k: np.array(v) for k, v in MLP(DIMS).state_dict().items()}
    base = MLP(DIMS)
    base.load_state_dict(base_state)
    model = trained(get_peft_model(base, LoraConfig(r=3, use_dora=True)))
    x, _ = batch(9)
    expected = out(model, x)
    model.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter_config.json", "adapter_model.npz"]
    fresh = MLP(DIMS)
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "a")
    np.testing.assert_array_equal(out(loaded, x), expected)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    again = MLP(DIMS)
    again.load_state_dict(base_state)
    trainable = PeftModel.from_pretrained(again, tmp_path / "a", is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_adapters_load_onto_a_float_base_as_4_bit_and_give_the_trained_outputs(tmp_path, use_dora: bool) -> None:
    """save_pretrained records the 4-bit base ("quantization"); from_pretrained on the float base quantizes it
    the same way, so QLoRA / QDoRA outputs are bit for bit those of the trained model (on the float base they
    would differ by the quantization error). A LoRA folder has no such entry (its format is unchanged)."""
    manual_seed(3)
    base_state = {k: np.array(v) for k, v in MLP(DIMS).state_dict().items()}
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", use_dora=use_dora)
    model = trained(get_peft_model(_with(base_state), cfg, quantize="nf4", double_quant=True, block_size=32))
    x, _ = batch(4)
    expected = out(model, x)
    model.save_pretrained(tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "adapter_config.json").read_text())
    assert saved["quantization"] == {"quant_type": "nf4", "double_quant": True, "block_size": 32}
    loaded = PeftModel.from_pretrained(_with(base_state), tmp_path / "q")
    assert all(isinstance(getattr(loaded.base_model, n), QLoRALinear) for n in ("fc1", "fc2", "fc3"))
    np.testing.assert_array_equal(out(loaded, x), expected)
    float_base = get_peft_model(_with(base_state), cfg)
    adapters = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    float_base.load_state_dict({**float_base.state_dict(), **adapters})
    assert all(np.array_equal(float_base.state_dict()[k], v) for k, v in adapters.items())
    assert not np.array_equal(out(float_base, x), expected)  # what loading without the 4-bit base would give

    trained(get_peft_model(_with(base_state), LoraConfig(r=2))).save_pretrained(tmp_path / "plain")
    assert "quantization" not in json.loads((tmp_path / "plain" / "adapter_config.json").read_text())
    saved["quantization"] = {"quant_type": "int3"}
    (tmp_path / "q" / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(AdapterError, match="quantization.quant_type"):
        PeftModel.from_pretrained(_with(base_state), tmp_path / "q")


def test_save_pretrained_peft_format_round_trip(tmp_path) -> None:
    pytest.importorskip("safetensors")
    manual_seed(2)
    model = trained(get_peft_model(MLP(DIMS), LoraConfig(r=2)))
    base_state = {k: np.array(v) for k, v in model.unload().state_dict().items()}
    model = trained(get_peft_model(_with(base_state), LoraConfig(r=2)))
    x, _ = batch(3)
    expected = out(model, x)
    model.save_pretrained(tmp_path / "hf", peft_format=True)
    assert (tmp_path / "hf" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(_with(base_state), tmp_path / "hf", adapter_name="imported")
    assert loaded.list_adapters() == ["imported"]
    np.testing.assert_allclose(out(loaded, x), expected, rtol=1e-6, atol=1e-6)


def _with(state: dict) -> MLP:
    m = MLP(DIMS)
    m.load_state_dict(state)
    return m


def test_add_set_disable_merge_and_unload() -> None:
    manual_seed(3)
    model = trained(get_peft_model(MLP(DIMS), LoraConfig(r=2)))
    x, _ = batch(4)
    with_a = out(model, x)
    with model.disable_adapter():
        base_out = out(model, x)
    assert not np.allclose(with_a, base_out)
    np.testing.assert_array_equal(out(model, x), with_a)  # the block restores the adapter
    model.add_adapter("b", LoraConfig(r=3))
    assert model.list_adapters() == ["default", "b"] and model.active_adapter == "default"
    model.set_adapter("b")
    model.train()
    trained(model)
    assert model.active_adapter == "b"
    with_b = out(model, x)
    assert not np.allclose(with_b, with_a)
    model.set_adapter("default")
    np.testing.assert_array_equal(out(model, x), with_a)  # training b left default untouched
    model.merge_adapter()
    np.testing.assert_allclose(out(model, x), with_a, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    plain = model.merge_and_unload()
    assert plain is model.base_model and not any(isinstance(m, LoRALinear) for m in plain.modules())
    np.testing.assert_allclose(out(plain, x), with_a, rtol=1e-5, atol=1e-5)


def test_bad_uses_are_adapter_errors(tmp_path) -> None:
    model = get_peft_model(MLP(DIMS), LoraConfig(r=2))
    with pytest.raises(AdapterError, match="already a PeftModel"):
        get_peft_model(model, LoraConfig(r=2))
    with pytest.raises(AdapterError, match="already holds adapters"):
        get_peft_model(model.base_model, LoraConfig(r=2))
    with pytest.raises(AdapterError, match="needs a model that already holds adapters"):
        PeftModel(MLP(DIMS))
    with pytest.raises(AdapterError, match="not an adapter folder"):
        PeftModel.from_pretrained(MLP(DIMS), tmp_path)
    with pytest.raises(AdapterError, match="unknown adapter"):
        model.set_adapter("nope")
    assert PeftModel(model.base_model).list_adapters() == ["default"]  # wraps a model that has adapters


# ------------------------------------------------------------------------------ copy and pickle


def _kinds():
    return {
        "lora": dict(config=LoraConfig(r=3)),
        "dora": dict(config=LoraConfig(r=3, use_dora=True)),
        "qlora": dict(config=LoraConfig(r=3), quantize="nf4"),
    }


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
def test_deepcopy_and_pickle_round_trip_give_identical_outputs(kind: str) -> None:
    manual_seed(4)
    spec = _kinds()[kind]
    dims = [64, 64, 64, 4]  # 4-bit blocks need widths that are multiples of the block size
    model = MLP(dims)
    inject_adapters(model, spec["config"], quantize=spec.get("quantize"))
    if kind == "qlora":
        assert any(isinstance(m, QLoRALinear) for m in model.modules())
    opt = Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rng = np.random.default_rng(0)
    x = Tensor(rng.normal(size=(5, 64)).astype(np.float32))
    y = Tensor(rng.integers(0, 4, size=5))
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    expected = out(model, x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), copy.deepcopy(PeftModel(model)).base_model):
        np.testing.assert_array_equal(out(clone, x), expected)
        assert clone.backend is model.backend  # the backend comes back by name: the one shared object
        assert list_adapters(clone) == list_adapters(model)
        # an independent copy: training the clone leaves the original alone
        clone.train()
        for p in clone.parameters():
            if p.requires_grad:
                p.data += 1.0
        np.testing.assert_array_equal(out(model, x), expected)


def test_a_copied_model_saves_and_loads(tmp_path) -> None:
    manual_seed(5)
    model = trained(get_peft_model(MLP(DIMS), LoraConfig(r=2))).base_model
    clone = copy.deepcopy(model)
    save_model(clone, tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    x, _ = batch(1)
    np.testing.assert_array_equal(out(loaded, x), out(model, x))


def test_get_peft_model_with_a_4bit_base_is_qlora() -> None:
    manual_seed(6)
    model = get_peft_model(MLP([64, 64, 4]), LoraConfig(r=2, target_modules=["fc1"]), quantize="nf4", block_size=64)
    assert isinstance(model.fc1, QLoRALinear) and model.fc1.quant_config()["quant_type"] == "nf4"
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 2 * (64 + 64) and total == trainable + 64 * 64 + 64 + 64 * 4 + 4  # 4-bit weights count as weights
    x = Tensor(np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32))
    with model.disable_adapter():
        base_out = out(model, x)
    np.testing.assert_array_equal(out(model, x), base_out)  # B starts at zero
