"""Fetch the canonical dataset files from public mirrors, verified by SHA-256 before they land."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import DataError

# Base URLs tried in order. Looked up at call time, so tests can swap in a local server.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

# SHA-256 of the canonical .gz files; a plain-http mirror is safe because of these.
SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
    },
}

# The largest real file is ~26 MB; the cap keeps a misbehaving server from filling the disk.
MAX_BYTES = 64 << 20
_CHUNK = 1 << 20


class _MirrorFailed(Exception):
    """One mirror did not deliver an intact file; the next one is tried."""


def download_file(
    filename: str,
    folder: str | os.PathLike[str],
    mirrors: Sequence[str],
    sha256: str,
    timeout: float = 60.0,
    progress: Callable[[int, int | None, bool], None] | None = None,
) -> Path:
    """Fetch `filename` from the first mirror that serves it intact into `folder`; return its path.

    `progress(received_bytes, total_bytes_or_None, done)` is called as the bytes arrive; by default a
    progress line on stderr (`minitorch_peft.progress.DownloadProgress`).
    """
    folder = Path(folder)
    if progress is None:
        from ..progress import DownloadProgress

        progress = DownloadProgress(f"{folder.name}/{filename}")
    dest = folder / filename
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {folder} to download {filename} into: {e.strerror or e}") from e
    failures: list[str] = []
    for base in mirrors:
        url = base if base.endswith("/") else base + "/"
        url += filename
        try:
            _fetch_verified(url, dest, sha256, timeout, progress)
            return dest
        except _MirrorFailed as e:
            failures.append(str(e))
        except (OSError, http.client.HTTPException, ValueError) as e:
            # URLError/HTTPError (404 ...), timeouts, refused connections, cut-off bodies.
            failures.append(f"{url}: {e}")
    if not failures:
        failures.append("no mirrors configured")
    raise DataError(f"could not download {filename} into {folder}: {'; '.join(failures)}")


def _fetch_verified(url: str, dest: Path, sha256: str, timeout: float,
                    progress: Callable[[int, int | None, bool], None] = lambda *_: None) -> None:
    """Stream `url` into a temp file beside `dest` and rename it over `dest` only if the hash matches."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        size = 0
        request = urllib.request.Request(url, headers={"User-Agent": "minitorch_peft"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as response:
            length = getattr(response, "headers", None) and response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                progress(size, total, False)
                if size > MAX_BYTES:
                    raise _MirrorFailed(f"{url}: more than {MAX_BYTES} bytes, not the expected file")
                digest.update(chunk)
                out.write(chunk)
        got = digest.hexdigest()
        if got != sha256:
            raise _MirrorFailed(
                f"{url}: SHA-256 mismatch for {dest.name} (expected {sha256}, got {got}); download discarded"
            )
        progress(size, total, True)
        os.replace(tmp, dest)  # atomic: readers see either no file or the verified one
    except BaseException:
        # Also on Ctrl-C: never leave a partial or unverified file behind.
        tmp.unlink(missing_ok=True)
        raise

