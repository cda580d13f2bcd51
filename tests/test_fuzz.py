"""Fuzzing every loader of user files: each generated file loads, or raises the project's own error type.

Never another exception (a TypeError, a KeyError, a RecursionError, a MemoryError...), never a hang,
never a huge allocation. The inputs are valid files damaged by hypothesis: bytes flipped, cut, inserted
(most near the headers, where a reader decides what to allocate), JSON fields replaced by arbitrary JSON,
arrays replaced by arrays of other shapes, dtypes and values. ``derandomize=True`` makes every CI run
try the same cases; the counts are set so the module stays well under a minute.

Memory: tracemalloc (which sees NumPy's allocations) bounds each case's peak; time: each case must
finish within a generous bound (a hang guard, not a timing).
"""

from __future__ import annotations

import copy
import gzip
import os
import json
import shutil
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minitorch_peft.checkpoint import load_model, save_model
from minitorch_peft.data import parse_idx, read_idx
from minitorch_peft.errors import MinitorchPeftError
from minitorch_peft.nn.layers import MLP
from minitorch_peft.peft import LoraConfig, inject_adapters, load_adapters, load_peft, save_adapters, save_peft
from minitorch_peft.random import manual_seed
from minitorch_peft.serialize import load_json, load_npz

MAX_PEAK = 64 << 20  # bytes one case may allocate at its peak: the valid files here are a few kilobytes
MAX_SECONDS = 20.0  # per case; a hang guard for a shared, loaded machine, not a timing



def fuzz(examples: int) -> settings:
    """``examples`` cases (times $FUZZ_SCALE, e.g. 10 for a long local run), the same ones every run."""
    return settings(max_examples=max(1, int(examples * float(os.environ.get("FUZZ_SCALE", "1")))), deadline=None,
                    derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])


CASES = {"count": 0}


def loads_or_own_error(load: Callable[[], Any]) -> None:
    """Run ``load``: success, or a MinitorchPeftError; any other exception fails the test (with its traceback)."""
    CASES["count"] += 1
    tracemalloc.start()  # only around the load: tracing hypothesis itself would cost more than the cases
    t0 = time.perf_counter()
    try:
        load()
    except MinitorchPeftError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - t0 < MAX_SECONDS
    assert peak < MAX_PEAK, f"{peak:,} bytes allocated"


@pytest.fixture(scope="module", autouse=True)
def report() -> Any:
    yield
    print(f"\nfuzz cases run: {CASES['count']}")


# ------------------------------------------------------------------------------ byte mutations


@st.composite
def mutations(draw: st.DrawFn, size: int, hot: tuple[int, ...] = ()) -> list[tuple[str, int, bytes]]:
    """1-4 edits of a ``size``-byte file; positions favour the ``hot`` offsets (headers)."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        if hot and draw(st.booleans()):
            pos = min(max(draw(st.sampled_from(hot)) + draw(st.integers(-16, 96)), 0), max(size - 1, 0))
        else:
            pos = draw(st.integers(0, max(size - 1, 0)))
        kind = draw(st.sampled_from(["flip", "set", "cut", "insert", "overwrite"]))
        edits.append((kind, pos, draw(st.binary(min_size=1, max_size=12))))
    return edits


def apply(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    b = bytearray(data)
    for kind, pos, blob in edits:
        pos = min(pos, len(b))
        if kind == "flip" and pos < len(b):
            b[pos] ^= 1 << (blob[0] % 8)
        elif kind == "set" and pos < len(b):
            b[pos] = blob[0]
        elif kind == "cut":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = blob
        else:
            b[pos:pos + len(blob)] = blob
    return bytes(b)


def hot_offsets(data: bytes, *needles: bytes) -> tuple[int, ...]:
    out = [0]
    for needle in needles:
        start = data.find(needle)
        while start != -1:
            out.append(start)
            start = data.find(needle, start + 1)
    return tuple(out)


# ------------------------------------------------------------------------------ IDX


def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


IDX = idx_bytes(np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256)
IDX_LABELS = idx_bytes(np.array([3, 1, 4, 1, 5]))


@fuzz(600)
@given(edits=mutations(len(IDX), hot=(0, 4, 8, 12, 16)), labels=st.booleans())
@pytest.mark.slow
def test_fuzz_idx_raw(edits, labels: bool) -> None:
    data = apply(IDX_LABELS if labels else IDX, edits)
    loads_or_own_error(lambda: parse_idx(data))


@fuzz(300)
@given(edits=mutations(len(gzip.compress(IDX, mtime=0)), hot=(0, 10)), inner=mutations(len(IDX), hot=(0, 4, 8)))
@pytest.mark.slow
def test_fuzz_idx_gzip(tmp_path_factory, edits, inner) -> None:
    path = tmp_path_factory.mktemp("idx") / "train-images-idx3-ubyte.gz"
    path.write_bytes(apply(gzip.compress(apply(IDX, inner), mtime=0), edits))
    loads_or_own_error(lambda: read_idx(path))


# ------------------------------------------------------------------------------ model folders


def _model(quant: str | None = None, dora: bool = False) -> MLP:
    manual_seed(0)
    model = MLP([64, 32, 10])
    inject_adapters(model, LoraConfig(r=2, use_dora=dora, target_modules=["fc1", "fc2"]), quantize=quant)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {"lora": save_model(_model(), root / "lora"), "qdora": save_model(_model("nf4", dora=True), root / "qdora")}
    plain = MLP([64, 32, 10])
    out["plain"] = save_model(plain, root / "plain")
    save_adapters(_model(), root / "adapters")
    out["adapters"] = root / "adapters"
    return out


def _copy(src: Path, root: Path) -> Path:
    dst = root / "case"
    shutil.copytree(src, dst)
    return dst


@fuzz(200)
@given(kind=st.sampled_from(["lora", "qdora", "plain"]), file=st.sampled_from(["base.npz", "adapters.npz"]), data=st.data())
@pytest.mark.slow
def test_fuzz_npz_checkpoint_bytes(folders, tmp_path_factory, kind: str, file: str, data: st.DataObject) -> None:
    folder = _copy(folders[kind], tmp_path_factory.mktemp("npz"))
    if not (folder / file).exists():
        file = "base.npz"
    raw = (folder / file).read_bytes()
    edits = data.draw(mutations(len(raw), hot=hot_offsets(raw, b"{'descr'", b"PK\x01\x02", b"PK\x03\x04")))
    (folder / file).write_bytes(apply(raw, edits))
    loads_or_own_error(lambda: load_model(folder))
    loads_or_own_error(lambda: load_npz(folder / file, finite=True))


def arrays_like(a: np.ndarray) -> st.SearchStrategy[np.ndarray]:
    """Arrays that differ from ``a``: another shape, dtype, or values (NaN, inf, huge, negative)."""
    dtypes = st.sampled_from([np.float32, np.float64, np.float16, np.int64, np.int8, np.uint8, np.bool_, np.complex64])
    shapes = st.one_of(st.just(a.shape), st.lists(st.integers(0, 7), max_size=3).map(tuple))
    values = st.sampled_from([0, 1, -1, 255, 7, 2**31, np.nan, np.inf, -np.inf, 1e30])
    return st.tuples(dtypes, shapes, values, st.booleans()).map(
        lambda t: (np.resize(a, t[1]).astype(t[0]) if t[3] and a.size else np.full(t[1], t[2] if t[0] not in (np.bool_,) else 1).astype(t[0]))
        if not (np.dtype(t[0]).kind in "iub" and isinstance(t[2], float) and not np.isfinite(t[2])) else np.zeros(t[1], t[0]))


@fuzz(200)
@given(kind=st.sampled_from(["qdora", "lora"]), data=st.data())
@pytest.mark.slow
def test_fuzz_checkpoint_arrays_and_4bit_quant_state(folders, tmp_path_factory, kind: str, data: st.DataObject) -> None:
    """Arrays of a (4-bit) checkpoint replaced: wrong shapes, dtypes, codes, block sizes, NaN scales, meta."""
    folder = _copy(folders[kind], tmp_path_factory.mktemp("arr"))
    for file in ("base.npz", "adapters.npz"):
        with np.load(folder / file) as z:
            arrays = dict(z)
        for _ in range(data.draw(st.integers(0, 3))):
            key = data.draw(st.sampled_from(sorted(arrays)))
            if data.draw(st.booleans()) and arrays[key].size:
                a = arrays[key].copy()
                value = data.draw(st.sampled_from([0, 1, 3, 254, 255, 64, 4096] + ([np.nan, np.inf, -1.0] if a.dtype.kind == "f" else [])))
                a.flat[data.draw(st.integers(0, a.size - 1))] = np.array(value).astype(a.dtype)  # wraps like a corrupt byte
                arrays[key] = a
            elif data.draw(st.booleans()):
                arrays[key] = data.draw(arrays_like(arrays[key]))
            else:
                del arrays[key]
        np.savez(folder / file, **arrays)
    loads_or_own_error(lambda: load_model(folder))


# ------------------------------------------------------------------------------ JSON configs

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
INTERESTING = st.sampled_from([0, -1, 1, 2, 3.5, True, False, None, "", "no", "nf4", "all-linear", [], {}, [784, 10**12, 10],
                               [64, 32, 10], ["fc1"], {"fc1": 1}, 10**12, "float16", "MLP", "lora"])


def paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON object."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += paths(v, prefix + (i,))
    return out


@st.composite
def json_edits(draw: st.DrawFn, doc: Any) -> Any:
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(doc)))
        parent = doc
        for part in where[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "interesting", "delete", "add"]))
        if action == "delete":
            del parent[where[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON_VALUES)
        else:
            # a copy: INTERESTING's lists and dicts are shared constants, later edits must not change them
            parent[where[-1]] = copy.deepcopy(draw(INTERESTING if action == "interesting" else JSON_VALUES))
        if not paths(doc):
            break
    return doc


@fuzz(300)
@given(kind=st.sampled_from(["lora", "qdora", "plain"]), data=st.data())
@pytest.mark.slow
def test_fuzz_model_config_json(folders, tmp_path_factory, kind: str, data: st.DataObject) -> None:
    folder = _copy(folders[kind], tmp_path_factory.mktemp("cfg"))
    config = json.loads((folder / "config.json").read_text())
    if data.draw(st.integers(0, 9)) == 0:  # sometimes the raw text, damaged (or nested deeply)
        text = (folder / "config.json").read_bytes()
        text = apply(text, data.draw(mutations(len(text)))) if data.draw(st.booleans()) else b"[" * data.draw(st.integers(30, 50_000))
        (folder / "config.json").write_bytes(text)
    else:
        (folder / "config.json").write_text(json.dumps(data.draw(json_edits(config))))
    loads_or_own_error(lambda: load_model(folder))


@fuzz(200)
@given(data=st.data())
@pytest.mark.slow
def test_fuzz_our_adapter_files(folders, tmp_path_factory, data: st.DataObject) -> None:
    folder = _copy(folders["adapters"], tmp_path_factory.mktemp("ad"))
    if data.draw(st.booleans()):
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(data.draw(json_edits(config))))
    else:
        raw = (folder / "adapter_model.npz").read_bytes()
        edits = data.draw(mutations(len(raw), hot=hot_offsets(raw, b"{'descr'", b"PK\x01\x02")))
        (folder / "adapter_model.npz").write_bytes(apply(raw, edits))
    manual_seed(0)
    loads_or_own_error(lambda: load_adapters(MLP([64, 32, 10]), folder))


@pytest.fixture(scope="module")
def peft_folder(tmp_path_factory) -> Path:
    pytest.importorskip("safetensors")
    model = _model(dora=True)
    return save_peft(model, tmp_path_factory.mktemp("peft") / "hf")


@fuzz(200)
@given(data=st.data())
@pytest.mark.slow
def test_fuzz_peft_adapter_config_and_safetensors(peft_folder, tmp_path_factory, data: st.DataObject) -> None:
    folder = _copy(peft_folder, tmp_path_factory.mktemp("pf"))
    if data.draw(st.booleans()):
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(data.draw(json_edits(config))))
    else:
        raw = (folder / "adapter_model.safetensors").read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        edits = data.draw(mutations(len(raw), hot=(0, 8, 8 + n // 2, 8 + n)))
        (folder / "adapter_model.safetensors").write_bytes(apply(raw, edits))
    loads_or_own_error(lambda: load_peft(_model_plain(), folder, "imported"))


def _model_plain() -> MLP:
    manual_seed(0)
    return MLP([64, 32, 10])


@fuzz(300)
@given(text=st.binary(max_size=64) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
@pytest.mark.slow
def test_fuzz_load_json(tmp_path_factory, text: bytes) -> None:
    path = tmp_path_factory.mktemp("json") / "config.json"
    path.write_bytes(text)
    loads_or_own_error(lambda: load_json(path))
