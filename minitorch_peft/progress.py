"""Progress for long loops: click's progress bar on a terminal, plain lines elsewhere (logs, CI, pipes).

``EpochProgress`` draws one epoch of training: click's bar and position, then the ETA (the mean time per step
so far times the steps left), running loss, samples/s and elapsed time. Not on a terminal, it writes a plain line every
``every_s`` seconds and one at the end of the epoch, so a log shows steady progress without any redrawing.
``DownloadProgress`` does the same for a file download (the mirror tried, bytes, percent, rate, verified).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import click


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60:02d}:{seconds % 60:02d}"


def _is_tty(stream: Any) -> bool:
    return bool(getattr(stream, "isatty", None) and stream.isatty())


class EpochProgress:
    """Progress of one epoch of ``total`` steps; ``update(done, samples, loss)`` after any step.

    ``loss`` may be a callable (read only when a line is drawn, so a device scalar is synchronised a few
    times per second at most, never every step).
    """

    def __init__(self, label: str, total: int, stream: Any = None, every_s: float = 10.0, min_interval_s: float = 0.1) -> None:
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stdout
        self.tty = _is_tty(self.stream)
        self.every_s = every_s if not self.tty else min_interval_s
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.info = ""
        self.bar = None
        if self.tty:
            # ETA is ours (labelled; click's is an unlabelled clock): the mean time per step so far times the steps left
            self.bar = click.progressbar(length=total, label=label, file=self.stream, show_pos=True, show_eta=False,
                                         item_show_func=lambda _: self.info, width=24)
            self.bar.__enter__()

    def due(self) -> bool:
        """Whether a line would be drawn now (callers may skip computing the loss otherwise)."""
        return time.perf_counter() - self.last >= self.every_s

    def update(self, done: int, samples: int, loss: float | Callable[[], float], force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        value = loss() if callable(loss) else loss
        elapsed = now - self.start
        rate = samples / max(elapsed, 1e-9)
        eta = "" if done >= self.total or done == 0 else f"ETA {_clock(elapsed / done * (self.total - done))}  "
        self.info = f"{eta}loss {value:.4f}  {rate:,.0f} samples/s  elapsed {_clock(elapsed)}"
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.render_progress()  # click renders on steps; the loss text may change without one
        else:
            self.stream.write(f"{self.label} {done}/{self.total} ({done / self.total:.0%})  {self.info}\n")
            self.stream.flush()
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class DownloadProgress:
    """``(received, total, done)`` callback for a verified download: a redrawn line on a terminal, else a
    line at the start, every ``every_s`` seconds and at the end (``done``: the file is complete and its
    SHA-256 verified). ``total`` is None when the server does not say. ``source(url)`` names each mirror
    as it is tried, on a line of its own."""

    def __init__(self, name: str, stream: Any = None, every_s: float = 5.0) -> None:
        self.name = name
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream)
        self.every_s = 0.1 if self.tty else every_s
        self.start = time.perf_counter()
        self.last = -float("inf")
        self.finished = False
        self.redrawing = False  # a terminal line is drawn and not ended yet

    def source(self, url: str) -> None:
        """An attempt from ``url`` begins (the first or the next mirror): rate and interval start again."""
        if self.redrawing:  # keep the line where the last mirror stopped
            self.stream.write("\n")
        self._write(f"Downloading {url} ...", end=True)
        self.start = time.perf_counter()
        self.last = -float("inf")
        self.finished = False

    def __call__(self, received: int, total: int | None, done: bool = False) -> None:
        now = time.perf_counter()
        if self.finished or (not done and now - self.last < self.every_s):
            return
        self.last = now
        rate = received / max(now - self.start, 1e-9)
        size = f"{received / 1e6:.1f} / {total / 1e6:.1f} MB ({received / total:.0%})" if total else f"{received / 1e6:.1f} MB"
        line = f"Downloading {self.name}: {size}, {rate / 1e6:.1f} MB/s" + (", SHA-256 verified" if done else "")
        self._write(line, end=done)
        self.finished = done

    def _write(self, line: str, end: bool) -> None:
        if self.tty:
            self.stream.write("\r" + line + ("\n" if end else ""))
            self.redrawing = not end
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
