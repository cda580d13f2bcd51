"""Issue 11's ten defects, each reproduced: nothing lost, nothing trusted (outputs, checkpoints, configs,
PEFT files, data, numbers). Every test here failed before the fix it names."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import re
import shutil
import socket
import threading
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, assert_one_line_error, cli_main, needs_mnist
from minitorch_peft import backend as backend_module
from minitorch_peft.backend import Backend, get_backend
from minitorch_peft.checkpoint import load_model, save_model
from minitorch_peft.errors import MinitorchPeftError
from minitorch_peft.nn.layers import MLP
from minitorch_peft.outputs import OutputError, check_output
from minitorch_peft.peft import LoraConfig, inject_adapters, load_peft, save_peft
from minitorch_peft.random import manual_seed
from minitorch_peft.serialize import CheckpointError
from minitorch_peft.train import LossGuard, NonFiniteLoss, TrainConfig

TINY = ["--limit", "256", "--epochs", "1"]


def model_folder(path: Path, adapters: bool = True, dims: tuple[int, ...] = (784, 512, 256, 10)) -> Path:
    manual_seed(0)
    model = MLP(list(dims))
    if adapters:
        inject_adapters(model, LoraConfig(r=min(4, *dims), target_modules=["fc1", "fc2", "fc3"][: len(dims) - 1]))
    return save_model(model, path)


def rewrite_npz(path: Path, change) -> None:
    with np.load(path) as z:
        arrays = dict(z)
    change(arrays)
    np.savez(path, **arrays)


def rewrite_config(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------ 1. an existing folder is never replaced


@pytest.mark.parametrize("command", ["train", "merge", "import-peft", "export-peft"])
def test_1_existing_foreign_folder_is_refused_and_kept(tmp_path: Path, capsys, command: str) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("x")
    args = {"train": ["train", *TINY],
            "merge": ["merge", "--model-dir", str(tmp_path / "m"), "--unload"],
            "import-peft": ["import-peft", "--base", str(tmp_path / "m"), "--peft", str(tmp_path / "p")],
            "export-peft": ["export-peft", "--model-dir", str(tmp_path / "m")]}[command]
    result = cli_main(capsys, *args, "--output", str(d))
    assert_one_line_error(result, "--output", str(d), "refusing to replace it")
    assert [p.name for p in d.iterdir()] == ["notes.txt"] and (d / "notes.txt").read_text() == "x"
    assert "Training" not in result[1]  # refused before any work


def test_1_policy_accepts_new_empty_and_our_own_folders(tmp_path: Path) -> None:
    check_output(tmp_path / "new" / "deeper")
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty")
    check_output(model_folder(tmp_path / "ours"))
    (tmp_path / "ours" / "notes.txt").write_text("mine")  # a model folder holding the user's files is not ours alone
    with pytest.raises(OutputError, match="notes.txt"):
        check_output(tmp_path / "ours")
    model_folder(tmp_path / "plain", adapters=False)
    with pytest.raises(OutputError, match="not a PEFT adapter exported by minitorch_peft"):
        check_output(tmp_path / "plain", kind="peft")


def test_1_export_peft_overwrites_its_own_export_only(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    manual_seed(0)
    model = MLP([12, 9, 5])
    inject_adapters(model, LoraConfig(r=2, target_modules=["fc1"]))
    save_peft(model, tmp_path / "hf")
    check_output(tmp_path / "hf", kind="peft")  # ours: recognised by the safetensors metadata marker
    import safetensors.numpy as st

    (tmp_path / "foreign").mkdir()
    st.save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "foreign" / "adapter_model.safetensors"))
    with pytest.raises(OutputError, match="not exported by minitorch_peft"):
        check_output(tmp_path / "foreign", kind="peft")


# ------------------------------------------------------------------ 2. non-finite numbers never train


@pytest.mark.parametrize("flags,needle", [(["--lr", "inf"], "--lr must be a finite number"),
                                          (["--lr", "nan"], "--lr must be a finite number"),
                                          (["--method", "lora-plus", "--loraplus-ratio", "inf"], "--loraplus-ratio must be a finite"),
                                          (["--alpha", "inf"], "--alpha must be a finite"),
                                          (["--dropout", "nan"], "--dropout must be a finite")])
def test_2_non_finite_flags_are_refused_before_the_banner(tmp_path: Path, capsys, flags: list[str], needle: str) -> None:
    code, out, err = cli_main(capsys, "train", *flags, *TINY, "--output", str(tmp_path / "m"))
    assert_one_line_error((code, out, err), needle)
    assert out == "" and not (tmp_path / "m").exists()


@needs_mnist
@pytest.mark.slow
def test_2_a_non_finite_loss_stops_training_and_saves_nothing(tmp_path: Path, capsys, small_test_split) -> None:
    model_folder(tmp_path / "m")
    before = (tmp_path / "m" / "adapters.npz").read_bytes()
    code, out, err = cli_main(capsys, "train", "--lr", "1e30", *TINY, "--output", str(tmp_path / "m"),
                              "--json", str(tmp_path / "m.json"))
    line = assert_one_line_error((code, out, err), "training stopped: the loss became", "at epoch 1, step", "--lr 1e+30",
                                 "nothing was saved")
    assert re.search(r"the loss became (nan|-?inf) at epoch 1, step \d+ of \d+;", line), line  # names the value
    assert (tmp_path / "m" / "adapters.npz").read_bytes() == before and not (tmp_path / "m.json").exists()


def test_2_loss_guard_on_a_device_checks_at_progress_points_and_names_the_first_bad_step(monkeypatch) -> None:
    from minitorch_peft import kernels

    monkeypatch.setattr(backend_module, "DEVICE_BACKENDS", ("fakegpu",))
    transfers: list[int] = []

    class Kernels:
        @staticmethod
        def to_numpy(a):
            transfers.append(1)
            return np.asarray(a)

    fake = Backend("fakegpu", np, Kernels)
    assert not fake.host_memory and get_backend("numpy").host_memory
    guard = LossGuard(fake, TrainConfig(lr=0.5), epoch=1, steps=120, every=50)
    total = np.float32(0)
    with pytest.raises(NonFiniteLoss, match=r"at epoch 2, step 8 of 120") as e:
        for i in range(120):
            total = total + (np.float32(np.nan) if i == 7 else np.float32(1.0))
            guard.step(i, total)
            assert len(transfers) == (0 if i < 49 else 1)  # no host sync before the first progress point
    assert "--lr 0.5" in str(e.value) and len(transfers) == 1
    del kernels


def test_2_save_model_refuses_a_non_finite_model(tmp_path: Path) -> None:
    model = MLP([4, 3, 2])
    model.fc2.bias.data[1] = np.inf
    with pytest.raises(CheckpointError, match="'fc2.bias' holds 1 non-finite"):
        save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ 3. non-finite weights never load


@pytest.mark.parametrize("file,key", [("base.npz", "fc1.weight"), ("adapters.npz", "fc2.lora_B.default")])
def test_3_non_finite_arrays_are_refused_by_name(tmp_path: Path, capsys, file: str, key: str) -> None:
    folder = model_folder(tmp_path / "m")

    def poison(a):
        a[key].flat[0] = np.nan

    rewrite_npz(folder / file, poison)
    with pytest.raises(CheckpointError, match=f"array '{key}' holds 1 non-finite"):
        load_model(folder)
    assert_one_line_error(cli_main(capsys, "infer", "--model-dir", str(folder)), key, "non-finite")


# ------------------------------------------------------------------ 4. adapter names


def test_4_empty_adapter_name_is_refused(tmp_path: Path, capsys) -> None:
    code, out, err = cli_main(capsys, "train", "--adapter-name", "", *TINY, "--output", str(tmp_path / "m"))
    assert_one_line_error((code, out, err), "--adapter-name must be")
    assert out == ""
    assert_one_line_error(cli_main(capsys, "import-peft", "--base", "b", "--peft", "p", "--adapter-name", "a.b",
                                   "--output", str(tmp_path / "o")), "--adapter-name must be")


def test_4_a_folder_with_an_empty_adapter_name_is_one_error(tmp_path: Path, capsys) -> None:
    folder = model_folder(tmp_path / "m")
    rewrite_config(folder, lambda c: (c["adapters"].__setitem__("", c["adapters"].pop("default")), c.__setitem__("active_adapter", "")))
    assert_one_line_error(cli_main(capsys, "infer", "--model-dir", str(folder)), "adapter name must be", "''")


# ------------------------------------------------------------------ 5. config.json checked before allocation


@pytest.mark.parametrize("dims,needle", [([784, 10**12, 10], "parameters, more than"),
                                         ([784, 2000000, 10], "parameters, more than"),
                                         ([784, 100000, 10], "has shape (512,), the config implies (100000,)"),
                                         ([784, 512, True, 10], "positive integers"),
                                         ([784, 512.0, 256, 10], "positive integers")])
def test_5_dims_are_checked_before_allocating(tmp_path: Path, dims: list, needle: str) -> None:
    folder = model_folder(tmp_path / "m")
    rewrite_config(folder, lambda c: c["architecture"].__setitem__("dims", dims))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as e:
            load_model(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert needle in str(e.value)
    assert peak < 32 << 20, f"{peak:,} bytes allocated before refusing"


def test_5_deeply_nested_config_is_one_error(tmp_path: Path, capsys) -> None:
    folder = model_folder(tmp_path / "m")
    for depth in (40, 100_000):
        (folder / "config.json").write_text('{"format": "minitorch_peft", "x": ' + "[" * depth + "]" * depth + "}")
        with pytest.raises(CheckpointError, match="nested more than 32 levels"):
            load_model(folder)
    assert_one_line_error(cli_main(capsys, "infer", "--model-dir", str(folder)), "nested more than")


@pytest.mark.parametrize("field,value,needle", [("use_rslora", "no", "'use_rslora' must be true or false, got 'no'"),
                                                ("use_dora", 1, "'use_dora' must be true or false"),
                                                ("r", 4.0, "'r' must be an integer"),
                                                ("r", True, "'r' must be an integer"),
                                                ("lora_alpha", "16", "'lora_alpha' must be a finite number"),
                                                ("lora_dropout", "x", "'lora_dropout' must be a number in [0, 1)"),
                                                ("bogus", 1, "unknown field(s) 'bogus'")])
def test_5_adapter_fields_are_typed(tmp_path: Path, capsys, field: str, value, needle: str) -> None:
    folder = model_folder(tmp_path / "m")
    rewrite_config(folder, lambda c: c["adapters"]["default"].__setitem__(field, value))
    line = assert_one_line_error(cli_main(capsys, "infer", "--model-dir", str(folder)), needle)
    assert "not supported between" not in line  # (defect 10) no Python internals


def test_5_adapter_shapes_are_checked_against_the_headers(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m")
    rewrite_config(folder, lambda c: c["adapters"]["default"].__setitem__("r", 8))
    with pytest.raises(CheckpointError, match=r"'fc1.lora_A.default' has shape \(4, 784\), the config implies \(8, 784\)"):
        load_model(folder)


def test_5_lying_npz_header_cannot_allocate(tmp_path: Path) -> None:
    """A member whose .npy header claims 10**8 float32 (400 MB) over the 48 bytes it holds, in an otherwise
    well-formed archive (its CRC right): refused from the header, before anything that size is allocated."""
    import io
    import zipfile

    folder = model_folder(tmp_path / "m", adapters=False, dims=(4, 3, 2))
    path = folder / "base.npz"
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    name = next(n for n, b in members.items() if b"'shape': (3, 4)" in b)
    real = np.load(io.BytesIO(members[name]))
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        head, {"descr": np.lib.format.dtype_to_descr(real.dtype), "fortran_order": False, "shape": (10**8,)})
    members[name] = head.getvalue() + real.tobytes()
    with zipfile.ZipFile(path, "w") as zf:
        for n, b in members.items():
            zf.writestr(n, b)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"header says shape \(100000000,\) float32 \(400000000 bytes\)"):
            load_model(folder)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak


# ------------------------------------------------------------------ 6. (see test_atomic_save.py) leftovers


def test_6_leftovers_of_killed_saves_are_removed_by_the_next_save(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m")
    dead = tmp_path / ".m.save-999999999-abcd.tmp"  # no such process
    legacy = [tmp_path / ".m.ab12cd34.tmp", tmp_path / ".m.zz99yy88.old"]  # the layout before this one
    for d in (dead, *legacy):
        (d / "previous").mkdir(parents=True)
    other = tmp_path / ".n.ab12cd34.tmp"  # another folder's: left alone
    other.mkdir()
    model_folder(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".n.ab12cd34.tmp", "m"]


# ------------------------------------------------------------------ 7. output checked before training


def test_7_output_under_a_file_is_refused_before_training(tmp_path: Path, capsys) -> None:
    (tmp_path / "afile").write_text("x")
    code, out, err = cli_main(capsys, "train", *TINY, "--output", str(tmp_path / "afile" / "sub"))
    assert_one_line_error((code, out, err), "is a file, not a folder")
    assert "File exists" not in err and out == ""
    code, out, err = cli_main(capsys, "train", *TINY, "--output", str(tmp_path / "afile"))
    assert_one_line_error((code, out, err), "is a file")  # click's own check, also one line


def test_7_unwritable_place_is_refused_before_training(capsys) -> None:
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc (a place nobody can create files in, even root)")
    assert_one_line_error(cli_main(capsys, "train", *TINY, "--output", "/proc/no-such-model"), "cannot write in /proc")


# ------------------------------------------------------------------ 8. PEFT import checks what it reads


@pytest.fixture
def peft_folder(tmp_path: Path) -> Path:
    pytest.importorskip("safetensors")
    manual_seed(0)
    model = MLP([12, 9, 5])
    inject_adapters(model, LoraConfig(r=3, lora_alpha=6, target_modules=["fc1", "fc2"]))
    return save_peft(model, tmp_path / "hf")


def _edit_peft(folder: Path, **fields) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(fields)
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fields,needle", [({"r": 8}, "lora_A of 'fc1' has shape (3, 12), but"),
                                           ({"rank_pattern": {"fc2": 2}}, "lora_A of 'fc2' has shape (3, 9)"),
                                           ({"layers_to_transform": [0]}, "not supported by this import: layers_to_transform=[0]"),
                                           ({"layers_pattern": "layers"}, "layers_pattern='layers'"),
                                           ({"exclude_modules": ["fc2"]}, "exclude_modules"),
                                           ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
                                           ({"use_rslora": "no"}, "'use_rslora' must be true or false"),
                                           ({"lora_alpha": float("inf")}, "not valid JSON"),
                                           ({"lora_alpha": -1}, "'lora_alpha' must be a finite number > 0")])
def test_8_peft_config_that_disagrees_or_is_not_implemented_is_refused(peft_folder: Path, fields: dict, needle: str) -> None:
    _edit_peft(peft_folder, **fields)
    with pytest.raises(MinitorchPeftError) as e:
        load_peft(MLP([12, 9, 5]), peft_folder)
    assert needle in str(e.value)


def test_8_peft_neutral_fields_are_accepted(peft_folder: Path) -> None:
    _edit_peft(peft_folder, megatron_core="megatron.core", loftq_config={}, layer_replication=None, lora_bias=False,
               runtime_config={"ephemeral_gpu_offload": False}, exclude_modules=None)
    assert load_peft(MLP([12, 9, 5]), peft_folder) == "default"


def test_8_peft_non_finite_tensor_is_refused(peft_folder: Path) -> None:
    import safetensors.numpy as st

    path = peft_folder / "adapter_model.safetensors"
    tensors = st.load_file(str(path))
    tensors["base_model.model.fc2.lora_B.weight"][0, 0] = np.inf
    st.save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match="'fc2.lora_B.default' holds 1 non-finite"):
        load_peft(MLP([12, 9, 5]), peft_folder)


# ------------------------------------------------------------------ 9. data files


@pytest.mark.slow
def test_9_gzip_bomb_is_not_decompressed(tmp_path: Path) -> None:
    from minitorch_peft.data import DataError, read_idx

    header = bytes([0, 0, 8, 3]) + (1).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    body = comp.compress(header + bytes(784))
    for _ in range(200):  # 200 MB of zeros after the one image the header declares
        body += comp.compress(bytes(1 << 20))
    body += comp.flush()
    bomb = tmp_path / "bomb-idx3-ubyte.gz"
    bomb.write_bytes(body)
    assert len(body) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="trailing bytes"):
            read_idx(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak:,} bytes"
    huge = tmp_path / "huge-idx3-ubyte.gz"  # a header declaring 4 GB in a tiny gzip
    huge.write_bytes(gzip.compress(bytes([0, 0, 8, 2]) + (65536).to_bytes(4, "big") * 2))
    with pytest.raises(DataError, match="more than a"):
        read_idx(huge)


@needs_mnist
def test_9_a_flipped_byte_in_a_canonical_file_is_caught_and_a_good_one_remembered(tmp_path: Path, monkeypatch) -> None:
    from minitorch_peft.data import DataError, clear_cache, datasets, load_mnist_like

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # unpacked, as some users keep them
        (folder / name).write_bytes(gzip.decompress((DATA / "mnist" / f"{name}.gz").read_bytes()))
    clear_cache()
    load_mnist_like("mnist", "test", tmp_path / "data")  # files written a moment ago: checked, not remembered
    assert not (tmp_path / "xdg" / "minitorch_peft" / "verified.json").exists()
    old = time.time() - 60
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):  # as if downloaded a minute ago
        os.utime(folder / name, (old, old))
    clear_cache()
    load_mnist_like("mnist", "test", tmp_path / "data")
    stamps = json.loads((tmp_path / "xdg" / "minitorch_peft" / "verified.json").read_text())
    assert len(stamps) == 2
    clear_cache()
    monkeypatch.setattr(datasets, "_sha256", lambda p: pytest.fail("a verified, unchanged file was hashed again"))
    load_mnist_like("mnist", "test", tmp_path / "data")
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    labels = folder / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[100] = (data[100] + 1) % 10  # still a valid label file
    labels.write_bytes(bytes(data))  # a new modification time: checked anew
    clear_cache()
    with pytest.raises(DataError, match="is not the canonical mnist t10k-labels-idx1-ubyte"):
        load_mnist_like("mnist", "test", tmp_path / "data")
    clear_cache()


class _Files(http.server.BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_9_silent_server_times_out_and_the_next_mirror_serves(tmp_path: Path, capfd) -> None:
    import hashlib

    from minitorch_peft.data import download_file

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # accepts connections (the kernel does), never answers
    port = silent.getsockname()[1]
    body = b"payload" * 100
    _Files.body = body
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        t0 = time.perf_counter()
        path = download_file("f.gz", tmp_path, [f"http://127.0.0.1:{port}/",
                                                f"http://127.0.0.1:{httpd.server_address[1]}/"],
                             hashlib.sha256(body).hexdigest(), timeout=(2.0, 0.5))
        elapsed = time.perf_counter() - t0
    finally:
        httpd.shutdown()
        silent.close()
    assert path.read_bytes() == body and elapsed < 10
    err = capfd.readouterr().err
    assert f"Downloading http://127.0.0.1:{port}/f.gz" in err
    assert "SHA-256 verified" in err and err.count("Downloading http") == 2


# ------------------------------------------------------------------ 10. flags, messages, Ctrl-C


def test_10_negative_seed_names_the_flag_before_the_banner(tmp_path: Path, capsys) -> None:
    code, out, err = cli_main(capsys, "train", "--seed", "-1", *TINY, "--output", str(tmp_path / "m"))
    assert_one_line_error((code, out, err), "--seed must be")
    assert out == ""
    assert_one_line_error(cli_main(capsys, "merge", "--model-dir", "x", "--unload", "--seed", "-1",
                                   "--output", str(tmp_path / "o")), "--seed must be >= 0")


def test_10_ctrl_c_says_nothing_was_saved(monkeypatch, capsys) -> None:
    import minitorch_peft.train as train

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    code, out, err = cli_main(capsys, "train", *TINY)
    assert code == 130
    assert [l for l in err.splitlines() if l.strip()] == ["interrupted: nothing was saved; any earlier checkpoint is unchanged"]


def test_10_export_peft_of_a_plain_model_says_it_has_no_adapters(tmp_path: Path, capsys) -> None:
    pytest.importorskip("safetensors")
    folder = model_folder(tmp_path / "plain", adapters=False, dims=(4, 3, 2))
    assert_one_line_error(cli_main(capsys, "export-peft", "--model-dir", str(folder), "--output", str(tmp_path / "hf")),
                          "no adapters", "nothing to export")
    assert not (tmp_path / "hf").exists()


def test_10_merge_weights_must_be_finite(tmp_path: Path, capsys) -> None:
    folder = model_folder(tmp_path / "m", dims=(4, 3, 2))
    assert_one_line_error(cli_main(capsys, "merge", "--model-dir", str(folder), "--adapters", "default",
                                   "--weights", "nan", "--output", str(tmp_path / "o")), "--weights must be finite")
    shutil.rmtree(folder)
