"""A save killed (SIGKILL: no cleanup runs) at *each* of its steps leaves the old model or the new one,
loadable, never a missing folder; the next save removes what the killed one left.

The kill is injected: ``$MINITORCH_PEFT_FAULT_AT_SAVE_STEP=k`` makes the saving process kill itself at its
k-th step (``serialize.save_step``). The sweep forks the test process for each k (a real process, killed
for real, without an interpreter start per step); one test runs the same in a fresh interpreter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT
from minitorch_peft import serialize
from minitorch_peft.checkpoint import load_model, save_model
from minitorch_peft.nn.layers import MLP
from minitorch_peft.peft import LoraConfig, inject_adapters
from minitorch_peft.random import manual_seed

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL (POSIX)")


def make(value: float) -> MLP:
    """A small LoRA model whose every parameter is ``value`` (so a loaded folder tells which save it is)."""
    manual_seed(0)
    model = MLP([6, 5, 3])
    inject_adapters(model, LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    for p in model.parameters():
        p.data[...] = value
    return model


def which(folder: Path) -> float:
    model, _ = load_model(folder)
    values = {float(v) for p in model.parameters() for v in np.unique(p.data)}
    assert len(values) == 1, values
    return values.pop()


def killed_save(folder: Path, step: int) -> bool:
    """Fork; the child saves the 'new' model (2.0) with a fault at ``step``. True if it was killed there."""
    model = make(2.0)
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            serialize._steps_taken = 0
            os.environ[serialize.FAULT_ENV] = str(step)
            save_model(model, folder, files={"optimizer.npz": {"step": np.array([7])}})
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0
    return False


@pytest.mark.parametrize("with_old", [True, False], ids=["over-an-old-model", "first-save"])
@pytest.mark.slow
def test_kill_at_every_step_leaves_old_or_new(tmp_path: Path, with_old: bool) -> None:
    outcomes: list[str] = []
    for step in range(1, 100):
        root = tmp_path / f"k{step}"
        root.mkdir()
        folder = root / "model"
        if with_old:
            save_model(make(1.0), folder)
        if not killed_save(folder, step):
            assert which(folder) == 2.0  # ran to the end: the new model
            break
        if folder.exists():
            outcomes.append({1.0: "old", 2.0: "new"}[which(folder)])  # loads, whole, one version or the other
        else:
            assert not with_old, f"killed at step {step}: the model folder is missing"
            outcomes.append("none")
        # the next save of the folder removes whatever the killed one left beside it
        save_model(make(3.0), folder)
        assert [p.name for p in root.iterdir()] == ["model"], f"step {step}: leftovers {list(root.iterdir())}"
        assert which(folder) == 3.0
    assert len(outcomes) >= 10, outcomes  # every step of the save was a kill point
    assert outcomes[0] == ("old" if with_old else "none") and outcomes[-1] == "new"
    assert outcomes == sorted(outcomes, key=["old", "none", "new"].index)  # one switch, old -> new


def test_an_old_layout_folder_still_loads_and_is_replaced_cleanly(tmp_path: Path) -> None:
    """A folder written before this layout (config.json + base.npz + adapters.npz, no markers) loads as it is."""
    folder = tmp_path / "model"
    save_model(make(1.0), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["adapters.npz", "base.npz", "config.json"]
    (tmp_path / ".model.a1b2c3d4.old" / "previous").mkdir(parents=True)  # what a killed save of that layout left
    assert which(folder) == 1.0
    save_model(make(2.0), folder)
    assert which(folder) == 2.0 and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_extra_files_are_saved_in_the_same_switch(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    save_model(make(1.0), folder, files={"optimizer.npz": {"m": np.ones(3), "step": np.array([5])}})
    assert serialize.load_npz(folder / "optimizer.npz")["step"].tolist() == [5]
    save_model(make(2.0), folder)  # a save without the extra file: the folder is replaced whole
    assert not (folder / "optimizer.npz").exists()
    with pytest.raises(ValueError, match="extra file name"):
        save_model(make(2.0), folder, files={"base.npz": {}})


@pytest.mark.slow
def test_killed_in_a_fresh_interpreter_via_the_environment(tmp_path: Path) -> None:
    """The fault injection as a user's process meets it: a new interpreter, killed between write and switch."""
    folder = tmp_path / "model"
    save_model(make(1.0), folder)
    code = ("import sys; sys.path.insert(0, 'tests'); from test_atomic_save import make; "
            "from minitorch_peft.checkpoint import save_model; save_model(make(2.0), sys.argv[1])")
    steps = {}

    def hook(label: str) -> None:
        steps[len(steps) + 1] = label

    serialize.fault_hook = hook
    try:
        save_model(make(1.0), tmp_path / "count")
    finally:
        serialize.fault_hook = None
    at = next(k for k, label in steps.items() if label == "wrote every file")
    result = subprocess.run([sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, serialize.FAULT_ENV: str(at)}, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert which(folder) == 1.0
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".model.save-")]) == 1  # the complete new copy, unused
    save_model(make(2.0), folder)
    assert which(folder) == 2.0 and sorted(p.name for p in tmp_path.iterdir()) == ["count", "model"]
