"""The main job end to end on real MNIST: cli.py train, then cli.py infer on what it saved; and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import DATA, ROOT, assert_one_line_error, needs_mnist, run_cli

needs_data = needs_mnist


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("method,extra,floor", [("full", [], 0.85), ("lora", ["--lr", "5e-3"], 0.85)])
def test_train_then_infer_reproduces_accuracy(tmp_path: Path, method: str, extra: list[str], floor: float) -> None:
    out = tmp_path / "model"
    train = run_cli("train", "--method", method, "--limit", "6000", "--epochs", "1", "--output", str(out),
                    "--json", str(tmp_path / "train.json"), *extra)
    assert train.returncode == 0, train.stderr
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["final_test_accuracy"] >= floor, metrics
    assert metrics["method"] == method and metrics["epochs"] == 1 and len(metrics["test_accuracy"]) == 1
    assert metrics["params"]["baseline"] == 535_818
    if method == "lora":
        assert metrics["params"]["trainable"] == 18_640
        assert metrics["params"]["total"] == 535_818 + 18_640
        assert (out / "adapters.npz").stat().st_size < (out / "base.npz").stat().st_size / 10
    else:
        assert metrics["params"]["trainable"] == 535_818
    # the model, plus what --resume needs (optimizer state, per-step losses); nothing else (no temp files)
    assert {p.name for p in out.iterdir()} <= {"config.json", "base.npz", "adapters.npz", "optimizer.npz", "history.npz"}
    assert {"config.json", "base.npz", "optimizer.npz", "history.npz"} <= {p.name for p in out.iterdir()}

    infer = run_cli("infer", "--model-dir", str(out), "--samples", "10", "--json", str(tmp_path / "infer.json"))
    assert infer.returncode == 0, infer.stderr
    result = json.loads((tmp_path / "infer.json").read_text())
    assert result["test_accuracy"] == metrics["final_test_accuracy"]  # exactly: same weights, same arithmetic
    assert len(result["samples"]) == 10
    assert [s["actual"] for s in result["samples"]] == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert "Sample 1: Predicted: " in infer.stdout and "Accuracy on 10 samples" in infer.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--rank", "0"], "--rank"),
        (["train", "--lr", "0"], "--lr"),
        (["train", "--lr", "-1e-3"], "--lr"),
        (["train", "--batch-size", "0"], "--batch-size"),
        (["train", "--epochs", "-1"], "--epochs"),
        (["train", "--method", "nope"], "nope"),
        (["train", "--backend", "tpu"], "tpu"),
        (["train", "--dataset", "cifar"], "cifar"),
        (["infer", "--model-dir", "/nonexistent/model"], "/nonexistent/model"),
    ],
)
@pytest.mark.slow
def test_bad_flags_give_one_line(args: list[str], needle: str) -> None:
    assert_one_line_error(run_cli(*args), needle)


@pytest.mark.slow
def test_missing_data_folder_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("train", "--data-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "m"))
    assert_one_line_error(proc, "nowhere")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_corrupt_idx_file_is_one_line(tmp_path: Path) -> None:
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (mnist / name).write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 7)  # header cut short
    proc = run_cli("train", "--data-dir", str(tmp_path), "--output", str(tmp_path / "m"))
    assert_one_line_error(proc, "train-images-idx3-ubyte")


@pytest.mark.slow
@needs_data
def test_corrupt_model_folder_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert run_cli("train", "--limit", "256", "--epochs", "1", "--output", str(out)).returncode == 0
    data = (out / "base.npz").read_bytes()
    (out / "base.npz").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run_cli("infer", "--model-dir", str(out)), "base.npz")
    (out / "config.json").write_text("{not json")
    assert_one_line_error(run_cli("infer", "--model-dir", str(out)), "config.json")


@needs_data
@pytest.mark.slow
def test_base_of_another_shape_is_one_line(tmp_path: Path) -> None:
    from minitorch_peft.checkpoint import save_model
    from minitorch_peft.nn import MLP

    save_model(MLP([100, 32, 10]), tmp_path / "odd")
    proc = run_cli("train", "--base", str(tmp_path / "odd"), "--limit", "64", "--output", str(tmp_path / "m"))
    assert_one_line_error(proc, "100")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
@needs_data
def test_ctrl_c_leaves_earlier_checkpoint_intact(tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert run_cli("train", "--limit", "256", "--epochs", "1", "--output", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = {**os.environ, "MINITORCH_PEFT_DATA": str(DATA), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "train", "--epochs", "50", "--output", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stdout is not None
    deadline = time.time() + 120
    for line in proc.stdout:  # wait until training has really started
        if "Training for" in line or time.time() > deadline:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folders left behind


@pytest.mark.slow
def test_cli_help_lists_commands() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for command in ("train", "infer"):
        assert command in proc.stdout
