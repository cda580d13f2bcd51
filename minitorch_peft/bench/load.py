"""``bench --load K``: K competing CPU-bound processes for the length of the benchmark.

Users run the benchmark on laptops and shared servers, where another program often holds a core. This
reproduces that on purpose: K plain Python busy loops at normal priority, started in one process group of
their own, so that both runtimes are measured under the same competition, round by round.

They never outlive the benchmark: they are stopped when the ``with`` block ends (normally, on an
exception, on Ctrl-C), by an ``atexit`` hook, and on SIGTERM / SIGHUP if the benchmark is ended that way;
each one also stops by itself when its deadline passes or when its parent process is gone (checked every
few milliseconds), which covers a benchmark killed with SIGKILL.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
from typing import Any

MAX_SECONDS = 4 * 3600  # a bound of its own, in case everything else failed

# The child: spin until the deadline or until the parent that started it is gone.
_BUSY = """
import os, sys, time
parent, end = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
x = 0
while time.monotonic() < end and os.getppid() == parent:
    for i in range(20000):
        x += i * i
"""


class BusyLoad:
    """Context manager: ``k`` CPU-bound processes while the block runs (none for ``k`` = 0)."""

    def __init__(self, k: int, max_seconds: float = MAX_SECONDS) -> None:
        self.k, self.max_seconds = k, max_seconds
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pgid: int | None = None
        self._old_handlers: dict[int, Any] = {}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def describe(self) -> dict[str, Any] | None:
        if not self.k:
            return None
        return {"processes": self.k, "kind": "CPU-bound Python busy loop, normal priority", "pids": self.pids}

    def __enter__(self) -> "BusyLoad":
        if self.k:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        atexit.register(self.stop)
        self._trap_signals()
        for _ in range(self.k):
            # the first child leads a new process group; the others join it, so one killpg stops them all
            group = self.pgid or 0
            kw: dict[str, Any] = ({"process_group": group} if sys.version_info >= (3, 11)
                                  else {"preexec_fn": lambda g=group: os.setpgid(0, g)})
            p = subprocess.Popen([sys.executable, "-c", _BUSY, str(os.getpid()), str(self.max_seconds)],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
            self.procs.append(p)
            if self.pgid is None:
                self.pgid = p.pid

    def stop(self) -> None:
        """Stop every load process (idempotent) and restore the signal handlers."""
        if self.pgid is not None:
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs.clear()
        self.pgid = None
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()
        atexit.unregister(self.stop)

    def _trap_signals(self) -> None:
        """SIGTERM / SIGHUP stop the load first, then do what they did before, or exit through the ``finally``
        blocks (Ctrl-C's KeyboardInterrupt already unwinds through ``__exit__``)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if sig is None:
                continue
            previous = signal.getsignal(sig)
            self._old_handlers[sig] = previous

            def handler(signum: int, frame: Any, previous: Any = previous) -> None:
                self.stop()
                if callable(previous):
                    previous(signum, frame)
                elif previous != signal.SIG_IGN:
                    raise SystemExit(128 + signum)  # unwinds: the workers and temporary files are cleaned up too

            signal.signal(sig, handler)


def alive(pids: list[int], wait: float = 5.0) -> list[int]:
    """The pids among ``pids`` still running (not exited, not zombies) after up to ``wait`` seconds."""
    end = time.monotonic() + wait
    left = list(pids)
    while left:
        left = [p for p in left if _running(p)]
        if not left or time.monotonic() >= end:
            break
        time.sleep(0.05)
    return left


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
