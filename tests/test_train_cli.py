"""train's resume, per-epoch checkpoints, per-step loss, curves; the CLI's names, aliases, help and warnings."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import click
import numpy as np
import pytest

from conftest import assert_one_line_error, cli_main, needs_mnist

TINY = ["--limit", "256", "--batch-size", "64"]


def files_equal(a: Path, b: Path) -> None:
    """Every array of every .npz in folder ``a`` equals its twin in ``b``, bit for bit."""
    names = sorted(p.name for p in a.glob("*.npz"))
    assert names == sorted(p.name for p in b.glob("*.npz")) and "optimizer.npz" in names
    for name in names:
        x, y = np.load(a / name), np.load(b / name)
        assert sorted(x.files) == sorted(y.files), name
        for k in x.files:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}:{k}")
            assert x[k].dtype == y[k].dtype


def ok(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[str, str]:
    code, out, err = cli_main(capsys, *args)
    assert code == 0, err
    return out, err


# ------------------------------------------------------------------------------ resume


@needs_mnist
@pytest.mark.parametrize("method,extra", [("dora", ["--dropout", "0.1"]), ("lora-plus", []), ("qlora", [])])
@pytest.mark.slow
def test_three_epochs_equal_two_resumed_for_one_more(tmp_path: Path, capsys, small_test_split, method: str,
                                                     extra: list[str]) -> None:
    """The resume test of the issue: weights, optimizer state, accuracies and per-step losses bit-identical.
    (dora with dropout: the random generator's state is restored too; lora-plus: two optimizer groups.)"""
    common = ["train", "--method", method, *TINY, *extra]
    ok(capsys, *common, "--epochs", "3", "--output", str(tmp_path / "full"), "--json", str(tmp_path / "full.json"))
    ok(capsys, *common, "--epochs", "2", "--output", str(tmp_path / "part"))
    out, err = ok(capsys, "train", "--resume", str(tmp_path / "part"), "--epochs", "3", "--json", str(tmp_path / "res.json"))
    assert "Resuming" in out and "epoch 2 of 3 done" in out and "Epoch 3/3" in out and "Epoch 1/3" not in out
    files_equal(tmp_path / "full", tmp_path / "part")
    full, resumed = json.loads((tmp_path / "full.json").read_text()), json.loads((tmp_path / "res.json").read_text())
    assert resumed["test_accuracy"] == full["test_accuracy"] and len(full["test_accuracy"]) == 3
    assert resumed["loss_per_step"] == full["loss_per_step"] and len(full["loss_per_step"]) == 3 * 4
    assert resumed["resumed_from"] == {"model_dir": str(tmp_path / "part"), "epoch": 2}
    config = json.loads((tmp_path / "part" / "config.json").read_text())
    assert config["resume"]["epoch"] == 3 and config["training"]["method"] == method


@needs_mnist
def test_resume_refuses_a_finished_run_and_a_folder_without_state(tmp_path: Path, capsys, small_test_split) -> None:
    ok(capsys, "train", *TINY, "--epochs", "1", "--output", str(tmp_path / "a"))
    assert_one_line_error(cli_main(capsys, "train", "--resume", str(tmp_path / "a")), "already trained 1 epoch(s)", "--epochs")
    (tmp_path / "a" / "optimizer.npz").write_bytes(b"not a zip")
    assert_one_line_error(cli_main(capsys, "train", "--resume", str(tmp_path / "a"), "--epochs", "2"), "optimizer.npz")
    ok(capsys, "merge", "--model-dir", str(tmp_path / "a"), "--unload", "--output", str(tmp_path / "plain"))
    assert_one_line_error(cli_main(capsys, "train", "--resume", str(tmp_path / "plain"), "--epochs", "2"),
                          "no resumable run there")
    assert_one_line_error(cli_main(capsys, "train", "--resume", str(tmp_path / "nope")), "model folder not found")


@needs_mnist
def test_resume_warns_about_settings_it_does_not_take(tmp_path: Path, capsys, small_test_split) -> None:
    ok(capsys, "train", *TINY, "--epochs", "1", "--output", str(tmp_path / "a"))
    out, err = ok(capsys, "train", "--resume", str(tmp_path / "a"), "--epochs", "2", "--rank", "4", "--lr", "0.1",
                  "--output", str(tmp_path / "b"))
    assert err.strip().splitlines() == ["warning: --resume continues with the saved run's settings; ignored: --rank, --lr"]
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["adapters"]["default"]["r"] == 8 and config["training"]["lr"] == 1e-3 and config["resume"]["epoch"] == 2
    assert json.loads((tmp_path / "a" / "config.json").read_text())["resume"]["epoch"] == 1  # --output elsewhere: a untouched


@needs_mnist
def test_save_every_epoch_keeps_last_and_best(tmp_path: Path, capsys, small_test_split) -> None:
    out, _ = ok(capsys, "train", *TINY, "--epochs", "3", "--lr", "0.005", "--save-every-epoch",
                "--output", str(tmp_path / "run"), "--json", str(tmp_path / "m.json"))
    accuracies = json.loads((tmp_path / "m.json").read_text())["test_accuracy"]
    last = json.loads((tmp_path / "run" / "config.json").read_text())
    best = json.loads((tmp_path / "run-best" / "config.json").read_text())
    assert last["resume"]["epoch"] == 3 and last["training"]["test_accuracy"] == accuracies
    best_epoch = int(np.argmax(accuracies)) + 1  # the first epoch reaching the maximum
    assert best["resume"]["epoch"] == best_epoch and best["training"]["test_accuracy"] == accuracies[:best_epoch]
    assert out.count("Saved epoch") == 3
    # the best folder is itself resumable
    ok(capsys, "train", "--resume", str(tmp_path / "run-best"), "--epochs", str(best_epoch + 1), "--output", str(tmp_path / "again"))


# ------------------------------------------------------------------------------ per-step loss, curves, progress


@needs_mnist
def test_json_has_the_loss_of_every_step(tmp_path: Path, capsys, small_test_split) -> None:
    out, _ = ok(capsys, "train", *TINY, "--epochs", "2", "--output", str(tmp_path / "m"),
                "--json", str(tmp_path / "m.json"))
    metrics = json.loads((tmp_path / "m.json").read_text())
    losses = metrics["loss_per_step"]
    assert metrics["steps_per_epoch"] == 4 and len(losses) == 8 and all(np.isfinite(losses))
    for epoch in (losses[:4], losses[4:]):  # each epoch's printed loss is the mean of its steps
        assert f"train loss {np.mean(epoch):.4f}" in out


@needs_mnist
def test_plot_draws_the_curves(tmp_path: Path, capsys, small_test_split) -> None:
    pytest.importorskip("matplotlib")
    ok(capsys, "train", *TINY, "--epochs", "2", "--output", str(tmp_path / "m"), "--plot", str(tmp_path / "curves.png"))
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_plot_without_matplotlib_is_one_line_before_any_work(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    line = assert_one_line_error(cli_main(capsys, "train", "--plot", str(tmp_path / "c.png"), "--output", str(tmp_path / "m")),
                                 "--plot needs matplotlib", "pip install 'minitorch_peft[plot]'")
    assert line and not (tmp_path / "m").exists()


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_epoch_progress_draws_a_bar_on_a_terminal_and_lines_elsewhere() -> None:
    from minitorch_peft.progress import EpochProgress

    tty = FakeTerminal()
    bar = EpochProgress("Epoch 1/3", 10, stream=tty)
    bar.update(4, 256, lambda: 0.5, force=True)
    assert "4/10  ETA 00:0" in tty.getvalue() and "loss 0.5000" in tty.getvalue()
    bar.update(10, 640, 0.25, force=True)
    bar.close()
    text = tty.getvalue()
    assert "\r" in text and "Epoch 1/3" in text and "#" in text and "10/10" in text
    assert "loss 0.2500" in text and "samples/s" in text and "elapsed 00:0" in text

    plain = io.StringIO()
    bar = EpochProgress("Epoch 1/3", 10, stream=plain, every_s=0.0)
    bar.update(5, 320, 0.5)
    bar.update(10, 640, 0.25, force=True)
    bar.close()
    lines = plain.getvalue().splitlines()
    assert "\r" not in plain.getvalue() and len(lines) == 2
    assert lines[0].startswith("Epoch 1/3 5/10 (50%)  ETA 00:0") and "loss 0.5000" in lines[0]
    assert lines[1].startswith("Epoch 1/3 10/10 (100%)  loss 0.2500") and "ETA" not in lines[1]


# ------------------------------------------------------------------------------ names, aliases, help, warnings


def commands() -> list[tuple[str, click.Command]]:
    from minitorch_peft.cli import cli

    return sorted(cli.commands.items())


def test_every_visible_flag_of_every_command_has_help_text() -> None:
    missing = [f"{name} {opt.opts[0]}" for name, cmd in commands() for opt in cmd.params
               if isinstance(opt, click.Option) and not opt.hidden and not (opt.help or "").strip()]
    assert missing == []


def test_one_name_per_concept_across_commands() -> None:
    """The input model folder is --model-dir, an adapter's name --adapter-name, the output --output, and the
    seed defaults to the same value, in every command that has them; the old spellings are hidden."""
    visible = {name: {o for opt in cmd.params if isinstance(opt, click.Option) and not opt.hidden for o in opt.opts}
               for name, cmd in commands()}
    hidden = {name: {o for opt in cmd.params if isinstance(opt, click.Option) and opt.hidden for o in opt.opts}
              for name, cmd in commands()}
    for name in ("train", "infer", "merge", "export-peft", "import-peft"):
        assert "--model-dir" in visible[name], name
        assert not visible[name] & {"--base", "--adapter", "--name"}, name
    for name in ("train", "merge", "export-peft", "import-peft"):
        assert "--adapter-name" in visible[name], name
    assert hidden["train"] == {"--base"} and hidden["import-peft"] == {"--base"}
    assert hidden["merge"] == {"--name"} and hidden["export-peft"] == {"--adapter"}
    seeds = {name: opt.default for name, cmd in commands() for opt in cmd.params if opt.name == "seed"}
    assert set(seeds) >= {"train", "merge"} and len(set(seeds.values())) == 1, seeds


@needs_mnist
def test_old_spellings_still_work(tmp_path: Path, capsys, small_test_split) -> None:
    pytest.importorskip("safetensors")
    ok(capsys, "train", *TINY, "--epochs", "1", "--output", str(tmp_path / "a"))
    ok(capsys, "train", *TINY, "--epochs", "1", "--base", str(tmp_path / "a"), "--adapter-name", "b", "--output", str(tmp_path / "ab"))
    assert sorted(json.loads((tmp_path / "ab" / "config.json").read_text())["adapters"]) == ["b", "default"]
    ok(capsys, "merge", "--model-dir", str(tmp_path / "ab"), "--adapters", "default,b", "--weights", "1,1",
       "--combination", "cat", "--name", "both", "--output", str(tmp_path / "m"))
    assert json.loads((tmp_path / "m" / "config.json").read_text())["active_adapter"] == "both"
    ok(capsys, "export-peft", "--model-dir", str(tmp_path / "ab"), "--adapter", "b", "--output", str(tmp_path / "hf"))
    ok(capsys, "import-peft", "--base", str(tmp_path / "a"), "--peft", str(tmp_path / "hf"), "--adapter-name", "b2",
       "--output", str(tmp_path / "imp"))
    assert sorted(json.loads((tmp_path / "imp" / "config.json").read_text())["adapters"]) == ["b2", "default"]
    assert_one_line_error(cli_main(capsys, "train", "--base", str(tmp_path / "a"), "--model-dir", str(tmp_path / "a")),
                          "--base is the old spelling of --model-dir")
    assert_one_line_error(cli_main(capsys, "import-peft", "--peft", str(tmp_path / "hf"), "--output", str(tmp_path / "x")),
                          "--model-dir is required")


@pytest.mark.parametrize("args,expected", [
    (["--method", "lora", "--quant", "fp4", "--block-size", "128"],
     "warning: --method lora ignores --quant, --block-size (qlora/qdora only)"),
    (["--method", "dora", "--no-double-quant", "--loraplus-ratio", "4"],
     "warning: --method dora ignores --double-quant (qlora/qdora only); --loraplus-ratio (lora-plus only)"),
    (["--method", "full", "--rank", "4", "--adapter-name", "x"],
     "warning: --method full ignores --rank, --adapter-name (adapter methods only)"),
    (["--method", "qlora", "--quant", "fp4", "--rank", "4"], None),
])
def test_flags_the_method_ignores_get_one_warning_line(tmp_path: Path, capsys, monkeypatch, args: list[str],
                                                       expected: str | None) -> None:
    import minitorch_peft.train as train

    monkeypatch.setattr(train, "train", lambda cfg, log=print, world=None: {"loss_per_step": []})  # flags checked; no training
    out, err = ok(capsys, "train", *args, "--output", str(tmp_path / "m"))
    assert err.strip().splitlines() == ([expected] if expected else [])


@pytest.mark.parametrize("args,expected", [
    (["--combination", "svd", "--density", "0.5"], "warning: --combination svd ignores --density (ties / dare_linear / dare_ties only)"),
    (["--combination", "ties", "--density", "0.5", "--seed", "1"], "warning: --combination ties ignores --seed (dare_linear / dare_ties only)"),
    (["--combination", "dare_ties", "--density", "0.5", "--seed", "1"], None),
])
def test_merge_flags_the_combination_ignores_get_one_warning_line(tmp_path: Path, capsys, args: list[str],
                                                                  expected: str | None) -> None:
    from minitorch_peft import manual_seed
    from minitorch_peft.checkpoint import save_model
    from minitorch_peft.nn import MLP
    from minitorch_peft.peft import LoraConfig, add_adapter, inject_adapters

    manual_seed(0)
    model = inject_adapters(MLP([8, 6, 4]), LoraConfig(r=2, target_modules=["fc1", "fc2"]), adapter_name="a")
    add_adapter(model, "b", LoraConfig(r=2, target_modules=["fc1", "fc2"]))
    for p in model.parameters():
        p.data[...] = np.random.default_rng(1).standard_normal(p.shape)
    save_model(model, tmp_path / "ab")
    out, err = ok(capsys, "merge", "--model-dir", str(tmp_path / "ab"), "--adapters", "a,b", "--weights", "0.5,0.5",
                  *args, "--output", str(tmp_path / "m"))
    assert err.strip().splitlines() == ([expected] if expected else [])
