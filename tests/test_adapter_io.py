"""Adapter files: our .npz + JSON folder and Hugging Face PEFT's layout, round trips and clear errors."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import numpy as np
import pytest

from minitorch_peft import CheckpointError, Tensor, manual_seed, no_grad
from minitorch_peft.nn import MLP
from minitorch_peft.peft import (
    AdapterError, LoraConfig, active_adapter, add_adapter, inject_adapters, list_adapters, load_adapters, load_peft,
    lora_layers, save_adapters, save_peft, set_adapter,
)

st = pytest.importorskip("safetensors.numpy")

X = np.random.default_rng(7).standard_normal((5, 12)).astype(np.float32)


def adapted(use_dora: bool = False, use_rslora: bool = False, seed: int = 0) -> MLP:
    manual_seed(seed)
    model = MLP([12, 9, 5])
    inject_adapters(model, r=3, lora_alpha=5, use_dora=use_dora, use_rslora=use_rslora,
                    target_modules=["fc1", "fc2"], rank_pattern={"fc2": 2})
    g = np.random.default_rng(seed + 1)
    for name, p in model.named_parameters():
        if ".lora_" in name:
            p.data[...] = g.standard_normal(p.shape).astype(np.float32)
    return model


def fresh_base(seed: int = 0) -> MLP:
    manual_seed(seed)  # the same base weights as adapted(seed): only the adapters come from the file
    return MLP([12, 9, 5])


def out(model: MLP) -> np.ndarray:
    with no_grad():
        return model(Tensor(X)).numpy()


# ------------------------------------------------------------------------------ our format


@pytest.mark.parametrize("use_dora", [False, True])
def test_our_format_round_trip_holds_only_the_adapters(tmp_path: Path, use_dora: bool) -> None:
    model = adapted(use_dora=use_dora)
    add_adapter(model, "second", LoraConfig(r=2, lora_alpha=4, target_modules=["fc2"]))
    save_adapters(model, tmp_path / "ad")
    assert {p.name for p in (tmp_path / "ad").iterdir()} == {"adapter_config.json", "adapter_model.npz"}
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["method"] == ("dora" if use_dora else "lora") and config["active_adapter"] == "default"
    assert set(config["adapters"]) == {"default", "second"}
    assert config["adapters"]["default"]["rank_pattern"] == {"fc2": 2} and config["adapters"]["second"]["r"] == 2
    assert config["base_shapes"] == {"fc1": [9, 12], "fc2": [5, 9]}
    keys = set(np.load(tmp_path / "ad" / "adapter_model.npz").files)
    assert not any(k.endswith(("weight", "bias")) for k in keys) and "fc2.lora_A.second" in keys
    base = fresh_base()
    assert load_adapters(base, tmp_path / "ad") == ["default", "second"]
    np.testing.assert_array_equal(out(base), out(model))
    set_adapter(base, "second")
    set_adapter(model, "second")
    np.testing.assert_array_equal(out(base), out(model))


def test_loading_onto_a_base_of_another_shape_is_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    save_adapters(adapted(), tmp_path / "ad")
    manual_seed(0)
    other = MLP([12, 8, 5])
    with pytest.raises(AdapterError, match=r"'fc1' is \(out, in\) = \(8, 12\) in this base, the adapters were made for \(9, 12\)"):
        load_adapters(other, tmp_path / "ad")
    assert not list(lora_layers(other))
    with pytest.raises(AdapterError, match="'fc2', which this base lacks"):
        load_adapters(MLP([12, 9]), tmp_path / "ad")


def test_damaged_or_inconsistent_adapter_files(tmp_path: Path) -> None:
    save_adapters(adapted(), tmp_path / "ad")
    arrays = dict(np.load(tmp_path / "ad" / "adapter_model.npz"))
    del arrays["fc2.lora_B.default"]
    np.savez(tmp_path / "ad" / "adapter_model.npz", **arrays)
    base = fresh_base()
    with pytest.raises(AdapterError, match="missing key.*fc2.lora_B.default"):
        load_adapters(base, tmp_path / "ad")
    assert not list(lora_layers(base))
    (tmp_path / "ad" / "adapter_model.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="adapter_model.npz"):
        load_adapters(base, tmp_path / "ad")
    save_adapters(adapted(), tmp_path / "ok")
    with pytest.raises(AdapterError, match="already has an adapter named 'default'"):
        load_adapters(adapted(), tmp_path / "ok")


# ------------------------------------------------------------------------------ Hugging Face PEFT


@pytest.mark.parametrize("use_dora,use_rslora", [(False, False), (True, False), (False, True)])
def test_peft_export_uses_peft_names_and_round_trips(tmp_path: Path, use_dora: bool, use_rslora: bool) -> None:
    model = adapted(use_dora=use_dora, use_rslora=use_rslora)
    save_peft(model, tmp_path / "hf")
    assert {p.name for p in (tmp_path / "hf").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    tensors = st.load_file(str(tmp_path / "hf" / "adapter_model.safetensors"))
    expected = {f"base_model.model.{m}.{k}" for m in ("fc1", "fc2") for k in ("lora_A.weight", "lora_B.weight")}
    if use_dora:
        expected |= {"base_model.model.fc1.lora_magnitude_vector", "base_model.model.fc2.lora_magnitude_vector"}
    assert set(tensors) == expected
    assert tensors["base_model.model.fc2.lora_A.weight"].shape == (2, 9)
    np.testing.assert_array_equal(tensors["base_model.model.fc1.lora_B.weight"], model.fc1.lora_B["default"].numpy())
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 3 and config["lora_alpha"] == 5.0
    assert config["target_modules"] == ["fc1", "fc2"] and config["rank_pattern"] == {"fc2": 2}
    assert config["use_dora"] is use_dora and config["use_rslora"] is use_rslora
    assert config["bias"] == "none" and config["fan_in_fan_out"] is False and config["init_lora_weights"] is True
    base = fresh_base()
    assert load_peft(base, tmp_path / "hf", "imported") == "imported"
    assert active_adapter(base) == "imported"
    np.testing.assert_array_equal(out(base), out(model))


def test_a_file_written_the_way_peft_writes_it_loads(tmp_path: Path) -> None:
    """Short target names, a regex alpha pattern, float16 weights: as a PyTorch PEFT user would hand us."""
    base = fresh_base()
    g = np.random.default_rng(3)
    a1, b1 = g.standard_normal((4, 12)), g.standard_normal((9, 4))
    a2, b2 = g.standard_normal((4, 9)), g.standard_normal((5, 4))
    folder = tmp_path / "hf"
    folder.mkdir()
    st.save_file({"base_model.model.fc1.lora_A.weight": a1.astype(np.float16), "base_model.model.fc1.lora_B.weight": b1.astype(np.float16),
                  "base_model.model.fc2.lora_A.weight": a2.astype(np.float16), "base_model.model.fc2.lora_B.weight": b2.astype(np.float16)},
                 str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["fc2", "fc1"], "lora_dropout": 0.1,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "init_lora_weights": True, "alpha_pattern": {"fc2": 2},
    }))
    w1, c1 = base.fc1.weight.numpy().astype(np.float64), base.fc1.bias.numpy()
    load_peft(base, folder)
    assert base.fc1.scaling() == 2.0 and base.fc2.scaling() == 0.5 and base.fc1.configs["default"].lora_dropout == 0.1
    a1, b1 = a1.astype(np.float16).astype(np.float64), b1.astype(np.float16).astype(np.float64)
    base.eval()  # no adapter dropout
    with no_grad():
        y = base.fc1(Tensor(X)).numpy()
    np.testing.assert_allclose(y, X @ w1.T + c1 + 2.0 * (X @ a1.T) @ b1.T, rtol=1e-4, atol=1e-4)


def write_peft(model: MLP, folder: Path, drop: str | None = None, config_changes: dict | None = None) -> None:
    save_peft(model, folder)
    if drop:
        tensors = st.load_file(str(folder / "adapter_model.safetensors"))
        del tensors[drop]
        st.save_file(tensors, str(folder / "adapter_model.safetensors"))
    if config_changes:
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(config_changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "drop,changes,needle",
    [
        ("base_model.model.fc2.lora_B.weight", None, "missing key(s) base_model.model.fc2.lora_B.weight"),
        ("base_model.model.fc1.lora_magnitude_vector", None, "missing key(s) base_model.model.fc1.lora_magnitude_vector"),
        (None, {"peft_type": "IA3"}, "peft_type 'IA3'"),
        (None, {"target_modules": ["fc1"]}, "unexpected key(s) base_model.model.fc2"),
        (None, {"fan_in_fan_out": True}, "fan_in_fan_out"),
        (None, {"bias": "all"}, "bias='all'"),
    ],
)
def test_bad_peft_files_are_clear_errors_that_change_nothing(tmp_path: Path, drop, changes, needle: str) -> None:
    write_peft(adapted(use_dora=True), tmp_path / "hf", drop, changes)
    base = fresh_base()
    with pytest.raises(AdapterError) as e:
        load_peft(base, tmp_path / "hf")
    assert needle in str(e.value)
    assert not list(lora_layers(base))


def test_peft_onto_a_base_of_another_shape(tmp_path: Path) -> None:
    write_peft(adapted(), tmp_path / "hf")
    manual_seed(0)
    with pytest.raises(AdapterError, match=r"lora_B.weight.*\(9, 3\)|has shape"):
        load_peft(MLP([12, 8, 5]), tmp_path / "hf")
    with pytest.raises(AdapterError, match="'fc2', which this base lacks"):
        load_peft(MLP([12, 9]), tmp_path / "hf")


def test_without_safetensors_the_error_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_safetensors(name, *args, **kwargs):
        if name.startswith("safetensors"):
            raise ImportError("No module named 'safetensors'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_safetensors)
    with pytest.raises(AdapterError, match=r"pip install 'minitorch_peft\[safetensors\]'"):
        save_peft(adapted(), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert list_adapters(adapted()) == ["default"]


def test_beside_existing_adapters_only_on_adapted_modules(tmp_path: Path) -> None:
    save_adapters(adapted(), tmp_path / "ad")
    model = fresh_base()
    inject_adapters(model, r=2, adapter_name="mine", target_modules=["fc1"])
    with pytest.raises(AdapterError, match="not on fc2"):
        load_adapters(model, tmp_path / "ad")
    assert list_adapters(model) == ["mine"]
    model = fresh_base()
    inject_adapters(model, r=2, adapter_name="mine", target_modules=["fc1", "fc2"])
    load_adapters(model, tmp_path / "ad")
    assert list_adapters(model) == ["mine", "default"] and active_adapter(model) == "default"
    np.testing.assert_array_equal(out(model), out(adapted()))
