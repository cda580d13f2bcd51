"""Checkpoints: arrays in ``.npz``, settings in JSON; written atomically, read strictly.

Every write goes to a temporary name in the same folder and is renamed into place only once complete,
so an interrupted save never leaves a half-written file and never damages the previous one. A folder of
several files is written whole beside the old one and switched in by one atomic exchange of the two names
(``atomic_directory``).

Reading trusts nothing: JSON is size- and depth-limited, an ``.npz`` is checked member by member from its
headers (declared shapes against the bytes really there) before any array is allocated, and floating
arrays must be finite.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import tokenize
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

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
        save_step(f"open {path.name}")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        save_step(f"wrote {path.name}")
        os.replace(tmp, path)
        save_step(f"renamed {path.name}")
    except BaseException:  # KeyboardInterrupt included: the temporary file must not survive
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_npz(path: str | Path, arrays: dict[str, Any]) -> None:
    """Write name -> array (host copies of device arrays) to ``path`` atomically, uncompressed."""
    host = {k: _to_host(v) for k, v in arrays.items()}
    _atomic_write(Path(path), lambda f: np.savez(f, **host), ".tmp")


MAX_NPZ_MEMBERS = 4096
# deflate cannot expand more than ~1032:1; a member declaring more than this is a zip bomb
_MAX_DEFLATE_RATIO = 1100
_ARRAY_KINDS = "biuf"  # bool, integers, floats: every array a checkpoint holds


def _existing_file(path: str | Path) -> Path:
    """``path`` as a Path; a CheckpointError saying which when it is missing or not a file (a folder, say)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {'is a directory, not a file' if path.is_dir() else 'file not found'}")
    return path


def npz_headers(path: str | Path, max_bytes: int | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of every array of an ``.npz``, read from the member headers only.

    Checks, before a single array is allocated, that each member is a ``.npy`` of a plain numeric dtype
    whose declared size is exactly the bytes the archive holds for it (a lying header cannot make the
    reader allocate more than the file really contains), and that the total stays under ``max_bytes``.
    """
    path = _existing_file(path)
    try:
        fh = open(path, "rb")
    except OSError as e:  # no permission, say: the file may be fine, so not "truncated or corrupted"
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    total = 0
    try:
        with fh, zipfile.ZipFile(fh) as zf:
            size = os.fstat(fh.fileno()).st_size
            infos = zf.infolist()
            if len(infos) > MAX_NPZ_MEMBERS:
                raise ValueError(f"{len(infos)} members, more than {MAX_NPZ_MEMBERS}")
            for info in infos:
                if not info.filename.endswith(".npy") or info.is_dir():
                    raise ValueError(f"member {info.filename!r} is not a .npy array")
                name = info.filename[:-4]
                if name in out:
                    raise ValueError(f"array {name!r} appears twice")
                if info.compress_type == zipfile.ZIP_STORED:
                    if info.compress_size != info.file_size or info.file_size > size:
                        raise ValueError(f"member {info.filename!r} declares {info.file_size} bytes, the file has {size}")
                elif info.file_size > _MAX_DEFLATE_RATIO * max(info.compress_size, 1) + 4096 or info.compress_size > size:
                    raise ValueError(f"member {info.filename!r} declares {info.file_size} bytes from {info.compress_size} compressed")
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        raise ValueError(f"array {name!r}: .npy format version {version} is not read")
                    header = f.tell()
                if dtype.hasobject or dtype.kind not in _ARRAY_KINDS or dtype.fields is not None:
                    raise ValueError(f"array {name!r} has dtype {dtype}, not a plain numeric type")
                nbytes = math.prod(shape) * dtype.itemsize
                if header + nbytes != info.file_size:
                    raise ValueError(f"array {name!r}: header says shape {shape} {dtype} ({nbytes} bytes), "
                                     f"the archive holds {info.file_size - header}")
                total += nbytes
                out[name] = (tuple(int(d) for d in shape), dtype)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, SyntaxError, TypeError, tokenize.TokenError,
            NotImplementedError, RuntimeError, zipfile.LargeZipFile, UnicodeDecodeError, OverflowError) as e:
        # read_array_header raises ValueError for a malformed header dict (tokenize.TokenError for an
        # unclosed one: NumPy tokenizes headers of old files); zipfile may raise
        # NotImplementedError (unknown compression) or RuntimeError (encrypted member)
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({e})") from None
    if max_bytes is not None and total > max_bytes:
        raise CheckpointError(f"{path}: arrays of {total:,} bytes, more than the {max_bytes:,} expected")
    return out


def check_finite(arrays: dict[str, Any], source: str) -> None:
    """Refuse a floating array holding NaN or infinity, naming it (a model that cannot predict anything)."""
    for key, value in arrays.items():
        a = _to_host(value)
        if a.dtype.kind in "fc" and a.size and not np.isfinite(a).all():
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise CheckpointError(f"{source}: array {key!r} holds {bad} non-finite value(s) (NaN or infinity)")


def load_npz(path: str | Path, finite: bool = False, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` (no pickles); a clear CheckpointError on any damage.

    The member headers are checked first (``npz_headers``), so nothing larger than the file really holds
    is ever allocated; with ``finite`` a floating array holding NaN or infinity is refused, by name.
    """
    path = Path(path)
    npz_headers(path, max_bytes)
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy: an array, not an archive of named ones
            raise ValueError("not an .npz archive")
        with z:
            arrays = {k: z[k] for k in z.files}  # reading each member checks its CRC
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zipfile.LargeZipFile,
            NotImplementedError, RuntimeError) as e:
        raise CheckpointError(f"{path}: truncated or corrupted checkpoint ({e})") from None
    if finite:
        check_finite(arrays, str(path))
    return arrays


def save_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: the file holds the old bytes or the new ones, never a part."""
    _atomic_write(Path(path), lambda f: f.write(data), ".tmp")


def save_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode()), ".tmp")


MAX_JSON_BYTES = 16 << 20  # a config is a few kilobytes; refuse to parse megabytes of anything
MAX_JSON_DEPTH = 32  # the deepest real config nests 6 levels (a resumable run's resume.optimizer.param_groups)


def json_depth(obj: Any) -> int:
    """How deeply lists and objects nest in ``obj`` (a scalar is 0), without recursion."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        if isinstance(node, list):
            depth = max(depth, d)
            stack.extend((v, d + 1) for v in node if isinstance(v, (dict, list)))
    return depth


def load_json(path: str | Path, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Read JSON; a clear CheckpointError if missing, malformed, too large or nested too deeply.

    NaN and Infinity literals (Python's json accepts them) are refused: no setting of ours is meant to be one.
    """
    path = _existing_file(path)
    if path.stat().st_size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {path.stat().st_size:,} bytes, too large for a config (at most {MAX_JSON_BYTES:,})")

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not a valid JSON number")

    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        obj = json.loads(data.decode("utf-8"), parse_constant=constant)
    except RecursionError:
        raise CheckpointError(f"{path}: nested more than {max_depth} levels deep") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if json_depth(obj) > max_depth:
        raise CheckpointError(f"{path}: nested more than {max_depth} levels deep")
    return obj


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


# ----------------------------------------------------------------------------- atomic folders

FAULT_ENV = "MINITORCH_PEFT_FAULT_AT_SAVE_STEP"
_steps_taken = 0
fault_hook: Callable[[str], None] | None = None  # tests: called with each step's label


def save_step(label: str) -> None:
    """A numbered point of a save where a test may make the process die (fault injection).

    With ``$MINITORCH_PEFT_FAULT_AT_SAVE_STEP=k`` the process kills itself (SIGKILL: no cleanup runs)
    at the k-th step, so a test can prove that a save killed at *every* step leaves a loadable folder.
    """
    global _steps_taken
    _steps_taken += 1
    if fault_hook is not None:
        fault_hook(label)
    at = os.environ.get(FAULT_ENV)
    if at and at.isdigit() and int(at) == _steps_taken:
        sys.stdout.flush()
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step; False where the OS or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        rc = libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # this file system cannot swap: fall back to two renames
    raise OSError(err, os.strerror(err), str(a), str(b))


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _leftovers(path: Path) -> list[Path]:
    """Temporary folders beside ``path`` left by saves that were killed (their process is gone).

    Names: ``.NAME.save-PID-TOKEN.tmp`` (this layout) and ``.NAME.XXXXXXXX.tmp|.old`` (the layout before it).
    """
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?:save-(\d+)-[0-9a-f]+|[A-Za-z0-9_]{{8}})\.(?:tmp|old)$")
    found = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            m = pattern.match(entry.name)
            if m and entry.is_dir() and not entry.is_symlink() and not _alive(m.group(1)):
                found.append(entry)
    return found


def _alive(pid: str | None) -> bool:
    if pid is None:
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``path``; on success it replaces ``path`` whole.

    The new version is written completely beside the old one (``.NAME.save-PID-TOKEN.tmp``), then the two
    names are exchanged in one atomic step (``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np`` on
    macOS): whenever the process dies, kill -9 included, ``path`` holds the old folder or the new one,
    never nothing. Where the file system cannot exchange names, two renames are used (a short window
    where ``path`` is missing; the old copy then stays beside it). The old version, and the leftovers of
    earlier saves of ``path`` whose process is gone, are removed after the switch.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.save-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        save_step("made the temporary folder")
        yield tmp
        _fsync_dir(tmp)
        save_step("wrote every file")
        if path.is_dir() and not path.is_symlink():
            if not _exchange(tmp, path):
                os.replace(path, tmp.with_suffix(".old"))
                save_step("moved the old folder aside")
                os.replace(tmp, path)
                tmp = tmp.with_suffix(".old")
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
        save_step("switched the folders")
    except BaseException:
        if tmp.is_dir() and tmp != path:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    # tmp now holds the old version (or nothing); drop it and what killed saves left
    shutil.rmtree(tmp, ignore_errors=True)
    save_step("removed the old folder")
    for leftover in _leftovers(path):
        shutil.rmtree(leftover, ignore_errors=True)


def _to_host(a: Any) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "get"):  # a CuPy array
        return a.get()
    return np.asarray(a)
