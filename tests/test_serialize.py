"""Checkpoints: bit-exact round trips, strict reading of damaged files, atomic writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import minitorch_peft as mp
from minitorch_peft import nn
from minitorch_peft.serialize import (
    CheckpointError,
    atomic_directory,
    load_json,
    load_npz,
    load_state_dict,
    save_json,
    save_npz,
    save_state_dict,
)


def sample_arrays() -> dict[str, np.ndarray]:
    r = np.random.default_rng(0)
    return {
        "f32": r.standard_normal((7, 5)).astype(np.float32),
        "f64": np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-310, np.pi]),
        "u8": r.integers(0, 256, size=(3, 4, 2), dtype=np.uint8),
        "i64": np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max], dtype=np.int64),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float64),
        "fortran": np.asfortranarray(r.standard_normal((3, 4))),
    }


def leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


# ------------------------------------------------------------------------------- round trips


def test_npz_round_trip_bit_exact(tmp_path):
    arrays = sample_arrays()
    path = tmp_path / "arrays.npz"
    save_npz(path, arrays)
    loaded = load_npz(path)
    assert list(loaded) == list(arrays)
    for k, a in arrays.items():
        b = loaded[k]
        assert b.dtype == a.dtype and b.shape == a.shape
        assert np.ascontiguousarray(b).tobytes() == np.ascontiguousarray(a).tobytes(), k
    assert os.listdir(tmp_path) == ["arrays.npz"]


def test_npz_creates_parent_folders_and_overwrites(tmp_path):
    path = tmp_path / "a" / "b" / "c.npz"
    save_npz(path, {"x": np.ones(2)})
    save_npz(path, {"y": np.zeros(3, dtype=np.int64)})
    loaded = load_npz(path)
    assert list(loaded) == ["y"] and loaded["y"].dtype == np.int64


def test_model_round_trip(tmp_path):
    mp.manual_seed(0)
    a = nn.MLP([6, 5, 3])
    mp.manual_seed(1)
    b = nn.MLP([6, 5, 3])
    path = tmp_path / "model.npz"
    save_state_dict(path, a)
    load_state_dict(path, b)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb
        assert pa.data.tobytes() == pb.data.tobytes()
    x = mp.Tensor(np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32))
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())


def test_save_selected_keys_and_load_non_strict(tmp_path):
    mp.manual_seed(0)
    a = nn.MLP([4, 3, 2])
    mp.manual_seed(1)
    b = nn.MLP([4, 3, 2])
    fc1_before = b.fc1.weight.data.copy()
    fc2_before = b.fc2.weight.data.copy()
    path = tmp_path / "head.npz"
    save_state_dict(path, a, keys=["fc2.weight", "fc2.bias"])
    assert sorted(load_npz(path)) == ["fc2.bias", "fc2.weight"]
    with pytest.raises(CheckpointError):
        load_state_dict(path, b)  # strict: fc1.* are missing
    np.testing.assert_array_equal(b.fc2.weight.data, fc2_before)  # the failed load wrote nothing
    load_state_dict(path, b, strict=False)
    np.testing.assert_array_equal(b.fc2.weight.data, a.fc2.weight.data)
    np.testing.assert_array_equal(b.fc1.weight.data, fc1_before)


# ------------------------------------------------------------------------------- damaged files


def _write_checkpoint(path):
    save_npz(path, {"w": np.arange(4000, dtype=np.float64), "b": np.arange(10, dtype=np.float32)})
    return path.read_bytes()


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9, -1])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "model.npz"
    data = _write_checkpoint(path)
    cut = len(data) - 1 if keep == -1 else int(len(data) * keep)
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError) as info:
        load_npz(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("where", [0.3, 0.5, 0.7])
def test_flipped_bytes(tmp_path, where):
    path = tmp_path / "model.npz"
    data = bytearray(_write_checkpoint(path))
    i = int(len(data) * where)
    for j in range(i, i + 4):
        data[j] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        load_npz(path)
    assert str(path) in str(info.value)


def test_not_a_zip_file(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("this is not a checkpoint\n" * 20)
    with pytest.raises(CheckpointError) as info:
        load_npz(path)
    assert str(path) in str(info.value)


def test_bare_npy_file(tmp_path):
    path = tmp_path / "array.npy"
    np.save(path, np.ones(3))
    with pytest.raises(CheckpointError) as info:
        load_npz(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(CheckpointError) as info:
        load_npz(path)
    assert str(path) in str(info.value)
    with pytest.raises(CheckpointError):
        load_npz(tmp_path)  # a folder is not a checkpoint file
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path, nn.MLP([2, 2]))
    assert str(path) in str(info.value)


class _Unpickled:
    loaded: list = []

    def __reduce__(self):
        return (_Unpickled._record, ())

    @staticmethod
    def _record():
        _Unpickled.loaded.append(True)
        return _Unpickled()


def test_object_arrays_are_not_unpickled(tmp_path):
    path = tmp_path / "evil.npz"
    np.savez(path, weights=np.ones(3), payload=np.array([_Unpickled()], dtype=object))
    _Unpickled.loaded.clear()
    with pytest.raises(CheckpointError) as info:
        load_npz(path)
    assert str(path) in str(info.value)
    assert _Unpickled.loaded == []


def test_load_state_dict_errors_name_file_and_key(tmp_path):
    model = nn.MLP([4, 3, 2])
    before = {k: v.copy() for k, v in model.state_dict().items()}
    state = {k: v + 1.0 for k, v in model.state_dict().items()}  # other values: a partial load would show

    missing = tmp_path / "missing.npz"
    save_npz(missing, {k: v for k, v in state.items() if k != "fc2.bias"})
    with pytest.raises(CheckpointError) as info:
        load_state_dict(missing, model)
    assert str(missing) in str(info.value) and "fc2.bias" in str(info.value)

    shape = tmp_path / "shape.npz"
    save_npz(shape, {**state, "fc1.weight": np.zeros((3, 5), dtype=np.float32)})
    with pytest.raises(CheckpointError) as info:
        load_state_dict(shape, model)
    assert str(shape) in str(info.value) and "fc1.weight" in str(info.value)

    unexpected = tmp_path / "unexpected.npz"
    save_npz(unexpected, {**state, "fc3.weight": np.zeros(1, dtype=np.float32)})
    with pytest.raises(CheckpointError) as info:
        load_state_dict(unexpected, model)
    assert str(unexpected) in str(info.value) and "fc3.weight" in str(info.value)

    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


# ------------------------------------------------------------------------------- atomic writes


def test_interrupted_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.npz"
    save_npz(path, {"w": np.arange(5.0)})
    original = path.read_bytes()
    real_savez = np.savez

    def savez_then_interrupt(file, **arrays):
        real_savez(file, **arrays)  # a whole archive's worth of bytes reaches the temporary file...
        file.write(b"partial")
        raise KeyboardInterrupt  # ...and then the user presses Ctrl-C

    monkeypatch.setattr(np, "savez", savez_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_npz(path, {"w": np.zeros(1000)})
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["model.npz"]
    monkeypatch.undo()
    np.testing.assert_array_equal(load_npz(path)["w"], np.arange(5.0))


def test_failed_fsync_keeps_previous_json(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    save_json(path, {"rank": 8})
    original = path.read_bytes()

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_json(path, {"rank": 16})
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert os.listdir(tmp_path) == ["config.json"]


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    def boom(file, **arrays):
        file.write(b"PK\x03\x04 half")
        raise RuntimeError("boom")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(RuntimeError):
        save_npz(tmp_path / "new.npz", {"w": np.ones(2)})
    assert os.listdir(tmp_path) == []


def test_atomic_directory_success_replaces_folder(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        (tmp / "config.json").write_text("{}")
        save_npz(tmp / "weights.npz", {"w": np.ones(2)})
        assert (target / "old.txt").exists()  # readers still see the old checkpoint meanwhile
    assert sorted(os.listdir(target)) == ["config.json", "weights.npz"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_atomic_directory_creates_new_folder(tmp_path):
    target = tmp_path / "deep" / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("a")
    assert os.listdir(target) == ["a.txt"]
    assert os.listdir(tmp_path / "deep") == ["ckpt"]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_directory_failure_keeps_old_folder(tmp_path, exc):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(exc):
        with atomic_directory(target) as tmp:
            (tmp / "new.txt").write_text("new")
            raise exc()
    assert os.listdir(target) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert leftovers(tmp_path) == []


def test_atomic_directory_failure_without_previous_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_directory(tmp_path / "ckpt") as tmp:
            (tmp / "x").write_text("x")
            raise ValueError
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------- json


def test_json_round_trip(tmp_path):
    obj = {"rank": 8, "alpha": 16.0, "targets": ["fc1", "fc2"], "nested": {"a": None, "b": True}}
    path = tmp_path / "cfg.json"
    save_json(path, obj)
    assert load_json(path) == obj
    assert json.loads(path.read_text()) == obj
    assert os.listdir(tmp_path) == ["cfg.json"]


def test_json_errors(tmp_path):
    missing = tmp_path / "missing.json"
    with pytest.raises(CheckpointError) as info:
        load_json(missing)
    assert str(missing) in str(info.value)

    bad = tmp_path / "bad.json"
    bad.write_text('{"rank": 8,')
    with pytest.raises(CheckpointError) as info:
        load_json(bad)
    assert str(bad) in str(info.value)

    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError) as info:
        load_json(binary)
    assert str(binary) in str(info.value)

    target = tmp_path / "cfg.json"
    save_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        save_json(target, {"bad": object()})
    assert load_json(target) == {"ok": 1}
    assert leftovers(tmp_path) == []


def test_checkpoint_error_is_exported_value_error():
    assert mp.CheckpointError is CheckpointError
    assert issubclass(CheckpointError, ValueError)
