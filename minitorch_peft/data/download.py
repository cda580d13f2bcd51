"""Fetch the canonical dataset files from public mirrors, verified by SHA-256 before they land."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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

# Size and SHA-256 of each canonical file, shipped (.gz) and unpacked (no suffix): a file on disk that
# carries one of these names is checked against them (once; ``datasets.verify_canonical`` remembers it).
CANONICAL: dict[str, dict[str, tuple[int, str]]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (9912422, SHA256["mnist"]["train-images-idx3-ubyte.gz"]),
        "train-labels-idx1-ubyte.gz": (28881, SHA256["mnist"]["train-labels-idx1-ubyte.gz"]),
        "t10k-images-idx3-ubyte.gz": (1648877, SHA256["mnist"]["t10k-images-idx3-ubyte.gz"]),
        "t10k-labels-idx1-ubyte.gz": (4542, SHA256["mnist"]["t10k-labels-idx1-ubyte.gz"]),
        "train-images-idx3-ubyte": (47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        "train-labels-idx1-ubyte": (60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        "t10k-images-idx3-ubyte": (7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        "t10k-labels-idx1-ubyte": (10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": (26421880, SHA256["fashion-mnist"]["train-images-idx3-ubyte.gz"]),
        "train-labels-idx1-ubyte.gz": (29515, SHA256["fashion-mnist"]["train-labels-idx1-ubyte.gz"]),
        "t10k-images-idx3-ubyte.gz": (4422102, SHA256["fashion-mnist"]["t10k-images-idx3-ubyte.gz"]),
        "t10k-labels-idx1-ubyte.gz": (5148, SHA256["fashion-mnist"]["t10k-labels-idx1-ubyte.gz"]),
        "train-images-idx3-ubyte": (47040016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        "train-labels-idx1-ubyte": (60008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        "t10k-images-idx3-ubyte": (7840016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        "t10k-labels-idx1-ubyte": (10008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
}

# Seconds to wait for a connection, and then for each read: a server that accepts the connection and
# never answers costs READ_TIMEOUT, not minutes, before the next mirror is tried.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 30.0

# The largest real file is ~26 MB; the cap keeps a misbehaving server from filling the disk.
MAX_BYTES = 64 << 20
_CHUNK = 1 << 20


class _MirrorFailed(Exception):
    """One mirror did not deliver an intact file; the next one is tried."""


class _ReadTimeout:
    """Mixin for an http.client connection: connects within ``timeout`` (the connect timeout), then
    waits at most ``read_timeout`` per read (for HTTPS, on the TLS socket its ``connect`` wraps)."""

    sock: Any

    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock.settimeout(self.read_timeout)


class _TimedHTTPConnection(_ReadTimeout, http.client.HTTPConnection):
    pass


class _TimedHTTPSConnection(_ReadTimeout, http.client.HTTPSConnection):
    pass


def _opener(read_timeout: float) -> urllib.request.OpenerDirector:
    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(_TimedHTTPConnection, req, read_timeout=read_timeout)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            return self.do_open(_TimedHTTPSConnection, req, context=self._context, read_timeout=read_timeout)

    return urllib.request.build_opener(HTTP(), HTTPS())


def _open(request: urllib.request.Request, timeout: tuple[float, float]) -> Any:
    """urlopen with a connect timeout and a (separate) timeout for each read."""
    return _opener(timeout[1]).open(request, timeout=timeout[0])


def download_file(
    filename: str,
    folder: str | os.PathLike[str],
    mirrors: Sequence[str],
    sha256: str,
    timeout: float | tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT),
    progress: Callable[[int, int | None, bool], None] | None = None,
) -> Path:
    """Fetch `filename` from the first mirror that serves it intact into `folder`; return its path.

    ``timeout``: (connect, read) seconds, or one number for both. Each mirror that fails (refused,
    silent, cut off, wrong hash) is reported in the final error if every mirror fails.
    `progress(received_bytes, total_bytes_or_None, done)` is called as the bytes arrive, with ``done``
    once the file is verified; by default a progress line on stderr that also names each mirror as it
    is tried (`minitorch_peft.progress.DownloadProgress`).
    """
    folder = Path(folder)
    shown: Any = None  # the default display, told of each mirror as it is tried
    if progress is None:
        from ..progress import DownloadProgress

        progress = shown = DownloadProgress(f"{folder.name}/{filename}")
    dest = folder / filename
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {folder} to download {filename} into: {e.strerror or e}") from e
    try:
        return _first_intact(filename, dest, mirrors, sha256, timeout, progress, shown)
    except BaseException:
        # Also on Ctrl-C: leave no empty folder behind, which a later look would take for a cache that is
        # there but broken. Only the folders this call made, and only while they are empty.
        for p in created:
            try:
                p.rmdir()
            except OSError:
                break
        raise


def _first_intact(filename: str, dest: Path, mirrors: Sequence[str], sha256: str,
                  timeout: float | tuple[float, float], progress: Callable[[int, int | None, bool], None],
                  shown: Any) -> Path:
    """Try each mirror in turn; the path of the first intact copy, or DataError naming every failure."""
    failures: list[str] = []
    for base in mirrors:
        url = base if base.endswith("/") else base + "/"
        url += filename
        if shown is not None:
            shown.source(url)
        try:
            _fetch_verified(url, dest, sha256, timeout if isinstance(timeout, tuple) else (timeout, timeout), progress)
            return dest
        except _MirrorFailed as e:
            failures.append(str(e))
        except (OSError, http.client.HTTPException, ValueError) as e:
            # URLError/HTTPError (404 ...), timeouts, refused connections, cut-off bodies.
            failures.append(f"{url}: {e}")
    if not failures:
        failures.append("no mirrors configured")
    raise DataError(f"could not download {filename} into {dest.parent}: {'; '.join(failures)}")


def _fetch_verified(url: str, dest: Path, sha256: str, timeout: tuple[float, float],
                    progress: Callable[[int, int | None, bool], None] = lambda *_: None) -> None:
    """Stream `url` into a temp file beside `dest` and rename it over `dest` only if the hash matches."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        size = 0
        request = urllib.request.Request(url, headers={"User-Agent": "minitorch_peft"})
        with os.fdopen(fd, "wb") as out, _open(request, timeout) as response:
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

