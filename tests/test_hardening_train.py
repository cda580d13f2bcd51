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
from minitorch_peft.errors import MinitorchPeftError
from minitorch_peft.nn.layers import MLP
from minitorch_peft.optim import Adam, OptimizerStateError
from minitorch_peft.peft.model import count_parameters
from minitorch_peft.random import manual_seed
from minitorch_peft.resume import HISTORY_FILE, OPTIMIZER_FILE, MAX_TRAIN_SAMPLES, RunState, read_run, save_run
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


# ------------------------------------------------------------------ 3. a resumed run's saved fields are typed


@pytest.fixture
def saved_run(tmp_path: Path) -> Path:
    return run_folder(tmp_path / "run")


def _set(path: str, value: Any):
    def change(config: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = config
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
    return change


@pytest.mark.parametrize("field,value,needle", [
    ("training.batch_size", "64", "'training.batch_size' must be an integer >= 1, got '64'"),
    ("training.limit", "x", "'training.limit' must be an integer >= 1 or null, got 'x'"),
    ("training.lr", "abc", "'training.lr' must be a finite number > 0, got 'abc'"),
    ("training.seed", 1.5, "'training.seed' must be an integer from 0 to 2**63 - 1, got 1.5"),
    ("training.targets", 5, "'training.targets' must be a non-empty list of module names, got 5"),
    ("training.method", "bogus", "'training.method' must be one of lora, "),
    ("training.test_accuracy", ["x"], "'training.test_accuracy' must be a list of accuracies"),
    ("resume.train_seconds", "abc", "'resume.train_seconds' must be a finite number >= 0, got 'abc'"),
    ("resume.params", [1, 2], "'resume.params' must be an object mapping names to parameter counts"),
    ("resume.optimizer.with_state", 5, "'resume.optimizer.with_state' must be a list of tensor indices"),
    ("resume.optimizer.with_state", ["a"], "'resume.optimizer.with_state' must be a list of tensor indices"),
    ("resume.optimizer.param_groups", ["x"], "'resume.optimizer.param_groups[0]' must be an object"),
    ("resume.optimizer.param_groups.0.lr", "x", "'resume.optimizer.param_groups[0].lr' must be a finite number > 0"),
    ("resume.optimizer.param_groups.0.betas", [0.9, 1.0], "'resume.optimizer.param_groups[0].betas' must be a list of two"),
    ("resume.optimizer.param_groups.0.params", "x", "'resume.optimizer.param_groups[0].params' must be a list of tensor"),
])
def test_3_mistyped_saved_fields_are_one_line_naming_file_and_field(saved_run: Path, capsys, field: str, value: Any,
                                                                   needle: str) -> None:
    edit_config(saved_run, _set(field, value))
    code, out, err = resume(capsys, saved_run)
    assert_one_line_error((code, out, err), f"{saved_run}/config.json: ", needle)
    assert out == "" and not (saved_run.parent / "o").exists()  # refused before anything was read or built


@pytest.mark.parametrize("step,needle", [(-5, "'0.step' must be a count (an integer >= 0), got -5"),
                                         (1.5, "'0.step' must be a count (an integer >= 0), got 1.5")])
def test_3_a_negative_or_fractional_step_count_is_refused(saved_run: Path, capsys, step: float, needle: str) -> None:
    path = saved_run / OPTIMIZER_FILE
    with np.load(path) as z:
        arrays = dict(z)
    arrays["0.step"] = np.asarray(step)  # was: "math domain error" (sqrt(1 - beta2**step) of a negative number)
    np.savez(path, **arrays)
    code, out, err = resume(capsys, saved_run)
    assert_one_line_error((code, out, err), f"{saved_run}/{OPTIMIZER_FILE}: ", needle)
    assert out == ""


@pytest.mark.parametrize("method", ["lora", "lora-plus", "dora", "qlora", "full", "head"])
def test_3_what_train_writes_is_read_back(tmp_path: Path, method: str) -> None:
    training, state = read_run(run_folder(tmp_path / "run", method=method))
    assert training["method"] == method and state.epoch == 1 and state.losses == [2.3, 2.2, 2.1, 2.0]
    assert state.train_seconds == 1.5 and state.counts["baseline"] == MLP(DIMS).num_parameters()
    assert state.optimizer_arrays and all(k.split(".")[1] in ("m", "v", "step") for k in state.optimizer_arrays)


@pytest.mark.parametrize("state,needle", [
    ({"state": {}, "param_groups": ["x"]}, "'param_groups' must be a list of parameter groups"),
    ({"state": [], "param_groups": [{"params": [0]}]}, "'state' must map tensor indices"),
    ({"state": {}, "param_groups": [{"params": [0], "lr": "x"}]}, "setting 'lr' is 'x'"),
    ({"state": {}, "param_groups": [{"params": [0], "lr": -1.0}]}, "setting 'lr' is -1.0"),
    ({"state": {}, "param_groups": [{"params": [0], "betas": [0.9]}]}, "setting 'betas' is [0.9]"),
    ({"state": {}, "param_groups": [{"params": 5}]}, "'params' must be a list of tensor indices"),
    ({"state": {"a": {}}, "param_groups": [{"params": [0]}]}, "state key 'a' is not a tensor index"),
    ({"state": {0: {"step": -5}}, "param_groups": [{"params": [0]}]}, "state 'step' of tensor 0 must be a count"),
    ({"state": {0: {"step": 1.5}}, "param_groups": [{"params": [0]}]}, "state 'step' of tensor 0 must be a count"),
])
def test_3_load_state_dict_refuses_wrong_kinds_by_name(state: dict[str, Any], needle: str) -> None:
    opt = Adam([Tensor(np.zeros(3, np.float32), requires_grad=True)])
    with pytest.raises(OptimizerStateError) as e:
        opt.load_state_dict(state)
    assert needle in str(e.value)
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.state == {}  # nothing changed


def test_3_load_state_dict_still_takes_counts_as_0d_arrays_and_whole_floats() -> None:
    p = Tensor(np.zeros(3, np.float32), requires_grad=True)
    opt = Adam([p])
    opt.load_state_dict({"state": {"0": {"step": np.asarray(3), "m": np.ones(3), "v": np.ones(3)}},
                         "param_groups": [{"params": [0], "lr": 0.5, "betas": [0.8, 0.9]}]})
    assert opt.state[id(p)]["step"] == 3 and opt.param_groups[0]["betas"] == (0.8, 0.9)
    opt.load_state_dict({"state": {0: {"step": 4.0}}, "param_groups": [{"params": [0]}]})
    assert opt.state[id(p)]["step"] == 4 and type(opt.state[id(p)]["step"]) is int


# ------------------------------------------------------------------ 4. history.npz and optimizer.npz are bounded


def _deflated_member(path: Path, name: str, dtype: str, count: int) -> None:
    """Replace ``path`` by an archive of one deflated member ``name`` declaring ``count`` zeros (a few kB on disk)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf, zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": (count,)})
        chunk = bytes(1 << 20)
        left = count * np.dtype(dtype).itemsize
        while left:
            f.write(chunk[:min(left, len(chunk))])
            left -= min(left, len(chunk))


@pytest.mark.parametrize("file,name,dtype", [(HISTORY_FILE, "loss_per_step", "<f8"), (OPTIMIZER_FILE, "0.m", "<f4")])
def test_4_a_small_file_declaring_64_mb_is_refused_before_allocating(saved_run: Path, file: str, name: str,
                                                                     dtype: str) -> None:
    _deflated_member(saved_run / file, name, dtype, (64 << 20) // np.dtype(dtype).itemsize)
    assert (saved_run / file).stat().st_size < 256 << 10
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"arrays of 67,108,864 bytes, more than the [\d,]+ expected") as e:
            read_run(saved_run)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f"{saved_run / file}: " in str(e.value)
    assert peak < 8 << 20, f"{peak:,} bytes allocated before refusing"


def test_4_the_history_bound_is_every_step_of_the_largest_data_file_per_epoch(saved_run: Path) -> None:
    """A run may legitimately hold one loss per sample (batch size 1) of the largest training file per epoch."""
    steps = 3 * 1000
    edit_config(saved_run, lambda c: (c["resume"].__setitem__("epoch", 3), c["training"].__setitem__("test_accuracy", [0.5] * 3)))
    np.savez(saved_run / HISTORY_FILE, loss_per_step=np.full(steps, 0.5))
    assert len(read_run(saved_run)[1].losses) == steps
    assert MAX_TRAIN_SAMPLES >= 60_000  # MNIST's training split, at batch size 1
    np.savez(saved_run / HISTORY_FILE, loss_per_step=np.array([0.5, np.nan]))
    with pytest.raises(CheckpointError, match="'loss_per_step' holds 1 non-finite"):
        read_run(saved_run)


# ------------------------------------------------------------------ 5. --model-dir beside --resume


@pytest.mark.parametrize("flag", ["--model-dir", "--base"])
def test_5_model_dir_beside_resume_is_refused_not_dropped(saved_run: Path, capsys, flag: str) -> None:
    code, out, err = resume(capsys, saved_run, flag, str(saved_run))
    assert_one_line_error((code, out, err), "--resume continues a saved run", "drop --model-dir")
    assert out == "" and not (saved_run.parent / "o").exists()


@needs_mnist
def test_5_a_run_started_from_a_model_dir_can_be_resumed(tmp_path: Path, capsys, small_test_split) -> None:
    """Its saved 'base' is the first run's start, not a --model-dir given beside --resume (which was refused)."""
    assert cli_main(capsys, "train", *TINY, "--epochs", "1", "--output", str(tmp_path / "a"))[0] == 0
    code, _, err = cli_main(capsys, "train", *TINY, "--epochs", "1", "--model-dir", str(tmp_path / "a"),
                            "--adapter-name", "b", "--output", str(tmp_path / "ab"))
    assert code == 0, err
    code, out, err = cli_main(capsys, "train", "--resume", str(tmp_path / "ab"), "--epochs", "2")
    assert code == 0 and err == "", err
    config = json.loads((tmp_path / "ab" / "config.json").read_text())
    assert config["resume"]["epoch"] == 2 and sorted(config["adapters"]) == ["b", "default"]


# ------------------------------------------------------------------ 6. what Ctrl-C says


@needs_mnist
def test_6_ctrl_c_after_saved_epochs_says_where_the_last_one_is(tmp_path: Path, capsys, monkeypatch,
                                                               small_test_split) -> None:
    import minitorch_peft.train as train

    real, calls = train.train_epoch, []

    def epoch(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during epoch 2, after epoch 1 was saved
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", epoch)
    sv = tmp_path / "sv"
    code, out, err = cli_main(capsys, "train", *TINY, "--epochs", "3", "--save-every-epoch", "--output", str(sv))
    assert code == 130 and "Saved epoch 1" in out
    assert [line for line in err.splitlines() if line.strip()] == [
        f"interrupted: epoch 1 of 3 is saved in {sv} and {sv}-best (the best so far); continue with --resume {sv} --epochs 3"]
    assert json.loads((sv / "config.json").read_text())["resume"]["epoch"] == 1


def test_6_the_note_names_an_older_best_and_omits_the_hint_once_done(tmp_path: Path) -> None:
    from minitorch_peft.train import _saved_note

    out, best = tmp_path / "sv", tmp_path / "sv-best"
    assert _saved_note({out: 3, best: 1}, out, best, 5) == (
        f"epoch 3 of 5 is saved in {out}; the best so far, epoch 1, in {best}; continue with --resume {out} --epochs 5")
    assert _saved_note({out: 5, best: 5}, out, best, 5) == f"epoch 5 of 5 is saved in {out} and {best} (the best so far)"


def test_6_the_cli_prints_what_train_says_was_saved(monkeypatch, capsys) -> None:
    import minitorch_peft.train as train
    from minitorch_peft.errors import Interrupted

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise Interrupted("epoch 1 of 2 is saved in x")

    monkeypatch.setattr(train, "train", interrupted)
    code, _, err = cli_main(capsys, "train", *TINY)
    assert code == 130 and [line for line in err.splitlines() if line.strip()] == ["interrupted: epoch 1 of 2 is saved in x"]
    assert issubclass(Interrupted, KeyboardInterrupt) and not issubclass(Interrupted, MinitorchPeftError)


@needs_mnist
def test_6_a_diverging_epoch_after_saved_ones_says_where_they_are(tmp_path: Path, capsys, monkeypatch,
                                                                  small_test_split) -> None:
    """A NaN loss in epoch 2 of a --save-every-epoch run: epoch 1 stays saved, and the line says so (not
    "nothing was saved"), without a --resume hint, since resuming with the same settings would diverge again."""
    import minitorch_peft.train as train

    real, calls = train.train_epoch, []

    def epoch(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise train.NonFiniteLoss("training stopped: the loss became nan at epoch 2, step 1 of 4; "
                                      "likely cause: ...; nothing was saved")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", epoch)
    sv = tmp_path / "sv"
    line = assert_one_line_error(
        cli_main(capsys, "train", *TINY, "--epochs", "3", "--save-every-epoch", "--output", str(sv)),
        f"nothing more was saved (epoch 1 of 3 is saved in {sv} and {sv}-best (the best so far))")
    assert "--resume" not in line and json.loads((sv / "config.json").read_text())["resume"]["epoch"] == 1
