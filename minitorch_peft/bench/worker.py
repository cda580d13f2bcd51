"""One runtime per process: the benchmark's worker processes and the parent's handle on them.

Two thread pools in one process disturb each other (NumPy's OpenBLAS workers spin after a call while
PyTorch's OpenMP pool wants the same cores, and the reverse), so ``bench`` measures each runtime in a process
of its own: one worker for ours, one for PyTorch. The parent only coordinates ("warm up case c", "run case c
n times") and gets numbers back; it never imports PyTorch. Each worker times its own blocks with its own
clock, so the pipe's latency is never on the clock.

Protocol: one JSON object per line. The parent writes ``{"op": NAME, ...arguments}`` to the worker's stdin;
the worker answers on its stdout with ``{"ok": result}`` or ``{"error": message, "type": exception class,
"project": true if it is one of our own error types, "traceback": text}``. Arrays (weights, the batch) travel
by file: the ours worker writes them as .npz, the PyTorch worker reads them. Anything a worker prints goes to
stderr, so nothing but replies is ever on the protocol stream. A worker exits on ``{"op": "exit"}`` or when
its stdin closes (the parent has gone).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import traceback
from typing import Any, Callable

from ..errors import MinitorchPeftError
from ..kernels.threads import DEFAULT_SIZE_POLICY
from .timing import run_calls

SIDES = ("ours", "torch")


class WorkerError(MinitorchPeftError):
    """A worker reported one of the project's own errors (PyTorch missing, data not found): one line."""


class WorkerCrash(RuntimeError):
    """A worker failed with a bug (its traceback is in the message) or died."""


# ------------------------------------------------------------------------------------ in the worker


class Side:
    """What every worker does: hold named cases (zero-argument callables), warm them up, time blocks of them."""

    name = "side"

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self.cases: dict[str, Callable[[], Any]] = {}
        self.syncs: dict[str, Callable[[], None] | None] = {}

    # every op_* method is a protocol operation; its keyword arguments come from the request
    def op_hello(self) -> dict[str, Any]:
        from threadpoolctl import threadpool_info

        return {"side": self.name, "pid": os.getpid(), "threadpools": threadpool_info(),
                "torch_imported": "torch" in sys.modules}

    def op_warmup(self, case: str, n: int) -> None:
        run_calls(self.cases[case], n, self.syncs.get(case))

    def op_run(self, case: str, n: int) -> float:
        """Milliseconds per call over ``n`` calls (the sync, if any, timed with them)."""
        gc.collect(1)  # the young generations, untimed: garbage the last block left is not this block's cost
        return run_calls(self.cases[case], n, self.syncs.get(case)) * 1e3 / n

    def op_clear(self) -> None:
        self.cases.clear()
        self.syncs.clear()
        gc.collect()


class OursSide(Side):
    """minitorch_peft: the variants of one model, the hand-written reference, the NF4 kernels, one epoch."""

    name = "ours"

    def __init__(self, threads: int | None, backend: str = "numpy", size_policy: bool = DEFAULT_SIZE_POLICY) -> None:
        super().__init__(threads)
        from ..backend import get_backend
        from ..kernels import threads as blas

        if threads is not None:
            import numba
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=threads)  # every pool threadpoolctl knows, for the life of this worker
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        blas.set_threads(threads, size_policy)  # the budget of every matmul (and the size policy, if asked for)
        self.backend = get_backend(backend)

    def op_hello(self) -> dict[str, Any]:
        from ..kernels import threads as blas

        return {**super().op_hello(), "backend": self.backend.name, "blas_policy": blas.policy()}

    def op_model(self, name: str, batch_size: int, seed: int, spec_dir: str | None) -> dict[str, Any]:
        from .runner import prepare_model

        self.op_clear()
        res, cases, syncs = prepare_model(name, batch_size, seed, self.backend, spec_dir)
        self.cases.update(cases)
        self.syncs.update(syncs)
        return res

    def op_quant(self, seed: int) -> dict[str, Any]:
        from .runner import prepare_quant

        self.op_clear()
        res, cases, sync = prepare_quant(seed, self.backend)
        self.cases.update(cases)
        self.syncs.update({k: sync for k in cases})
        return res

    def op_epoch_spec(self, method: str, seed: int, path: str) -> None:
        from .epoch import write_start_weights

        write_start_weights(method, seed, path)

    def op_epoch(self, method: str, batch_size: int, data_dir: str | None) -> float:
        from .epoch import ours_epoch

        return ours_epoch(self.backend.name, method, batch_size, data_dir)

    def op_numba_layer(self) -> str | None:
        import numba

        try:
            return f"{numba.threading_layer()} ({numba.config.NUMBA_NUM_THREADS} threads)"
        except ValueError:  # no parallel kernel ran in this process
            return None


class TorchSide(Side):
    """PyTorch: the same models built from our weights (read from the files the ours worker wrote)."""

    name = "torch"

    def __init__(self, threads: int | None, backend: str = "numpy", size_policy: bool = DEFAULT_SIZE_POLICY) -> None:
        super().__init__(threads)
        from . import torch_ref

        self.torch = torch_ref.import_torch()  # a missing PyTorch is a project error: one line in the parent
        from ..backend import get_backend

        device, self.skipped = torch_ref.torch_device(get_backend(backend).kernels.DEVICE)  # "cpu" or "cuda"
        self.device = device or "cpu"
        if threads is not None:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=threads)  # NumPy's BLAS here too, though PyTorch's own pool does the work
            self.torch.set_num_threads(threads)

    def op_hello(self) -> dict[str, Any]:
        return {**super().op_hello(), "version": self.torch.__version__, "device": self.device,
                "skipped": self.skipped, "threads": int(self.torch.get_num_threads())}

    def op_set_threads(self, n: int) -> int:
        self.torch.set_num_threads(n)
        return int(self.torch.get_num_threads())

    def op_model(self, spec_dir: str, kinds: list[str]) -> list[str]:
        """Build PyTorch's forward and step cases for ``kinds`` from ``spec_dir/{kind}.npz`` and the batch."""
        import numpy as np

        from . import torch_ref

        self.op_clear()
        sync = torch_ref.sync_for(self.device)
        with np.load(os.path.join(spec_dir, "batch.npz"), allow_pickle=False) as f:
            tx, ty = torch_ref.batch(np.array(f["x"]), np.array(f["y"]), self.device)
        for kind in kinds:
            spec = torch_ref.load_spec(os.path.join(spec_dir, f"{'lora' if kind == 'lora_merged' else kind}.npz"))
            fwd_kind = {"lora": "lora_unmerged"}.get(kind, kind)
            model, _ = torch_ref.build_model(spec, kind, self.device)
            self.cases[f"fwd:{fwd_kind}"] = torch_ref.forward_call(model, tx)
            self.syncs[f"fwd:{fwd_kind}"] = sync
            if kind != "lora_merged":
                smodel, sopt = torch_ref.build_model(spec, kind, self.device)
                self.cases[f"step:{kind}"] = torch_ref.step_call(smodel, sopt, tx, ty)
                self.syncs[f"step:{kind}"] = sync
        return sorted(self.cases)

    def op_epoch(self, method: str, spec: str, batch_size: int, seed: int, lr: float, data_dir: str | None) -> float:
        from .epoch import torch_epoch

        return torch_epoch(spec, method, batch_size, seed, lr, data_dir, self.device)


def serve(side: str, threads: int | None, backend: str, size_policy: bool = DEFAULT_SIZE_POLICY) -> int:
    """The worker's main loop: read a request, run it, answer; until "exit" or the end of stdin."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it then ends the workers
    _end_with_parent()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the work prints lands on stderr, never on the protocol stream
    sys.stdout = sys.stderr
    try:
        worker: Side = (OursSide if side == "ours" else TorchSide)(threads, backend, size_policy)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
        proto.write(json.dumps(_error(e)) + "\n")
        return 1
    proto.write(json.dumps({"ok": "ready"}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        if op == "exit":
            break
        try:
            result = getattr(worker, f"op_{op}")(**req)
            reply = {"ok": result}
        except BaseException as e:  # noqa: BLE001 - a KeyboardInterrupt too: the parent gets to know
            reply = _error(e)
        try:
            proto.write(json.dumps(reply, default=_jsonable) + "\n")
        except BrokenPipeError:  # the parent has gone: nobody to answer
            return 0
    return 0


def _end_with_parent() -> None:
    """On Linux, have the kernel end this worker if the parent dies, even in the middle of a long request
    (elsewhere the worker ends when it next reads its closed stdin)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request above took effect
        os._exit(0)


def _error(e: BaseException) -> dict[str, Any]:
    return {"error": str(e), "type": type(e).__name__, "project": isinstance(e, MinitorchPeftError),
            "traceback": traceback.format_exc()}


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


# ------------------------------------------------------------------------------------ in the parent


class Worker:
    """The parent's handle on one worker process: ``call(op, **kwargs)`` sends a request, returns the result.

    A project error in the worker (PyTorch missing, data not found) is raised here as ``WorkerError`` with the
    worker's message; anything else as ``WorkerCrash`` with the worker's traceback.
    """

    def __init__(self, side: str, threads: int | None = None, backend: str = "numpy", size_policy: bool = DEFAULT_SIZE_POLICY) -> None:
        if side not in SIDES:
            raise ValueError(f"unknown side {side!r}")
        self.side = side
        cmd = [sys.executable, "-m", "minitorch_peft.bench.worker", side, str(threads or 0), backend, str(int(size_policy))]
        # the worker finds this package the way the parent did (a checkout run as `python cli.py` included)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        try:
            self._read()  # "ready", or the error that kept the worker from starting
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, op: str, **kwargs: Any) -> Any:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise WorkerCrash(f"the {self.side} worker has exited (status {self.proc.poll()})") from None
        return self._read()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise WorkerCrash(f"the {self.side} worker exited (status {code}) without answering")
        reply = json.loads(line)
        if "error" in reply:
            if reply.get("project"):
                raise WorkerError(reply["error"])
            if reply.get("type") == "KeyboardInterrupt":
                raise KeyboardInterrupt
            raise WorkerCrash(f"the {self.side} worker failed:\n{reply['traceback']}")
        return reply["ok"]

    def close(self) -> None:
        """Ask the worker to exit; end it if it does not within a few seconds."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def remote_block(worker: Worker, case: str, warmup: int) -> Any:
    """A timing block for ``timing.interleaved_blocks``: warm-up once, then each call runs n calls remotely."""
    from .timing import Block

    return Block(run=lambda n: float(worker.call("run", case=case, n=n)),
                 warmup=lambda: worker.call("warmup", case=case, n=warmup), pool=worker.side)


if __name__ == "__main__":
    _side, _threads, _backend, _policy = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    sys.exit(serve(_side, _threads or None, _backend, _policy))
