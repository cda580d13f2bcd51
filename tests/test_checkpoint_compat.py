"""Model folders written before the fused-op refactor (tests/fixtures/checkpoints, made by main at 36260b7
with tests/fixtures/make_checkpoints.py) still load and give bit-identical outputs, merged and unmerged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import minitorch_peft as mt
from minitorch_peft.checkpoint import load_model
from minitorch_peft.peft import QLoRALinear, lora_layers, merge_adapters

FIXTURES = Path(__file__).parent / "fixtures" / "checkpoints"
KINDS = ["lora", "dora", "qlora_nf4_dq", "qdora_nf4_dq"]


@pytest.mark.parametrize("kind", KINDS)
def test_old_checkpoint_loads_and_gives_the_same_bits(kind: str) -> None:
    model, config = load_model(FIXTURES / kind)
    model.eval()
    layers = [layer for _, layer in lora_layers(model)]
    assert layers and all(isinstance(l, QLoRALinear) == kind.startswith("q") for l in layers)
    assert all(l.configs["default"].use_dora == ("dora" in kind) for l in layers)
    x = mt.tensor(np.load(FIXTURES / "input.npy"))
    out = model(x).data
    expected = np.load(FIXTURES / kind / "expected.npy")
    assert out.dtype == expected.dtype and np.array_equal(out, expected)
    merge_adapters(model)
    assert np.array_equal(model(x).data, np.load(FIXTURES / kind / "expected_merged.npy"))
