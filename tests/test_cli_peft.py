"""cli.py for the PEFT family on real MNIST (a few hundred samples): methods, flags, a folder with two
adapters, merge, export-peft, import-peft; and every kind of bad input as one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, ROOT, assert_one_line_error, cli_main, needs_mnist

pytestmark = needs_mnist

import cli  # noqa: E402

SMALL = ["--limit", "128", "--epochs", "1"]
LORA_PARAMS = 8 * (784 + 512) + 8 * (512 + 256) + 8 * (256 + 10)


@pytest.fixture(scope="module", autouse=True)
def small_real_data() -> None:
    """Real MNIST, but a 500-image test split: scoring all 10,000 twice per run would dominate these tests."""
    import minitorch_peft.data as data
    import minitorch_peft.train as train

    real = data.load_mnist_like

    def load(name, split, data_dir=None, limit=None):
        return real(name, split, data_dir, limit=500 if split == "test" else limit)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINITORCH_PEFT_DATA", str(DATA))
        mp.setattr(data, "load_mnist_like", load)
        mp.setattr(train, "load_mnist_like", load)
        yield


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    return cli_main(capsys, *args)


def ok(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code, out, err = run(capsys, *args)
    assert code == 0, err
    return out


def one_line_error(capsys: pytest.CaptureFixture[str], *args: str, needle: str) -> None:
    assert_one_line_error(run(capsys, *args), needle)


def metrics(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def two_adapter_folder(small_real_data: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA run, then a second adapter "b" trained on top of it with --base: one folder, two adapters."""
    tmp = tmp_path_factory.mktemp("cli")
    assert cli.main(["train", *SMALL, "--output", str(tmp / "a")]) == 0
    assert cli.main(["train", *SMALL, "--method", "dora", "--base", str(tmp / "a"), "--adapter-name", "b",
                     "--seed", "1", "--output", str(tmp / "ab"), "--json", str(tmp / "ab.json")]) == 0
    return tmp


# ------------------------------------------------------------------------------ train


@pytest.mark.parametrize(
    "method,trainable",
    [("lora", LORA_PARAMS), ("dora", LORA_PARAMS + 512 + 256 + 10), ("lora-plus", LORA_PARAMS),
     ("head", 256 * 10 + 10), ("full", 784 * 512 + 512 + 512 * 256 + 256 + 256 * 10 + 10)],
)
@pytest.mark.slow
def test_each_method_trains_and_reports_itself(tmp_path: Path, capsys, method: str, trainable: int) -> None:
    ok(capsys, "train", *SMALL, "--method", method, "--output", str(tmp_path / "m"), "--json", str(tmp_path / "m.json"))
    m = metrics(tmp_path / "m.json")
    assert m["method"] == method and m["params"]["trainable"] == trainable
    assert m["test_accuracy"] == [m["final_test_accuracy"]] and 0.0 <= m["final_test_accuracy"] <= 1.0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert ("adapters" in config) == (method not in ("head", "full"))
    if method == "dora":
        assert config["adapters"]["default"]["use_dora"] is True


def test_adapter_flags_reach_the_saved_config(tmp_path: Path, capsys) -> None:
    ok(capsys, "train", *SMALL, "--rank", "4", "--alpha", "8", "--rslora", "--dropout", "0.1", "--targets", "fc1, fc2",
       "--adapter-name", "task", "--output", str(tmp_path / "m"), "--json", str(tmp_path / "m.json"))
    adapter = json.loads((tmp_path / "m" / "config.json").read_text())["adapters"]["task"]
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8.0 and adapter["use_rslora"] is True
    assert adapter["lora_dropout"] == 0.1 and adapter["target_modules"] == ["fc1", "fc2"]
    assert metrics(tmp_path / "m.json")["params"]["trainable"] == 4 * (784 + 512) + 4 * (512 + 256)


def test_base_with_adapters_gains_a_second_one_and_the_first_stays_as_it_was(two_adapter_folder: Path) -> None:
    tmp = two_adapter_folder
    config = json.loads((tmp / "ab" / "config.json").read_text())
    assert set(config["adapters"]) == {"default", "b"}
    assert config["active_adapter"] == "b" and config["adapters"]["b"]["use_dora"]
    m = metrics(tmp / "ab.json")
    assert m["params"]["trainable"] == LORA_PARAMS + 512 + 256 + 10  # only "b" trained
    before, after = np.load(tmp / "a" / "adapters.npz"), np.load(tmp / "ab" / "adapters.npz")
    for key in before.files:
        np.testing.assert_array_equal(after[key], before[key])
    base_before, base_after = np.load(tmp / "a" / "base.npz"), np.load(tmp / "ab" / "base.npz")
    for key in base_before.files:
        np.testing.assert_array_equal(base_after[key], base_before[key])


@pytest.mark.slow
def test_merge_export_import_and_unload(two_adapter_folder: Path, capsys) -> None:
    tmp = two_adapter_folder
    ok(capsys, "merge", "--model-dir", str(tmp / "ab"), "--adapters", "default,b", "--weights", "0.5,0.5",
       "--combination", "ties", "--density", "0.5", "--rank", "8", "--output", str(tmp / "merged"), "--json", str(tmp / "merged.json"))
    config = json.loads((tmp / "merged" / "config.json").read_text())
    assert config["active_adapter"] == "merged" and set(config["adapters"]) == {"default", "b", "merged"}
    assert config["adapters"]["merged"]["r"] == 8 and not config["adapters"]["merged"]["use_dora"]
    out = ok(capsys, "infer", "--model-dir", str(tmp / "merged"), "--samples", "3")
    assert "adapter 'merged'" in out and "Accuracy on the whole test set" in out

    ok(capsys, "export-peft", "--model-dir", str(tmp / "ab"), "--output", str(tmp / "hf"))
    assert json.loads((tmp / "hf" / "adapter_config.json").read_text())["use_dora"] is True
    ok(capsys, "import-peft", "--base", str(tmp / "a"), "--peft", str(tmp / "hf"), "--adapter-name", "b2", "--output", str(tmp / "imp"))
    ok(capsys, "merge", "--model-dir", str(tmp / "ab"), "--unload", "--output", str(tmp / "plain"))
    assert "adapters" not in json.loads((tmp / "plain" / "config.json").read_text())

    from minitorch_peft import Tensor, no_grad
    from minitorch_peft.checkpoint import load_model

    x = Tensor(np.random.default_rng(0).standard_normal((32, 784)).astype(np.float32))
    outputs = {}
    for name in ("ab", "imp", "plain"):
        model, config = load_model(tmp / name)
        model.eval()
        with no_grad():
            outputs[name] = model(x).numpy()
    assert config.get("adapters") is None
    np.testing.assert_array_equal(outputs["imp"], outputs["ab"])  # b exported to PEFT and back: the same model
    np.testing.assert_allclose(outputs["plain"], outputs["ab"], rtol=1e-4, atol=1e-4)  # folded into the base


# ------------------------------------------------------------------------------ bad input


def test_rank_above_a_layer_width_trains_with_one_warning_line(tmp_path: Path, capsys) -> None:
    code, out, err = run(capsys, "train", *SMALL, "--rank", "16", "--output", str(tmp_path / "m"))
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: rank r=16 exceeds min(in, out) = 10 of module 'fc3'"), err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["adapters"]["default"]["r"] == 16
    code, out, err = run(capsys, "infer", "--model-dir", str(tmp_path / "m"), "--samples", "2")
    assert code == 0 and err == "", err  # loading the folder does not repeat the note


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--rank", "0"], "--rank"),
        (["--alpha", "0"], "lora_alpha must be > 0"),
        (["--alpha", "-2", "--method", "dora"], "lora_alpha must be > 0"),
        (["--dropout", "1"], "dropout must be in [0, 1)"),
        (["--dropout", "-0.1"], "dropout must be in [0, 1)"),
        (["--targets", "fc1,fc9"], "'fc9' matches no Linear module; available: fc1, fc2, fc3"),
        (["--method", "lora-plus", "--loraplus-ratio", "0"], "--loraplus-ratio"),
        (["--method", "qdora-xl"], "qdora-xl"),
    ],
)
def test_bad_train_flags_are_one_line(tmp_path: Path, capsys, args: list[str], needle: str) -> None:
    one_line_error(capsys, "train", *args, "--output", str(tmp_path / "m"), needle=needle)
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_bad_merge_and_peft_input_is_one_line(two_adapter_folder: Path, tmp_path: Path, capsys) -> None:
    ab = str(two_adapter_folder / "ab")
    merge = ["merge", "--model-dir", ab, "--output", str(tmp_path / "out")]
    one_line_error(capsys, *merge, "--adapters", "default,b", "--weights", "1,1", "--combination", "mean",
                   needle="unknown combination 'mean'; valid: cat, linear, svd, ties, dare_linear, dare_ties")
    one_line_error(capsys, *merge, "--adapters", "default,b", "--weights", "1", needle="1 weight(s) for 2 adapter(s)")
    one_line_error(capsys, *merge, "--adapters", "default,b", "--weights", "1,x", needle="--weights")
    one_line_error(capsys, *merge, "--adapters", "default,b", needle="--weights is required")
    one_line_error(capsys, *merge, "--adapters", "default,zz", "--weights", "1,1", needle="unknown adapter 'zz'")
    one_line_error(capsys, *merge, "--adapters", "default,b", "--weights", "1,1", "--combination", "cat", needle="DoRA")
    assert not (tmp_path / "out").exists()

    # an adapter on fewer modules cannot be combined with the others
    ok(capsys, "train", "--limit", "64", "--epochs", "1", "--base", ab, "--adapter-name", "c", "--targets", "fc1",
       "--output", str(tmp_path / "abc"))
    one_line_error(capsys, "merge", "--model-dir", str(tmp_path / "abc"), "--adapters", "default,c", "--weights", "1,1",
                   "--output", str(tmp_path / "out"), needle="target different modules")
    one_line_error(capsys, "train", "--limit", "64", "--base", ab, "--adapter-name", "b", "--output", str(tmp_path / "x"),
                   needle="already has an adapter named 'b'")
    one_line_error(capsys, "train", "--limit", "64", "--base", ab, "--method", "full", "--output", str(tmp_path / "x"),
                   needle="merge --unload")

    # adapters onto a base of another shape, and a PEFT file with a key missing
    from minitorch_peft.checkpoint import save_model
    from minitorch_peft.nn import MLP

    save_model(MLP([784, 64, 10]), tmp_path / "small")
    ok(capsys, "export-peft", "--model-dir", ab, "--output", str(tmp_path / "hf"))
    one_line_error(capsys, "import-peft", "--base", str(tmp_path / "small"), "--peft", str(tmp_path / "hf"),
                   "--output", str(tmp_path / "imp"), needle="'fc3', which this base lacks")
    import safetensors.numpy as st

    weights = tmp_path / "hf" / "adapter_model.safetensors"
    tensors = st.load_file(str(weights))
    del tensors["base_model.model.fc2.lora_A.weight"]
    st.save_file(tensors, str(weights))
    one_line_error(capsys, "import-peft", "--base", str(two_adapter_folder / "a"), "--peft", str(tmp_path / "hf"),
                   "--adapter-name", "x", "--output", str(tmp_path / "imp"), needle="missing key(s) base_model.model.fc2.lora_A.weight")
    assert not (tmp_path / "imp").exists()


@pytest.mark.slow
def test_the_real_process_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), "merge", "--model-dir", str(tmp_path / "none"),
                           "--adapters", "a,b", "--weights", "1,1", "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "model folder not found" in proc.stderr
