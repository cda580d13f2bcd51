"""The train / resume path's bad-input defects (an audit after issue 11), each reproduced: the -best folder,
the rank, a resumed run's saved fields and file sizes, --model-dir beside --resume, and what Ctrl-C says.
Every test here failed before the fix it names."""

from __future__ import annotations

import json
import tracemalloc
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import assert_one_line_error, cli_main, needs_mnist
from minitorch_peft.nn.layers import MLP
from minitorch_peft.optim import Adam, OptimizerStateError
from minitorch_peft.peft.model import count_parameters
from minitorch_peft.random import manual_seed
from minitorch_peft.resume import HISTORY_FILE, OPTIMIZER_FILE, RunState, read_run, save_run
from minitorch_peft.schema import MAX_RANK
from minitorch_peft.serialize import CheckpointError
from minitorch_peft.tensor import Tensor
from minitorch_peft.train import DIMS, METHODS, TrainConfig

TINY = ["--limit", "256", "--batch-size", "64"]


def run_folder(path: Path, **settings: Any) -> Path:
    """A resumable folder as ``train`` writes it after one epoch (here of one optimizer step; no data read)."""
    manual_seed(0)
    cfg = TrainConfig(output=str(path), epochs=1, limit=256, **settings)
    model = MLP(DIMS)
    baseline = model.num_parameters()
    optimizer = Adam(METHODS[cfg.method](model, cfg), lr=cfg.lr)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = np.full_like(p.data, 0.01)
    optimizer.step()
    state = RunState(epoch=1, accuracies=[0.5], losses=[2.3, 2.2, 2.1, 2.0], train_seconds=1.5,
                     counts={**count_parameters(model), "baseline": baseline})
    return save_run(model, optimizer, path, asdict(cfg), state)


def edit_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def resume(capsys, folder: Path, *more: str) -> tuple[int, str, str]:
    return cli_main(capsys, "train", "--resume", str(folder), "--epochs", "2", *more,
                    "--output", str(folder.parent / "o"))


# ------------------------------------------------------------------ 1. the -best folder is checked like --output


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_1_save_every_epoch_refuses_a_best_folder_it_may_not_replace(tmp_path: Path, capsys, kind: str) -> None:
    best = tmp_path / "sv-best"
    if kind == "folder":
        best.mkdir()
        (best / "notes.txt").write_text("keep")
    else:
        best.write_text("keep")
    code, out, err = cli_main(capsys, "train", *TINY, "--epochs", "1", "--save-every-epoch", "--output", str(tmp_path / "sv"))
    assert_one_line_error((code, out, err), "--save-every-epoch", str(best),
                          "refusing to replace it" if kind == "folder" else "exists and is not a folder")
    assert out == "" and not (tmp_path / "sv").exists()  # before any work
    assert (best / "notes.txt" if kind == "folder" else best).read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sv-best"]  # no temporary folder left either


def test_1_best_folder_is_the_outputs_sibling(tmp_path: Path, monkeypatch) -> None:
    assert TrainConfig(output=str(tmp_path / "runs" / "a")).best_output() == tmp_path / "runs" / "a-best"
    (tmp_path / "w").mkdir()
    monkeypatch.chdir(tmp_path / "w")
    assert TrainConfig(output=".").best_output() == tmp_path / "w-best"  # not './-best' (which raised ValueError)
    TrainConfig(output=".", save_every_epoch=True).validate()  # an empty folder and a new sibling: accepted


# ------------------------------------------------------------------ 2. a rank no folder can hold


@pytest.mark.parametrize("rank", ["70000", "1000000000"])
def test_2_rank_above_the_schema_maximum_is_refused_before_the_banner(tmp_path: Path, capsys, rank: str) -> None:
    code, out, err = cli_main(capsys, "train", "--rank", rank, "--targets", "fc3", *TINY, "--epochs", "1",
                              "--output", str(tmp_path / "m"))
    assert_one_line_error((code, out, err), f"--rank must be an integer from 1 to {MAX_RANK}, got {rank}")
    assert out == "" and not (tmp_path / "m").exists()


def test_2_the_largest_rank_a_folder_may_hold_is_accepted(tmp_path: Path) -> None:
    TrainConfig(rank=MAX_RANK, targets=["fc3"], output=str(tmp_path / "m")).validate()  # above 10: one warning, later
