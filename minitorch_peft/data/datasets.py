"""MNIST and Fashion-MNIST: find (or fetch) the IDX files and decode them into normalised arrays."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from . import download as _download
from .errors import DataError
from .idx import _FIX, read_idx

ENV_VAR = "MINITORCH_PEFT_DATA"
DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist")
SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# MNIST's pixel mean and std; used for Fashion-MNIST too so both share one input scale.
MEAN = 0.1307
STD = 0.3081
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10

Split = Literal["train", "test"]


@dataclass(frozen=True)
class DataRoot:
    """A folder holding one subfolder per dataset, and where that choice came from."""

    path: Path
    origin: Literal["data_dir", "env", "cache"]

    def describe(self) -> str:
        """Say where this folder came from, for error messages."""
        return {
            "data_dir": f"{self.path} (from data_dir / --data-dir)",
            "env": f"{self.path} (from ${ENV_VAR})",
            "cache": f"{self.path} (the user cache)",
        }[self.origin]


def cache_dir() -> Path:
    """The user cache folder: $XDG_CACHE_HOME/minitorch_peft, else ~/.cache/minitorch_peft."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says to ignore relative values.
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "minitorch_peft"


def resolve_root(data_dir: str | os.PathLike[str] | None = None) -> DataRoot:
    """Pick the data folder: explicit `data_dir`, then $MINITORCH_PEFT_DATA, then the user cache."""
    if data_dir is not None and str(data_dir) != "":
        return DataRoot(Path(data_dir).expanduser(), "data_dir")
    env = os.environ.get(ENV_VAR, "")
    if env:
        return DataRoot(Path(env).expanduser(), "env")
    return DataRoot(cache_dir(), "cache")


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def _on_disk(folder: Path, gz_name: str) -> Path | None:
    """The file as shipped (.gz) or unpacked (no suffix), whichever exists."""
    for candidate in (folder / gz_name, folder / gz_name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _where_to_put(name: str, filename: str) -> str:
    return (
        f"put the {name} files in {cache_dir() / name}, or point ${ENV_VAR} or --data-dir "
        f"at a folder holding {name}/{filename}"
    )


def find_split_files(
    name: str,
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    mirrors: list[str] | tuple[str, ...] | None = None,
    timeout: float | tuple[float, float] = (_download.CONNECT_TIMEOUT, _download.READ_TIMEOUT),
) -> tuple[Path, Path]:
    """Return the (images, labels) paths for a split, downloading into the cache if they are missing there."""
    _check_name(name)
    _check_split(split)
    root = resolve_root(data_dir)
    folder = root.path / name
    found: list[Path] = []
    for filename in SPLITS[split]:
        path = _on_disk(folder, filename)
        if path is not None:
            found.append(path)
            continue
        if root.origin != "cache":
            # A folder the user named must already hold the data; never download into it behind their back.
            hint = ""
            if _on_disk(root.path, filename) is not None:
                hint = f"; {root.path} holds it directly, so pass its parent folder instead"
            raise DataError(f"{filename} not found in {folder}; data folder is {root.describe()}{hint}")
        if not download:
            raise DataError(f"{filename} not found in {folder} and downloading is off; {_where_to_put(name, filename)}")
        try:
            bases = _download.MIRRORS[name] if mirrors is None else mirrors
            found.append(_download.download_file(filename, folder, bases, _download.SHA256[name][filename], timeout))
        except DataError as e:
            raise DataError(f"{e}. Offline? {_where_to_put(name, filename)}") from e
    return found[0], found[1]


def normalize(images: np.ndarray) -> np.ndarray:
    """Map uint8 pixels to C-contiguous float32 (x/255 - MEAN)/STD, keeping the shape."""
    # A 256-entry table computed in float64 and rounded once: exact, and faster than float math per pixel.
    table = ((np.arange(256, dtype=np.float64) / 255.0 - MEAN) / STD).astype(np.float32)
    return np.ascontiguousarray(table[np.asarray(images, dtype=np.uint8)])


def decode_split(images_path: str | os.PathLike[str], labels_path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read and check an images/labels IDX pair; return x (N, 784) float32 and y (N,) int64."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"{images_path}: expected images of shape (N, 28, 28), got {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{labels_path}: expected a 1-D label file, got shape {labels.shape}")
    if len(images) != len(labels):
        raise DataError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if len(images) == 0:  # nothing to train on or to score: refused here, not as an error deep in the arithmetic
        raise DataError(f"{images_path}: the header declares 0 images, an empty split; {_FIX}")
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        raise DataError(f"{labels_path}: label {int(labels.max())} outside 0..{NUM_CLASSES - 1}")
    x = normalize(images.reshape(len(images), -1))
    return x, labels.astype(np.int64)


VERIFIED_FILE = "verified.json"
RACY_SECONDS = 2  # a file younger than this is verified every time (see verify_canonical)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path) -> tuple[str, list[int]]:
    st = path.stat()
    return str(path.resolve()), [st.st_size, st.st_mtime_ns]


def _read_verified() -> dict[str, object]:
    try:
        stamps = json.loads((cache_dir() / VERIFIED_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def verify_canonical(name: str, path: Path) -> None:
    """Check a file carrying a canonical name and size (``download.CANONICAL``) against its known SHA-256.

    A file of another size under that name is either damaged in its length (which the IDX checks refuse:
    the header fixes the length) or the user's own data; a flipped byte keeps the size and is caught
    here. A file once verified is remembered in ``<cache>/verified.json`` by path, size and
    modification time, so later runs do not hash 55 MB again; any change to the file makes it checked anew.
    A file modified within the last ``RACY_SECONDS`` is verified but not remembered: file times tick
    coarsely (a few ms), so a same-size rewrite in the same tick would keep the stamp (git's "racy clean").
    """
    known = _download.CANONICAL.get(name, {}).get(path.name)
    if known is None:
        return
    size, sha = known
    key, stamp = _stamp(path)
    if stamp[0] != size:
        return
    stamps = _read_verified()
    if stamps.get(key) == [*stamp, sha]:
        return
    try:
        got = _sha256(path)
    except OSError as e:  # an unreadable file (no permission, an I/O error) is the user's to fix, as in read_idx
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if got != sha:
        raise DataError(
            f"{path}: SHA-256 {got} is not the canonical {name} {path.name} ({sha}): the file is damaged or "
            f"altered; delete it (a fresh copy is downloaded into the cache when missing)"
        )
    if time.time_ns() - stamp[1] < RACY_SECONDS * 1_000_000_000:
        return
    stamps[key] = [*stamp, sha]
    with contextlib.suppress(OSError):  # remembering is an optimisation: a read-only cache only costs time
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".verified.", dir=folder)
        with os.fdopen(fd, "w") as f:
            json.dump(stamps, f)
        os.replace(tmp, folder / VERIFIED_FILE)


# Decoded splits keyed by file identity, so repeated loads (e.g. per experiment) skip the gunzip.
_CACHE: dict[tuple[object, ...], tuple[np.ndarray, np.ndarray]] = {}


def clear_cache() -> None:
    """Forget the decoded arrays held in memory."""
    _CACHE.clear()


def _file_key(path: Path) -> tuple[object, ...]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def load_mnist_like(
    name: str,
    split: Split,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    *,
    download: bool = True,
    mirrors: list[str] | tuple[str, ...] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Load a split as x (N, 784) float32 normalised and y (N,) int64; at most `limit` examples; arrays are read-only."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    images_path, labels_path = find_split_files(name, split, data_dir, download=download, mirrors=mirrors)
    key = _file_key(images_path) + _file_key(labels_path)
    if key not in _CACHE:
        for path in (images_path, labels_path):
            verify_canonical(name, path)
        x, y = decode_split(images_path, labels_path)
        # Read-only because every caller shares these arrays; an in-place edit would poison later loads.
        x.flags.writeable = False
        y.flags.writeable = False
        _CACHE[key] = (x, y)
    x, y = _CACHE[key]
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y
