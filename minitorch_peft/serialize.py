"""Checkpoints: arrays in ``.npz``, settings in JSON; written atomically, read strictly.

Every write goes to a temporary name in the same folder and is renamed into place only once complete,
so an interrupted save never leaves a half-written file and never damages the previous one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import MinitorchPeftError


class CheckpointError(MinitorchPeftError, ValueError):
    """A checkpoint file is missing, truncated, corrupted, or does not fit the model."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write: Any, suffix: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint should get the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: the temporary file must not survive
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_npz(path: str | Path, arrays: dict[str, Any]) -> None:
    """Write name -> array (host copies of device arrays) to ``path`` atomically, uncompressed."""
    host = {k: _to_host(v) for k, v in arrays.items()}
    _atomic_write(Path(path), lambda f: np.savez(f, **host), ".tmp")


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` (no pickles); a clear CheckpointError on any damage."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy: an array, not an archive of named ones
            raise ValueError("not an .npz archive")
        with z:
            return {k: z[k] for k in z.files}  # reading each member checks its CRC
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zipfile.LargeZipFile) as e:
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({e})") from None


def save_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode()), ".tmp")


def load_json(path: str | Path) -> Any:
    """Read JSON; a clear CheckpointError if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def save_state_dict(path: str | Path, module: Any, keys: list[str] | None = None) -> None:
    """Save a module's state dict (or the listed keys of it) to ``.npz``."""
    state = module.state_dict()
    save_npz(path, state if keys is None else {k: state[k] for k in keys})


def load_state_dict(path: str | Path, module: Any, strict: bool = True) -> None:
    """Load an ``.npz`` into a module; errors name the file and the key that does not fit."""
    from .nn.module import StateDictError

    arrays = load_npz(path)
    try:
        module.load_state_dict(arrays, strict=strict, source=str(path))
    except StateDictError as e:
        raise CheckpointError(str(e)) from None


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces ``path`` whole, on failure it vanishes.

    For checkpoints made of several files (config + weights), so that readers never see new config
    beside old weights, and an interrupted save leaves the previous checkpoint as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "previous")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _to_host(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):  # a CuPy array
        return a.get()
    return np.asarray(a)
