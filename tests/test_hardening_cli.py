"""A second audit of bad input at the command line: folders that were written but could not be loaded, summary
lines and data errors that ended in tracebacks, destinations checked only after the work, and flags
without bounds. Every test here failed before the fix it names, except the few that say they keep a behaviour."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import DATA, assert_one_line_error, cli_main, needs_mnist
from minitorch_peft.checkpoint import save_model
from minitorch_peft.nn.layers import MLP
from minitorch_peft.peft import AdapterError, LoraConfig, RankWarning, add_adapter, combine_adapters, inject_adapters, save_peft
from minitorch_peft.random import manual_seed
from test_hardening import TINY, model_folder, rewrite_config


def two_adapter_folder(path: Path) -> Path:
    """A tiny model folder (4-3-2) holding adapters 'default' and 'two' on both layers, as if trained (B != 0)."""
    manual_seed(0)
    model = MLP([4, 3, 2])
    inject_adapters(model, LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    add_adapter(model, "two", LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data[...] = 0.5
    return save_model(model, path)


# ------------------------------------------------------------------ 1. no folder written that cannot be loaded


def test_1_import_peft_refuses_a_rank_above_what_a_model_folder_holds(tmp_path: Path, capsys) -> None:
    pytest.importorskip("safetensors")
    manual_seed(0)
    model = MLP([4, 3, 2])
    with pytest.warns(RankWarning):  # the rank is far above the layer's width: said once, as in PEFT
        inject_adapters(model, LoraConfig(r=70000, target_modules=["fc2"]))
    save_peft(model, tmp_path / "hf")  # a PEFT folder consistent in itself: weights of shape (70000, 3) and (2, 70000)
    base = model_folder(tmp_path / "base", adapters=False, dims=(4, 3, 2))
    result = cli_main(capsys, "import-peft", "--model-dir", str(base), "--peft", str(tmp_path / "hf"),
                      "--output", str(tmp_path / "out"))
    assert_one_line_error(result, "'r' must be an integer from 1 to 65536, got 70000")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["a.b", "a b"])
def test_1_merge_refuses_an_adapter_name_a_model_folder_cannot_hold(tmp_path: Path, capsys, name: str) -> None:
    folder = two_adapter_folder(tmp_path / "m")
    result = cli_main(capsys, "merge", "--model-dir", str(folder), "--adapters", "default,two", "--weights", "1,1",
                      "--adapter-name", name, "--output", str(tmp_path / "out"))
    assert_one_line_error(result, "--adapter-name must be 1 to 128 characters without dots, spaces or slashes", repr(name))
    assert result[1] == "" and not (tmp_path / "out").exists()  # refused before loading anything


def test_1_combine_adapters_refuses_such_a_name_too(tmp_path: Path) -> None:
    from minitorch_peft.checkpoint import load_model

    model, _ = load_model(two_adapter_folder(tmp_path / "m"))
    with pytest.raises(AdapterError, match="without dots, spaces or slashes"):
        combine_adapters(model, ["default", "two"], [1.0, 1.0], "a/b")


# ------------------------------------------------------------------ 2. the infer summary of a schema-valid config


@needs_mnist
@pytest.mark.parametrize("change,needle", [
    (lambda c: c["adapters"]["default"].pop("lora_alpha"), "(adapter 'default', rank=4, alpha=16)"),  # the default
    (lambda c: c.__setitem__("active_adapter", None), "(adapter 'default', rank=4, alpha=16)"),  # the first one
])
def test_2_infer_summarises_a_config_with_defaults_left_out(tmp_path: Path, capsys, small_test_split, change, needle) -> None:
    folder = model_folder(tmp_path / "m")
    rewrite_config(folder, change)
    code, out, err = cli_main(capsys, "infer", "--model-dir", str(folder), "--samples", "2")
    assert code == 0, err
    assert f"Loaded LoRA model from {folder} {needle}" in out


# ------------------------------------------------------------------ 3. data files: unreadable, empty


def _idx(magic_dims: tuple[int, ...], payload: bytes = b"") -> bytes:
    """An unsigned-byte IDX file: magic 0x000008NN, the dims, the payload."""
    return bytes([0, 0, 8, len(magic_dims)]) + b"".join(d.to_bytes(4, "big") for d in magic_dims) + payload


@needs_mnist
def test_3_infer_with_an_unreadable_canonical_file_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """The checksum of a canonical file is read before the file is decoded: a file it cannot open is one line.
    (chmod 000 does not stop root, so the read is made to fail as it would for another user.)"""
    from minitorch_peft.data import clear_cache, datasets

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # no remembered checksum: the file is hashed
    (tmp_path / "data" / "mnist").mkdir(parents=True)
    for name in datasets.SPLITS["test"]:
        shutil.copy(DATA / "mnist" / name, tmp_path / "data" / "mnist" / name)

    def denied(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(datasets, "_sha256", denied)
    clear_cache()
    folder = model_folder(tmp_path / "m")
    result = cli_main(capsys, "infer", "--model-dir", str(folder), "--data-dir", str(tmp_path / "data"))
    assert_one_line_error(result, "cannot read", "t10k-", "Permission denied")


def test_3_infer_with_an_os_error_on_the_data_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    """Any OS error naming a path while the data is loaded (here: on reading a folder) is the user's, as in train."""
    import minitorch_peft.data as data

    def failing(*args, **kwargs):
        raise IsADirectoryError(21, "Is a directory", str(tmp_path / "data"))

    monkeypatch.setattr(data, "load_mnist_like", failing)
    folder = model_folder(tmp_path / "m")
    assert_one_line_error(cli_main(capsys, "infer", "--model-dir", str(folder)), str(tmp_path / "data"), "Is a directory")


def _empty_splits(root: Path) -> Path:
    from minitorch_peft.data import datasets

    (root / "mnist").mkdir(parents=True)
    for split in ("train", "test"):
        images, labels = datasets.SPLITS[split]
        (root / "mnist" / images.removesuffix(".gz")).write_bytes(_idx((0, 28, 28)))
        (root / "mnist" / labels.removesuffix(".gz")).write_bytes(_idx((0,)))
    return root


def test_3_an_empty_split_is_a_data_error(tmp_path: Path) -> None:
    from minitorch_peft.data import DataError, clear_cache, load_mnist_like

    clear_cache()
    with pytest.raises(DataError, match="declares 0 images, an empty split"):
        load_mnist_like("mnist", "test", _empty_splits(tmp_path / "data"))


@pytest.mark.parametrize("command", ["infer", "train"])
def test_3_an_empty_split_is_one_line_in_infer_and_train(tmp_path: Path, capsys, command: str) -> None:
    from minitorch_peft.data import clear_cache

    clear_cache()
    data = _empty_splits(tmp_path / "data")
    args = (["infer", "--model-dir", str(model_folder(tmp_path / "m"))] if command == "infer"
            else ["train", *TINY, "--output", str(tmp_path / "out")])
    assert_one_line_error(cli_main(capsys, *args, "--data-dir", str(data)), "declares 0 images, an empty split")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 4. bench --baseline checked when read


@pytest.mark.parametrize("baseline,needle", [
    ({"format": "minitorch_peft-bench"}, "'models' must map each benchmarked model to its results"),
    ({"format": "minitorch_peft-bench", "models": {"small": []}}, "'models' must map"),
    ({"format": "minitorch_peft-bench", "models": {"small": {}}, "compare": {"torch": []}}, "'compare.torch' must be an object"),
    ({"format": "minitorch_peft-bench", "models": {"small": {}}, "epoch": "x"}, "'epoch' must be an object"),
    ({"format": "minitorch_peft-bench", "models": {"small": {}},
      "compare": {"torch": {"models": {"small": {"ratio": {"train_step_ms": {"lora": "fast"}}}}}}},
     "[small] LoRA step / PyTorch LoRA step: the ratio must be a positive number, got 'fast'"),
])
def test_4_bench_baseline_without_its_sections_is_refused_before_the_run(tmp_path: Path, capsys, monkeypatch,
                                                                        baseline: dict, needle: str) -> None:
    import minitorch_peft.bench as bench_pkg

    monkeypatch.setattr(bench_pkg, "run", lambda cfg, log=print: pytest.fail("the bench ran before the baseline was checked"))
    path = tmp_path / "quiet.json"
    path.write_text(json.dumps(baseline))
    result = cli_main(capsys, "bench", "--load", "1", "--baseline", str(path))
    assert_one_line_error(result, f"--baseline {path}: ", needle)


def test_4_a_real_baseline_is_still_accepted() -> None:
    from minitorch_peft.bench import report

    quiet = {"format": "minitorch_peft-bench", "config": {"load": 0}, "compare": {"torch": {"skipped": "no PyTorch"}},
             "models": {"small": {"ratios": {}}, "medium": {"ratios": {}}}}
    assert report.baseline_problem(quiet) is None
    quiet["compare"] = {"torch": {"models": {"small": {"ratio": {"train_step_ms": {"lora": 0.5, "full": 0.6}}}}}}
    assert report.baseline_problem(quiet) is None
    assert report.quiet_ratios(quiet)[("small", "LoRA step / PyTorch LoRA step")] == 0.5


# ------------------------------------------------------------------ 5. gradcheck tolerances


@pytest.mark.parametrize("flag,value", [("--atol", "inf"), ("--atol", "nan"), ("--atol", "-1"), ("--rtol", "-1"),
                                        ("--rtol", "inf")])
def test_5_gradcheck_refuses_a_tolerance_that_decides_nothing(capsys, flag: str, value: str) -> None:
    code, out, err = cli_main(capsys, "gradcheck", flag, value)
    assert_one_line_error((code, out, err), f"{flag} must be a finite number >= 0, got {float(value):g}")
    assert out == ""  # before any check ran


# ------------------------------------------------------------------ 6. --json / --plot destinations checked first


def test_6_json_under_a_file_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    folder = model_folder(tmp_path / "m")
    given = str(folder / "config.json" / "x.json")
    code, out, err = cli_main(capsys, "infer", "--model-dir", str(folder), "--json", given)
    assert_one_line_error((code, out, err), f"--json {given}: ", "config.json is a file, not a folder")
    assert out == ""  # no banner: nothing was loaded or scored


@pytest.mark.parametrize("command", ["train", "merge"])
def test_6_json_in_an_unwritable_place_is_refused_before_the_model_is_saved(tmp_path: Path, capsys, command: str) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (a place nobody can create files in, even root)")
    args = (["train", *TINY] if command == "train"
            else ["merge", "--model-dir", str(model_folder(tmp_path / "m", dims=(4, 3, 2))), "--unload"])
    code, out, err = cli_main(capsys, *args, "--output", str(tmp_path / "out"), "--json", "/proc/no-such.json")
    line = assert_one_line_error((code, out, err), "--json /proc/no-such.json: cannot write in /proc")
    assert ".tmp" not in line and out == "" and not (tmp_path / "out").exists()


def test_6_json_in_a_missing_folder_is_still_created(tmp_path: Path, capsys) -> None:
    """As for --output, missing folders on the way are made (the behaviour before this check, kept)."""
    folder = model_folder(tmp_path / "m", dims=(4, 3, 2))
    code, out, err = cli_main(capsys, "merge", "--model-dir", str(folder), "--unload", "--output", str(tmp_path / "out"),
                              "--json", str(tmp_path / "new" / "deeper" / "r.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "new" / "deeper" / "r.json").read_text())["output"] == str(tmp_path / "out")


def test_6_a_late_json_failure_names_the_given_path_not_a_temporary_file(tmp_path: Path, monkeypatch) -> None:
    from minitorch_peft.cli.app import UserError, write_json

    def replace_fails(src, dst):
        raise PermissionError(13, "Permission denied", src, dst)

    monkeypatch.setattr("os.replace", replace_fails)
    with pytest.raises(UserError) as e:
        write_json(str(tmp_path / "m.json"), {"a": 1})
    assert str(e.value) == f"--json {tmp_path / 'm.json'}: cannot write it (Permission denied)"
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


def test_6_bench_plot_destination_is_checked_before_the_run(tmp_path: Path, capsys, monkeypatch) -> None:
    import minitorch_peft.bench as bench_pkg

    monkeypatch.setattr(bench_pkg, "run", lambda cfg, log=print: pytest.fail("the bench ran"))
    (tmp_path / "afile").write_text("x")
    given = str(tmp_path / "afile" / "b.png")
    assert_one_line_error(cli_main(capsys, "bench", "--plot", given), f"--plot {given}: ", "is a file, not a folder")


def test_6_train_plot_destination_is_checked_before_any_work(tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    given = str(tmp_path / "afile" / "c.png")
    assert_one_line_error(cli_main(capsys, "train", "--plot", given, "--output", str(tmp_path / "m")),
                          f"--plot {given}: ", "is a file, not a folder")
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------ 7. graph: an honest status, no file lost


def test_7_graph_without_dot_fails_and_replaces_only_its_own_dot_file_atomically(tmp_path: Path, capsys, no_dot,
                                                                                monkeypatch) -> None:
    from minitorch_peft import serialize

    svg, dot = tmp_path / "g.svg", tmp_path / "g.dot"
    first = assert_one_line_error(cli_main(capsys, "graph", "--batch-size", "2", "--output", str(svg)),
                                  "`dot` program was not found, so it was not drawn", f"the DOT source is in {dot}")
    written = dot.read_text()
    assert written.startswith("digraph step {") and not svg.exists()
    # the .dot it wrote is its own: a second run may replace it, and does so atomically
    monkeypatch.setattr(serialize, "fault_hook", lambda label: label.startswith("wrote") and 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli_main(capsys, "graph", "--batch-size", "2", "--method", "full", "--output", str(svg))
    assert dot.read_text() == written and sorted(p.name for p in tmp_path.iterdir()) == ["g.dot"]
    monkeypatch.setattr(serialize, "fault_hook", None)
    assert assert_one_line_error(cli_main(capsys, "graph", "--batch-size", "2", "--output", str(svg))) == first


def test_7_graph_does_not_replace_a_dot_file_it_did_not_write(tmp_path: Path, capsys, no_dot) -> None:
    (tmp_path / "g.dot").write_text("digraph mine { a -> b }\n")
    code, out, err = cli_main(capsys, "graph", "--batch-size", "2", "--output", str(tmp_path / "g.png"))
    assert_one_line_error((code, out, err), f"its DOT source goes to {tmp_path / 'g.dot'}", "refusing to replace it")
    assert (tmp_path / "g.dot").read_text() == "digraph mine { a -> b }\n" and out == ""


def test_7_a_failing_dot_is_one_line(tmp_path: Path, capsys, no_dot, monkeypatch) -> None:
    import subprocess

    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/dot")

    def failing(cmd, **kwargs):
        raise subprocess.CalledProcessError(1, cmd, output=b"", stderr=b"Error: <stdin>: syntax error in line 3\n")

    monkeypatch.setattr(subprocess, "run", failing)
    result = cli_main(capsys, "graph", "--batch-size", "2", "--output", str(tmp_path / "g.svg"))
    assert_one_line_error(result, "`dot` failed (exit status 1: Error: <stdin>: syntax error in line 3)",
                          f"the DOT source is in {tmp_path / 'g.dot'}")
    assert not (tmp_path / "g.svg").exists()


# ------------------------------------------------------------------ 8. a batch size with a ceiling


@pytest.mark.parametrize("command", ["trace", "graph"])
def test_8_a_huge_batch_is_one_line_before_allocating(capsys, command: str) -> None:
    code, out, err = cli_main(capsys, command, "--batch-size", "100000000")
    assert_one_line_error((code, out, err), "--batch-size", "100000000 is not in the range 1<=x<=60000")
    assert out == ""


# ------------------------------------------------------------------ 9. minor: overflow, folders, unreadable files


@pytest.mark.parametrize("combination", ["svd", "cat"])
def test_9_merge_weights_that_overflow_are_one_line_without_a_warning(tmp_path: Path, capsys, combination: str) -> None:
    import warnings

    folder = two_adapter_folder(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an overflow warning would now raise, not print
        result = cli_main(capsys, "merge", "--model-dir", str(folder), "--adapters", "default,two", "--weights",
                          "1e308,1e308", "--combination", combination, "--output", str(tmp_path / "out"))
    assert_one_line_error(result, "with weights 1e+308, 1e+308 overflows in module", "use smaller weights")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["config.json", "base.npz"])
def test_9_a_folder_in_place_of_a_model_file_says_so(tmp_path: Path, capsys, name: str) -> None:
    folder = model_folder(tmp_path / "m", adapters=False, dims=(4, 3, 2))
    (folder / name).unlink()
    (folder / name).mkdir()
    line = assert_one_line_error(cli_main(capsys, "infer", "--model-dir", str(folder)),
                                 f"{folder / name}: is a directory, not a file")
    assert "not found" not in line


def test_9_an_unreadable_base_npz_says_it_cannot_be_read(tmp_path: Path, capsys, monkeypatch) -> None:
    """(chmod 000 does not stop root, so opening the file is made to fail as it would for another user.)"""
    import builtins
    import io

    folder = model_folder(tmp_path / "m", adapters=False, dims=(4, 3, 2))
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if str(file).endswith("base.npz"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(io, "open", guarded)  # what zipfile calls
    line = assert_one_line_error(cli_main(capsys, "infer", "--model-dir", str(folder)),
                                 f"{folder / 'base.npz'}: cannot read it (Permission denied)")
    assert "corrupted" not in line


def test_9_an_unreadable_config_json_is_a_checkpoint_error(tmp_path: Path, monkeypatch) -> None:
    from minitorch_peft.serialize import CheckpointError, load_json

    (tmp_path / "c.json").write_text("{}")

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(CheckpointError, match=r"c.json: cannot read it \(Permission denied\)"):
        load_json(tmp_path / "c.json")


# ------------------------------------------------------------------ 10. flags that would do nothing, or too much


@needs_mnist
def test_10_distributed_flags_without_distributed_are_named_as_ignored(tmp_path: Path, capsys, small_test_split) -> None:
    code, out, err = cli_main(capsys, "train", *TINY, "--dist-timeout", "3", "--log-all-ranks", "--output", str(tmp_path / "m"))
    assert code == 0 and (tmp_path / "m" / "config.json").is_file()
    assert err.strip().splitlines() == [
        "warning: --dist-timeout, --log-all-ranks only apply with --distributed (or under mpiexec); ignored"]


@pytest.mark.parametrize("load", ["-1", "65", "100000"])
def test_10_bench_load_is_bounded_before_any_process_starts(capsys, monkeypatch, load: str) -> None:
    import minitorch_peft.bench as bench_pkg

    monkeypatch.setattr(bench_pkg, "run", lambda cfg, log=print: pytest.fail("the bench ran"))
    assert_one_line_error(cli_main(capsys, "bench", "--load", load), f"--load must be from 0 to 64, got {load}")


def test_10_a_write_protected_model_folder_is_not_replaced(tmp_path: Path, capsys) -> None:
    """The save swaps names in the parent, so without this check a chmod 555 model folder was replaced (and
    came back writable): a folder with no write bit is its owner's to keep."""
    folder = model_folder(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    folder.chmod(0o555)
    try:
        assert_one_line_error(cli_main(capsys, "train", *TINY, "--output", str(folder)),
                              f"--output {folder}: the folder is write-protected; refusing to replace it")
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    finally:
        folder.chmod(0o755)
    model_folder(folder)  # writable again: replaced as before
