"""Tests for minitorch_peft.data: IDX reading, folder resolution, verified download, batching."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import re
import os
import socket
import struct
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from minitorch_peft.data import (
    DATASETS,
    ENV_VAR,
    MEAN,
    SHA256,
    STD,
    DataError,
    cache_dir,
    clear_cache,
    decode_split,
    epoch_permutation,
    iterate_batches,
    load_mnist_like,
    normalize,
    num_batches,
    parse_idx,
    read_idx,
    resolve_root,
)
from minitorch_peft.data import download as dl

from conftest import DATA, DATA_MISSING

REPO = Path(__file__).resolve().parents[1]


SHARED = DATA  # conftest's data folder ($MINITORCH_PEFT_DATA, else the cache), read before tests clear the env var
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST_TRAIN_HEAD = [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
MNIST_TEST_HEAD = [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
FASHION_TRAIN_HEAD = [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


@pytest.fixture
def shared() -> Path:
    """Path to the real MNIST / Fashion-MNIST files, or skip."""
    if DATA_MISSING is not None:
        pytest.skip(DATA_MISSING)
    if not all((SHARED / name / f).is_file() for name in DATASETS for f in TEST_FILES):
        pytest.skip(f"real datasets not found in {SHARED}; set {ENV_VAR} to the folder holding mnist/ and fashion-mnist/")
    return SHARED


def _closed_port_url() -> str:
    """A 127.0.0.1 URL nobody listens on, so any fetch fails at once with 'connection refused'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Keep every test off the real env var, the real cache and the internet."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for name in DATASETS:
        monkeypatch.setitem(dl.MIRRORS, name, (_closed_port_url(),))
    clear_cache()
    yield tmp_path / "xdg" / "minitorch_peft"
    clear_cache()


def idx_bytes(arr: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file."""
    arr = np.asarray(arr, dtype=np.uint8)
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_split(folder: Path, labels: list[int], split_files: tuple[str, str] = TEST_FILES, gz: bool = True) -> np.ndarray:
    """Write a tiny images/labels pair into folder; return the images."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(labels))
    images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    for name, arr in zip(split_files, (images, np.array(labels))):
        data = idx_bytes(arr)
        if gz:
            (folder / name).write_bytes(gzip.compress(data))
        else:
            (folder / name.removesuffix(".gz")).write_bytes(data)
    return images


def expect_data_error(fn, *fragments: str) -> str:
    """Call fn, expect a one-line DataError containing every fragment; return the message."""
    with pytest.raises(DataError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


# --------------------------------------------------------------------------- IDX reader, real files


@pytest.mark.slow
def test_real_mnist_train_and_test(shared: Path) -> None:
    x, y = load_mnist_like("mnist", "train", data_dir=shared)
    assert x.shape == (60000, 784) and x.dtype == np.float32 and x.flags.c_contiguous
    assert y.shape == (60000,) and y.dtype == np.int64
    assert y[:10].tolist() == MNIST_TRAIN_HEAD
    assert np.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    xt, yt = load_mnist_like("mnist", "test", data_dir=shared)
    assert xt.shape == (10000, 784) and yt.shape == (10000,)
    assert yt[:10].tolist() == MNIST_TEST_HEAD


@pytest.mark.slow
def test_real_fashion_train(shared: Path) -> None:
    x, y = load_mnist_like("fashion-mnist", "train", data_dir=shared)
    assert x.shape == (60000, 784) and y[:10].tolist() == FASHION_TRAIN_HEAD
    assert np.bincount(y).tolist() == [6000] * 10


def test_read_idx_real_header_and_pixels(shared: Path) -> None:
    images = read_idx(shared / "mnist" / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    images[0, 0, 0] = 1  # the result is an ordinary writable array


def test_gzip_detected_by_content_not_name(shared: Path, tmp_path: Path) -> None:
    gz = (shared / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    raw = gzip.decompress(gz)
    (tmp_path / "raw-named.gz").write_bytes(raw)
    (tmp_path / "gz-named-raw").write_bytes(gz)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(raw)
    a, b, c = (read_idx(tmp_path / n) for n in ("raw-named.gz", "gz-named-raw", "t10k-labels-idx1-ubyte"))
    assert a.shape == (10000,) and a[:10].tolist() == MNIST_TEST_HEAD
    assert np.array_equal(a, b) and np.array_equal(a, c)


def test_truncated_gzip_names_file(shared: Path, tmp_path: Path) -> None:
    gz = (shared / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gz[: len(gz) // 2])
    expect_data_error(lambda: read_idx(bad), str(bad), "gzip")


def test_corrupt_gzip_names_file(shared: Path, tmp_path: Path) -> None:
    gz = bytearray((shared / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    gz[len(gz) // 2] ^= 0xFF
    bad = tmp_path / "labels.gz"
    bad.write_bytes(bytes(gz))
    expect_data_error(lambda: read_idx(bad), str(bad), "gzip")


# --------------------------------------------------------------------------- IDX reader, synthetic files


def test_parse_general_ndim() -> None:
    arr = np.arange(120, dtype=np.uint8).reshape(2, 3, 4, 5)
    assert np.array_equal(parse_idx(idx_bytes(arr)), arr)
    assert parse_idx(idx_bytes(np.array([3, 1, 4]))).tolist() == [3, 1, 4]


def test_an_uncompressed_header_past_the_cap_is_refused_like_a_gzipped_one() -> None:
    """The bound the readers of training data rely on (MAX_IDX_BYTES) holds for a raw IDX file too."""
    lying = struct.pack(">4B2I", 0, 0, 0x08, 2, 1 << 16, 1 << 16) + b"\0" * 16  # 4 GiB declared, 16 bytes held
    with pytest.raises(DataError, match="more than 1,073,741,824"):
        parse_idx(lying, "lying")


@pytest.mark.parametrize("cut", [1, 100])
def test_truncated_payload(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(idx_bytes(np.zeros((2, 28, 28)))[:-cut])
    expect_data_error(lambda: read_idx(path), str(path), "truncated", "(2, 28, 28)")


def test_trailing_bytes(tmp_path: Path) -> None:
    path = tmp_path / "long-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(5)) + b"\0")
    expect_data_error(lambda: read_idx(path), str(path), "trailing")


@pytest.mark.parametrize(
    "head",
    [
        b"\x00\x00\x09\x03",  # signed-byte type code
        b"\x00\x00\x0d\x03",  # float type code
        b"\x01\x00\x08\x03",  # non-zero leading bytes
        b"\x00\x00\x08\x00",  # zero dimensions
        b"PK\x03\x04",  # a zip archive, not IDX
    ],
)
def test_wrong_magic(tmp_path: Path, head: bytes) -> None:
    path = tmp_path / "bad-magic"
    path.write_bytes(head + idx_bytes(np.zeros((1, 28, 28)))[4:])
    expect_data_error(lambda: read_idx(path), str(path), "magic", f"0x{head.hex()}")


def test_wrong_magic_inside_gzip(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x09\x01" + struct.pack(">I", 1) + b"\0"))
    expect_data_error(lambda: read_idx(path), str(path), "magic")


def test_short_header(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    expect_data_error(lambda: read_idx(tiny), str(tiny), "too short")
    cut = tmp_path / "cut-header"
    cut.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">2I", 1, 28))  # says 3 dims, has 2
    expect_data_error(lambda: read_idx(cut), str(cut), "header truncated")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope-idx3-ubyte.gz"
    expect_data_error(lambda: read_idx(path), str(path))


def test_decode_split_checks_counts_labels_and_dims(tmp_path: Path) -> None:
    imgs, lbls = tmp_path / "imgs", tmp_path / "lbls"
    imgs.write_bytes(idx_bytes(np.zeros((3, 28, 28))))
    lbls.write_bytes(idx_bytes(np.array([0, 1])))
    expect_data_error(lambda: decode_split(imgs, lbls), str(imgs), str(lbls), "3 images", "2 labels")
    lbls.write_bytes(idx_bytes(np.array([0, 10, 9])))
    expect_data_error(lambda: decode_split(imgs, lbls), str(lbls), "10", "0..9")
    lbls.write_bytes(idx_bytes(np.array([0, 9, 9])))
    x, y = decode_split(imgs, lbls)
    assert x.shape == (3, 784) and y.tolist() == [0, 9, 9]
    imgs.write_bytes(idx_bytes(np.zeros((3, 28, 27))))
    expect_data_error(lambda: decode_split(imgs, lbls), str(imgs), "(3, 28, 27)")
    expect_data_error(lambda: decode_split(lbls, lbls), str(lbls), "(N, 28, 28)")
    imgs.write_bytes(idx_bytes(np.zeros((3, 28, 28))))
    expect_data_error(lambda: decode_split(imgs, imgs), str(imgs), "1-D")


# --------------------------------------------------------------------------- normalisation and loading


def test_normalize_values() -> None:
    pixels = np.array([[0, 1, 128, 255]], dtype=np.uint8)
    out = normalize(pixels)
    expected = np.array([[(v / 255 - 0.1307) / 0.3081 for v in (0, 1, 128, 255)]], dtype=np.float32)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == (1, 4)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
    assert abs(float(out[0, 0]) - (-0.4242129)) < 1e-6 and abs(float(out[0, 3]) - 2.8214867) < 1e-6
    assert (MEAN, STD) == (0.1307, 0.3081)


def test_loaded_inputs_match_formula(shared: Path) -> None:
    raw = read_idx(shared / "mnist" / "t10k-images-idx3-ubyte.gz")[:50].reshape(50, 784)
    x, _ = load_mnist_like("mnist", "test", data_dir=shared, limit=50)
    np.testing.assert_allclose(x, ((raw / 255.0 - 0.1307) / 0.3081).astype(np.float32), rtol=0, atol=1e-6)
    # MNIST as a whole is near mean 0 / std 1 under its own constants.
    full, _ = load_mnist_like("mnist", "test", data_dir=shared)
    assert abs(full.mean()) < 0.05 and abs(full.std() - 1) < 0.05


def test_limit_and_memory_cache(shared: Path) -> None:
    x5, y5 = load_mnist_like("mnist", "test", data_dir=shared, limit=5)
    assert x5.shape == (5, 784) and y5.tolist() == MNIST_TEST_HEAD[:5] and x5.flags.c_contiguous
    x, y = load_mnist_like("mnist", "test", data_dir=shared)
    assert np.shares_memory(x, x5) and np.array_equal(x[:5], x5)  # decoded once, then reused
    assert load_mnist_like("mnist", "test", data_dir=shared, limit=10**9)[0].shape == (10000, 784)
    with pytest.raises(ValueError):
        x[0, 0] = 0.0  # shared cached arrays are read-only
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            load_mnist_like("mnist", "test", data_dir=shared, limit=bad)


def test_unknown_name_and_split(tmp_path: Path) -> None:
    expect_data_error(lambda: load_mnist_like("cifar10", "train", data_dir=tmp_path), "cifar10", "mnist, fashion-mnist")
    expect_data_error(lambda: load_mnist_like("mnist", "valid", data_dir=tmp_path), "valid", "train, test")


# --------------------------------------------------------------------------- where files are looked for


def test_resolve_root_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, isolated: Path) -> None:
    assert resolve_root().path == isolated and resolve_root().origin == "cache"
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert (resolve_root().path, resolve_root().origin) == (tmp_path / "env", "env")
    assert (resolve_root(tmp_path / "dd").path, resolve_root(tmp_path / "dd").origin) == (tmp_path / "dd", "data_dir")
    monkeypatch.setenv(ENV_VAR, "")  # empty counts as unset
    assert resolve_root().origin == "cache"


def test_cache_dir_xdg_and_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "minitorch_peft"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == tmp_path / "home" / ".cache" / "minitorch_peft"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec says ignore relative values
    assert cache_dir() == tmp_path / "home" / ".cache" / "minitorch_peft"


def test_load_prefers_data_dir_then_env_then_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, isolated: Path) -> None:
    write_split(tmp_path / "dd" / "mnist", [1, 1, 1])
    write_split(tmp_path / "env" / "mnist", [2, 2, 2])
    write_split(isolated / "mnist", [3, 3, 3])
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert load_mnist_like("mnist", "test", data_dir=tmp_path / "dd")[1].tolist() == [1, 1, 1]
    assert load_mnist_like("mnist", "test")[1].tolist() == [2, 2, 2]
    monkeypatch.delenv(ENV_VAR)
    assert load_mnist_like("mnist", "test")[1].tolist() == [3, 3, 3]


def test_raw_files_in_folder_are_found(tmp_path: Path) -> None:
    images = write_split(tmp_path / "mnist", [4, 5], gz=False)
    x, y = load_mnist_like("mnist", "test", data_dir=tmp_path)
    assert y.tolist() == [4, 5] and np.array_equal(x, normalize(images.reshape(2, 784)))


# --------------------------------------------------------------------------- download against a local server


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves /good/<ds>/<file>, /corrupt/... (one byte flipped), /short/... (body cut off); else 404."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        parts = self.path.strip("/").split("/")
        src = SHARED / parts[1] / parts[2] if len(parts) == 3 else None
        if src is None or parts[0] not in ("good", "corrupt", "short") or not src.is_file():
            self.send_error(404, "File not found")
            return
        data = bytearray(src.read_bytes())
        if parts[0] == "corrupt":
            data[len(data) // 2] ^= 0x01
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(bytes(data[: len(data) // 2] if parts[0] == "short" else data))

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass


@pytest.fixture
def server(shared: Path) -> Iterator[types.SimpleNamespace]:
    """An HTTP server on 127.0.0.1 (ephemeral port) in a thread; shut down after the test."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.requests = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield types.SimpleNamespace(
            url=lambda kind, ds="mnist": f"{base}/{kind}/{ds}/", requests=httpd.requests  # type: ignore[attr-defined]
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_hard_coded_hashes_match_shared_sums(shared: Path) -> None:
    for name in DATASETS:
        if (shared / name / "SHA256SUMS").is_file():  # the shared folder's own list
            sums = dict(reversed(line.split()) for line in (shared / name / "SHA256SUMS").read_text().splitlines() if line)
        else:  # the cache holds only the files: hash them
            sums = {f: _sha256(shared / name / f) for f in SHA256[name]}
        assert SHA256[name] == sums


def test_download_good(server: types.SimpleNamespace, isolated: Path) -> None:
    x, y = load_mnist_like("mnist", "test", mirrors=[server.url("good")])
    assert x.shape == (10000, 784) and y[:10].tolist() == MNIST_TEST_HEAD
    assert sorted(p.name for p in (isolated / "mnist").iterdir()) == sorted(TEST_FILES)  # no temp files left
    for f in TEST_FILES:
        assert _sha256(isolated / "mnist" / f) == SHA256["mnist"][f]
    n = len(server.requests)
    assert n == 2
    clear_cache()
    load_mnist_like("mnist", "test", mirrors=[server.url("good")])
    assert len(server.requests) == n  # already on disk: nothing fetched again


def test_download_shows_a_progress_line(server: types.SimpleNamespace, isolated: Path, capsys: pytest.CaptureFixture[str]) -> None:
    load_mnist_like("mnist", "test", mirrors=[server.url("good")])
    err = capsys.readouterr().err
    size = (SHARED / "mnist" / TEST_FILES[0]).stat().st_size / 1e6
    # not a terminal: a plain line per file when it is complete (and every few seconds before)
    assert re.search(rf"Downloading mnist/{re.escape(TEST_FILES[0])}: {size:.1f} / {size:.1f} MB \(100%\), [\d.]+ MB/s", err), err
    assert f"Downloading mnist/{TEST_FILES[1]}" in err


def test_download_progress_on_a_terminal_keeps_each_mirror_on_its_own_line() -> None:
    import io

    from minitorch_peft.progress import DownloadProgress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    shown = DownloadProgress("mnist/f.gz", stream=out)
    shown.source("http://a/f.gz")
    shown(1_000_000, 3_000_000)  # the first mirror stops part-way
    shown.source("http://b/f.gz")
    shown(3_000_000, 3_000_000, True)
    lines = out.getvalue().split("\n")
    assert lines[0] == "\rDownloading http://a/f.gz ..."
    assert re.fullmatch(r"\rDownloading mnist/f\.gz: 1\.0 / 3\.0 MB \(33%\), [\d.]+ MB/s", lines[1]), lines
    assert lines[2] == "\rDownloading http://b/f.gz ..."
    assert re.fullmatch(r"\rDownloading mnist/f\.gz: 3\.0 / 3\.0 MB \(100%\), [\d.]+ MB/s, SHA-256 verified", lines[3]), lines
    assert lines[4:] == [""]


def test_download_uses_module_mirrors(server: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    monkeypatch.setitem(dl.MIRRORS, "fashion-mnist", (server.url("good", "fashion-mnist"),))
    _, y = load_mnist_like("fashion-mnist", "test")
    assert len(y) == 10000 and (isolated / "fashion-mnist" / TEST_FILES[0]).is_file()
    assert all("/fashion-mnist/" in r for r in server.requests)


def test_download_corrupted_is_rejected(server: types.SimpleNamespace, isolated: Path) -> None:
    corrupt = bytearray((SHARED / "mnist" / TEST_FILES[0]).read_bytes())
    corrupt[len(corrupt) // 2] ^= 0x01
    msg = expect_data_error(
        lambda: load_mnist_like("mnist", "test", mirrors=[server.url("corrupt")]),
        TEST_FILES[0],
        "SHA-256 mismatch",
        SHA256["mnist"][TEST_FILES[0]],
        hashlib.sha256(corrupt).hexdigest(),
    )
    assert str(isolated / "mnist") in msg
    assert not (isolated / "mnist").exists()  # no empty folder left to look like a cache  # neither the bad file nor a temp file


def test_download_corrupted_then_good_mirror(server: types.SimpleNamespace, isolated: Path) -> None:
    _, y = load_mnist_like("mnist", "test", mirrors=[server.url("corrupt"), server.url("good")])
    assert y[:10].tolist() == MNIST_TEST_HEAD
    assert [r.split("/")[1] for r in server.requests] == ["corrupt", "good", "corrupt", "good"]


def test_download_404_falls_through_to_next_mirror(server: types.SimpleNamespace, isolated: Path) -> None:
    _, y = load_mnist_like("mnist", "test", mirrors=[server.url("missing"), server.url("good")])
    assert y[:10].tolist() == MNIST_TEST_HEAD
    assert server.requests[:2] == [f"/missing/mnist/{TEST_FILES[0]}", f"/good/mnist/{TEST_FILES[0]}"]


def test_download_404_everywhere(server: types.SimpleNamespace, isolated: Path) -> None:
    expect_data_error(
        lambda: load_mnist_like("mnist", "test", mirrors=[server.url("missing"), server.url("gone")]),
        "404",
        f"/missing/mnist/{TEST_FILES[0]}",
        f"/gone/mnist/{TEST_FILES[0]}",
        str(isolated / "mnist"),
        ENV_VAR,
        "--data-dir",
    )
    assert not (isolated / "mnist").exists()  # no empty folder left to look like a cache


def test_download_cut_off_body(server: types.SimpleNamespace, isolated: Path) -> None:
    expect_data_error(lambda: load_mnist_like("mnist", "test", mirrors=[server.url("short")]), TEST_FILES[0])
    assert not (isolated / "mnist").exists()  # no empty folder left to look like a cache


def test_download_size_cap(server: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    monkeypatch.setattr(dl, "MAX_BYTES", 1000)
    expect_data_error(lambda: load_mnist_like("mnist", "test", mirrors=[server.url("good")]), "more than 1000 bytes")
    assert not (isolated / "mnist").exists()  # no empty folder left to look like a cache


def test_offline_message_says_where_to_put_files(isolated: Path) -> None:
    # The autouse fixture points every mirror at a closed 127.0.0.1 port.
    expect_data_error(
        lambda: load_mnist_like("mnist", "train"),
        "train-images-idx3-ubyte.gz",
        str(isolated / "mnist"),
        ENV_VAR,
        "--data-dir",
    )
    assert not (isolated / "mnist" / "train-images-idx3-ubyte.gz").exists()


def test_download_off(server: types.SimpleNamespace, isolated: Path) -> None:
    expect_data_error(
        lambda: load_mnist_like("mnist", "test", download=False, mirrors=[server.url("good")]),
        "downloading is off",
        str(isolated / "mnist"),
        ENV_VAR,
    )
    assert server.requests == []


def test_explicit_dir_missing_file_never_downloads(server: types.SimpleNamespace, tmp_path: Path) -> None:
    (tmp_path / "dd" / "mnist").mkdir(parents=True)
    (tmp_path / "dd" / "mnist" / TEST_FILES[0]).write_bytes(b"")
    expect_data_error(
        lambda: load_mnist_like("mnist", "test", data_dir=tmp_path / "dd", mirrors=[server.url("good")]),
        TEST_FILES[1],
        str(tmp_path / "dd" / "mnist"),
        "--data-dir",
    )
    assert server.requests == [] and os.listdir(tmp_path / "dd" / "mnist") == [TEST_FILES[0]]


def test_env_dir_missing_file_is_reported(server: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    expect_data_error(
        lambda: load_mnist_like("mnist", "test", mirrors=[server.url("good")]),
        TEST_FILES[0],
        str(tmp_path / "env" / "mnist"),
        f"${ENV_VAR}",
    )
    assert server.requests == [] and not (tmp_path / "env").exists()


def test_pointing_at_dataset_folder_gets_a_hint(shared: Path) -> None:
    expect_data_error(lambda: load_mnist_like("mnist", "test", data_dir=shared / "mnist"), "parent")


def test_ctrl_c_mid_download_removes_temp_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class Response:
        def __init__(self) -> None:
            self.reads = 0

        def __enter__(self) -> "Response":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def read(self, n: int) -> bytes:
            self.reads += 1
            if self.reads > 1:
                assert len(list((tmp_path / "cache" / "mnist").iterdir())) == 1  # the temp file, mid-download
                raise KeyboardInterrupt
            return b"x" * 100

    monkeypatch.setattr(dl, "_open", lambda *a, **k: Response())
    with pytest.raises(KeyboardInterrupt):
        dl.download_file("f.gz", tmp_path / "cache" / "mnist", ["http://127.0.0.1:9/"], "0" * 64, timeout=1)
    assert list(tmp_path.iterdir()) == []  # neither the temp file nor the folders made for it


def test_failed_download_keeps_a_folder_it_did_not_make(server: types.SimpleNamespace, isolated: Path) -> None:
    (isolated / "mnist").mkdir(parents=True)
    expect_data_error(lambda: load_mnist_like("mnist", "test", mirrors=[server.url("missing")]), "404")
    assert (isolated / "mnist").is_dir()  # the user's (or an earlier run's) folder is not ours to remove


# --------------------------------------------------------------------------- batches


def test_num_batches() -> None:
    assert [num_batches(n, 3) for n in (0, 1, 3, 9, 10)] == [0, 1, 1, 3, 4]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            num_batches(10, bad)


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_cover_every_index_once(shuffle: bool) -> None:
    n, bs = 10, 3
    x = np.arange(n * 2).reshape(n, 2)
    y = np.arange(n)
    batches = list(iterate_batches(x, y, bs, shuffle=shuffle, seed=1))
    assert [len(yb) for _, yb in batches] == [3, 3, 3, 1] and len(batches) == num_batches(n, bs)
    seen = np.concatenate([yb for _, yb in batches])
    assert sorted(seen.tolist()) == list(range(n))
    assert (seen.tolist() == list(range(n))) is not shuffle
    for xb, yb in batches:
        assert np.array_equal(xb, x[yb])  # rows stay paired with their labels


def test_batch_order_is_seeded() -> None:
    x = np.arange(100)

    def order(**kw: int) -> list[int]:
        return np.concatenate([b for b, _ in iterate_batches(x, x, 7, **kw)]).tolist()

    assert order(seed=0, epoch=0) == order(seed=0, epoch=0) == epoch_permutation(100, 0, 0).tolist()
    assert order(seed=0, epoch=0) != order(seed=0, epoch=1)
    assert order(seed=0, epoch=0) != order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=0, epoch=1)


def test_batches_validate_eagerly() -> None:
    x = np.zeros((4, 2))
    with pytest.raises(ValueError):
        iterate_batches(x, x, 0)  # raised at call time, before any iteration
    with pytest.raises(ValueError):
        iterate_batches(x, np.zeros(3), 2)
    with pytest.raises(ValueError):
        iterate_batches(x, x, 2, seed=-1)
    assert list(iterate_batches(np.zeros((0, 2)), np.zeros(0), 4)) == []


class _DeviceIndex(np.ndarray):
    """An index array that `fakexp.asarray` produced (so tests can see the conversion happened)."""


class _DeviceArray:
    """A minimal non-NumPy array: a shape and fancy indexing that insists on converted indices."""

    __module__ = "fakexp.core"

    def __init__(self, a: np.ndarray) -> None:
        self.a = a
        self.shape = a.shape

    def __getitem__(self, idx: object) -> "_DeviceArray":
        assert isinstance(idx, _DeviceIndex), "indices were not converted with the array's module"
        return _DeviceArray(self.a[np.asarray(idx)])


def test_batches_convert_indices_with_xp(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[np.ndarray] = []
    fake = types.ModuleType("fakexp")
    fake.asarray = lambda a: calls.append(a) or np.asarray(a).view(_DeviceIndex)  # type: ignore[attr-defined]
    x = _DeviceArray(np.arange(10))

    got = [b.a for b, _ in iterate_batches(x, x, 4, xp=fake)]
    assert len(calls) == 1 and sorted(np.concatenate(got).tolist()) == list(range(10))
    assert [len(b) for b in got] == [4, 4, 2]

    # Without xp, the module that defines the array's type is used.
    monkeypatch.setitem(sys.modules, "fakexp", fake)
    got = [b.a for b, _ in iterate_batches(x, x, 4, seed=3)]
    assert len(calls) == 2 and sorted(np.concatenate(got).tolist()) == list(range(10))


def test_without_data_or_network_the_data_tests_skip_with_a_reason(isolated: Path) -> None:
    """conftest.find_data: no $MINITORCH_PEFT_DATA, an empty cache and no reachable mirror give a reason that
    says what is missing and how to fix it (pytest's -rs prints it in the summary), never a silent skip."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from conftest import find_data

    root, reason = find_data()
    assert root == isolated
    assert reason is not None and str(isolated) in reason and "could not be downloaded" in reason
    assert "MINITORCH_PEFT_DATA" in reason
    addopts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert "-rs" in addopts.split()


def test_with_a_network_the_data_comes_to_the_cache_once(server: types.SimpleNamespace, isolated: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import find_data

    for name in DATASETS:
        monkeypatch.setitem(dl.MIRRORS, name, (server.url("good", name),))
    root, reason = find_data()
    assert reason is None and root == isolated and len(server.requests) == 8  # 2 datasets x 2 splits x 2 files
    assert find_data() == (isolated, None) and len(server.requests) == 8  # the second time: nothing downloaded
