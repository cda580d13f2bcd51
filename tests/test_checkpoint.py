"""Model folders: structure and values come back exactly, in the dtype they were saved in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from minitorch_peft import CheckpointError, manual_seed, peft
from minitorch_peft.checkpoint import load_model, save_model
from minitorch_peft.nn import MLP


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_keeps_values_and_dtype(tmp_path: Path, dtype: type) -> None:
    manual_seed(3)
    model = MLP([6, 5, 3], dtype=dtype)
    peft.inject_adapters(model, r=2, lora_alpha=4, target_modules=["fc1", "fc2"])
    for p in model.parameters():  # non-zero B, so a lost adapter would show
        p.data[...] = np.random.default_rng(0).standard_normal(p.shape)
    save_model(model, tmp_path / "m")
    loaded, config = load_model(tmp_path / "m")
    assert config["architecture"]["dtype"] == np.dtype(dtype).name
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    for key in original:
        assert restored[key].dtype == original[key].dtype, key
        np.testing.assert_array_equal(restored[key], original[key], err_msg=key)


def test_unknown_dtype_is_refused(tmp_path: Path) -> None:
    save_model(MLP([4, 3, 2]), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["architecture"]["dtype"] = "int8"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="dtype"):
        load_model(tmp_path / "m")
