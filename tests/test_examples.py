"""The scripts in examples/ run as a user runs them (a fresh interpreter, from another folder)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT

EXAMPLES = ROOT / "examples"


def run(name: str, *args: str, cwd) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_there_are_three_examples() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == [
        "01_autograd_from_scratch.py", "02_lora_by_hand.py", "03_finetune_python_api.py"]


@pytest.mark.slow
def test_01_autograd_from_scratch(tmp_path) -> None:
    out = run("01_autograd_from_scratch.py", cwd=tmp_path)
    assert "part 2  the engine agrees" in out and "part 3  test accuracy" in out


@pytest.mark.slow
def test_02_lora_by_hand(tmp_path) -> None:
    out = run("02_lora_by_hand.py", cwd=tmp_path)
    assert "W0 has no gradient: True" in out and "LoRALinear gives the same outputs: True" in out
    assert "rank 2 (r = 2)" in out


@pytest.mark.slow
def test_03_finetune_python_api(tmp_path) -> None:
    out = run("03_finetune_python_api.py", str(tmp_path / "run"), cwd=tmp_path)
    assert "both give the fine-tuned outputs" in out
    for folder in ("base", "adapter", "merged"):
        assert (tmp_path / "run" / folder).is_dir()
