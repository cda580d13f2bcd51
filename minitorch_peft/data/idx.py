"""Reader for IDX files (the MNIST container format), gzipped or raw."""

from __future__ import annotations

import gzip
import io
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08  # IDX type code for unsigned bytes; the only one MNIST-like files use
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801

_FIX = "delete or replace it (a fresh copy is fetched into the cache when missing)"


# The largest real payload is 47 MB (60,000 images); a header declaring more than this is refused.
MAX_IDX_BYTES = 1 << 30
# deflate cannot expand more than ~1032:1: a header declaring more than this many times the .gz is a lie
_MAX_GZIP_RATIO = 1100
_CHUNK = 1 << 20


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file into a writable uint8 array shaped as its header says.

    A gzipped file is decompressed as a stream, never beyond the size its IDX header declares (itself
    bounded by ``MAX_IDX_BYTES`` and by what the compressed size can hold): a gzip bomb costs nothing.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    # Decide by content, not by name: a '.gz' may have been unpacked in place and vice versa.
    if data[:2] == GZIP_MAGIC:
        try:
            return _read_gzip(data, str(path))
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e}); {_FIX}") from e
    return parse_idx(data, str(path))


def _read_gzip(compressed: bytes, name: str) -> np.ndarray:
    with gzip.GzipFile(fileobj=io.BytesIO(compressed)) as f:
        head = f.read(4)
        if len(head) == 4 and head[:3] == b"\0\0" + bytes([UBYTE]) and head[3]:
            head += f.read(4 * head[3])
        dims = _dims(head, name)  # raises on a bad magic or a short header
        need = math.prod(dims)
        cap = min(MAX_IDX_BYTES, _MAX_GZIP_RATIO * len(compressed))
        if need > cap:
            raise DataError(f"{name}: header declares dims {dims} = {need:,} bytes, more than a {len(compressed):,}-byte "
                            f"gzip file can hold (at most {cap:,}); {_FIX}")
        payload = bytearray()
        while len(payload) < need:
            chunk = f.read(min(_CHUNK, need - len(payload)))
            if not chunk:
                raise DataError(f"{name}: payload is {len(payload)} bytes but dims {dims} need {need} (truncated); {_FIX}")
            payload += chunk
        if f.read(1):
            raise DataError(f"{name}: more than the {need} bytes dims {dims} need (trailing bytes); {_FIX}")
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)  # a bytearray: the array is writable


def _dims(data: bytes, name: str) -> tuple[int, ...]:
    """The dims of an IDX header at the start of ``data``, checking magic and length."""
    if len(data) < 4:
        raise DataError(f"{name}: only {len(data)} bytes, too short for an IDX header; {_FIX}")
    magic = int.from_bytes(data[:4], "big")
    ndim = data[3]
    if data[:2] != b"\0\0" or data[2] != UBYTE or ndim == 0:
        raise DataError(
            f"{name}: bad IDX magic 0x{magic:08x} (expected 0x000008NN with NN >= 1, "
            f"e.g. 0x{IMAGES_MAGIC:08x} images, 0x{LABELS_MAGIC:08x} labels); {_FIX}"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{name}: header truncated ({len(data)} of {header} bytes); {_FIX}")
    return struct.unpack(f">{ndim}I", data[4:header])


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode the bytes of an unsigned-byte IDX file, checking magic, dims and exact length."""
    dims = _dims(data, name)
    header = 4 + 4 * len(dims)
    need = math.prod(dims)  # Python int: no overflow on absurd headers
    if need > MAX_IDX_BYTES:  # as for a gzipped file: the bound the readers of training data rely on
        raise DataError(f"{name}: header declares dims {dims} = {need:,} bytes, more than {MAX_IDX_BYTES:,}; {_FIX}")
    have = len(data) - header
    if have != need:
        raise DataError(
            f"{name}: payload is {have} bytes but dims {dims} need {need} "
            f"({'truncated' if have < need else 'trailing bytes'}); {_FIX}"
        )
    # Copy so callers get an ordinary writable array, not a view of an immutable bytes object.
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()
