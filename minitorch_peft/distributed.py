"""Data-parallel training over MPI: every rank holds the whole model and trains on its shard of each batch.

Launch ``mpiexec -n N python cli.py train --distributed ...`` (``--distributed`` is implied when the process
was started by ``mpiexec`` with more than one rank). The global batch is ``N x --batch-size`` samples: every
rank draws the same shuffled order (same seed, same data) and takes its own contiguous slice of each global
batch.

The math. Rank r's loss is the mean over its n_r samples, so its gradient is g_r = (1/n_r) sum_(i in r) grad l_i.
The gradient of the whole global batch of G = sum_r n_r samples is

    g = (1/G) sum_i grad l_i = sum_r (n_r / G) g_r,

so each rank scales its gradient by n_r / G (1/N when the shards are equal; the last, partial batch of an
epoch is split as evenly as it goes and weighted by the same rule) and one all-reduce sums them. Every rank
then holds g, applies the same Adam step to the same weights, and the weights stay identical without ever
being sent: 2 ranks with batch b compute what 1 process computes with batch 2b, up to float rounding order.

Only the trainable tensors take part, packed into one contiguous buffer so that a step costs one
``Iallreduce``, not one per tensor: 18,640 float32 (74,560 bytes) for the default LoRA against 535,818
(2,143,272 bytes) for full fine-tuning. Rank 0 evaluates, logs and saves; the others print nothing.

Nothing waits for ever. Every collective is non-blocking and polled, with a time bound (``--dist-timeout``):
when it runs out, the ranks still alive call the roll (a small message to every rank on a separate
communicator), and each prints one line naming the ranks that did not answer, within about twice the
bound; then it ends the whole job with ``MPI_Abort`` (exit status 2), which also takes down a rank that is
frozen rather than dead. A rank that fails on its own (a bad file, a bug) aborts the job the same way once
its line or traceback is out. At start the ranks agree on the configuration, the training data and the
initial weights (compared by hash); a mismatch ends every rank with one line naming it.

``mpi4py`` is imported only when a ``World`` starts, so this module costs nothing without the ``mpi`` extra.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .errors import MinitorchPeftError

EXTRA = "pip install 'minitorch_peft[mpi]'"
DEFAULT_TIMEOUT = 60.0
# What launchers put in each process's environment: MPICH / Intel MPI (Hydra), Open MPI, MVAPICH.
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_ROLL, _BYE = 7001, 7002  # message tags on the control communicator
FAILED_EXIT = 2  # a rank that announced a failure ends the job with the CLI's exit status for errors

Log = Callable[[str], None]


class DistributedError(MinitorchPeftError, RuntimeError):
    """Data-parallel training cannot go on: MPI missing, ranks that disagree, a rank that stopped."""


def launched_size(env: dict[str, str] | None = None) -> int:
    """The world size the launcher (``mpiexec``) announced in the environment; 1 when not launched by one.

    Read without importing mpi4py, so the CLI can tell it is under ``mpiexec`` before MPI starts."""
    env = os.environ if env is None else env
    for name in SIZE_VARS:
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return 1


def launched_rank(env: dict[str, str] | None = None) -> int:
    """This process's rank as the launcher announced it (0 when not launched by one)."""
    env = os.environ if env is None else env
    for name in RANK_VARS:
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return 0


def _wait_until_read(fds: tuple[int, ...], bound: float) -> None:
    """Wait (at most ``bound`` seconds) until the reader of each pipe in ``fds`` has taken everything written.

    The launcher reads a rank's output and its "abort" on different channels, in no fixed order, and on an
    abort it ends the job at once: a line still in the pipe would be lost. An fd that is not a pipe (a file,
    a terminal) holds nothing back. Linux and macOS answer FIONREAD for either end of a pipe."""
    import fcntl
    import stat
    import struct
    import termios

    pipes = []
    for fd in fds:
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                pipes.append(fd)
        except OSError:
            pass
    deadline = time.perf_counter() + bound
    while pipes and time.perf_counter() < deadline:
        try:
            pipes = [fd for fd in pipes
                     if struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0] > 0]
        except OSError:
            return
        time.sleep(1e-3)


# ------------------------------------------------------------------------------------------- the worlds


class Solo:
    """One process, no MPI: the same calls as ``World``, each doing nothing, so the training loop has no branches."""

    rank, size, is_main, shard_weight = 0, 1, True, 1.0

    def shard(self, batches: Iterable[tuple[Any, Any]]) -> Iterable[tuple[Any, Any]]:
        return batches

    def mean(self, value: float) -> float:
        return value

    random_states: list[dict[str, Any]] | None = None  # one process: the run saves the generator's own state

    def prepare(self, optimizer: Any, model: Any, agreement: dict[str, Any], log: Log = print,
                random_states: list[dict[str, Any]] | None = None) -> Any:
        return optimizer

    def share_random_states(self) -> None:
        pass

    def quiet(self, log: Log) -> Log:
        return log

    def finish(self) -> None:
        pass

    def end_job_at_exit(self, code: int) -> None:
        pass


class World:
    """This process among the ranks of an MPI job: ``rank``, ``size``, and the collectives training needs.

    Every collective is non-blocking and waited for with a bound of ``timeout`` seconds (see the module's
    docstring). ``shard_weight`` is the share n_r / G of the current global batch that this rank's shard
    holds; ``shard`` sets it and ``DistributedOptimizer.step`` scales the gradients by it.
    """

    def __init__(self, comm: Any, mpi: Any, timeout: float = DEFAULT_TIMEOUT, transport: str = "auto",
                 log_all_ranks: bool = False) -> None:
        if not timeout > 0:
            raise DistributedError(f"--dist-timeout must be > 0 seconds, got {timeout}")
        self.MPI = mpi
        self.comm_world = comm  # MPI_Abort on this one: MPICH tells the launcher only when the whole world aborts
        self.comm = comm.Dup()  # the training's collectives, apart from anyone else's use of COMM_WORLD
        self.ctrl = comm.Dup()  # the roll call and farewells, never mixed with the collectives
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.is_main = self.rank == 0
        self.timeout, self.transport, self.log_all_ranks = float(timeout), transport, log_all_ranks
        self.shard_weight = 1.0
        self.calls = 0  # collectives started so far (the same count on every rank while in step)
        self.state = "running"  # -> "done" (finalize at exit) or "failed" (farewell to the live ranks, abort)
        self.alive: list[int] = []
        self.peer_failed = False  # the launcher said a rank died (``_hear_failures``)
        self.exit_code = FAILED_EXIT  # the status MPI_Abort ends the job with after a failure
        self.random_states: list[dict[str, Any]] | None = None  # every rank's generator state (``share_random_states``)

    @classmethod
    def start(cls, timeout: float = DEFAULT_TIMEOUT, transport: str = "auto", log_all_ranks: bool = False) -> "World":
        """Start MPI (mpi4py) and join the job; one line naming the extra if mpi4py or MPI is missing."""
        try:
            import mpi4py

            mpi4py.rc.finalize = False  # finalize ourselves, only after a clean run (see _at_exit)
            from mpi4py import MPI
        except ImportError as e:
            raise DistributedError(
                f"--distributed needs mpi4py and an MPI library, which are not installed ({e}): {EXTRA}"
            ) from None
        except RuntimeError as e:  # mpi4py present, but no MPI library it can load
            raise DistributedError(f"--distributed: mpi4py cannot load an MPI library ({e}): {EXTRA}") from None
        world = cls(MPI.COMM_WORLD, MPI, timeout, transport, log_all_ranks)
        atexit.register(world._at_exit)
        world._hear_failures()
        return world

    def _hear_failures(self) -> None:
        """Turn the launcher's "a rank failed" signal into a roll call at the next wait.

        MPICH's Hydra, run as ``mpiexec -disable-auto-cleanup``, usually keeps the job going when a rank dies
        and sends SIGUSR1 to the others. MPICH's own handler (installed by MPI_Init) swallows it, so the
        survivors would learn nothing until their --dist-timeout ran out. Caught here instead, it only sets a
        flag: the wait in progress (or the next one) calls the roll at once, so a surviving rank prints its line
        naming the dead one within the roll call's bound. Hydra does not promise this: its proxy sometimes
        SIGKILLs the survivors anyway (seen about once in seven runs on a busy machine, more often with 3
        ranks). Without that flag Hydra always kills the other ranks with SIGKILL, which no process can catch,
        and prints its own report naming the rank that died.
        """
        import signal

        if not hasattr(signal, "SIGUSR1") or signal.getsignal(signal.SIGUSR1) != signal.SIG_DFL:
            return  # not POSIX, or the user set a Python handler or SIG_IGN (getsignal does not see C handlers)

        def heard(_sig: int, _frame: Any) -> None:
            self.peer_failed = True

        try:
            signal.signal(signal.SIGUSR1, heard)
        except ValueError:  # not the main thread
            pass

    @property
    def library(self) -> str:
        """The MPI library's name and version (its first line), e.g. 'MPICH Version: 5.0.2'."""
        return " ".join(self.MPI.Get_library_version().strip().splitlines()[0].split())

    def quiet(self, log: Log) -> Log:
        """``log`` on rank 0; on the others nothing, unless ``log_all_ranks`` (then each line says its rank)."""
        if self.is_main:
            return log
        if self.log_all_ranks:
            return lambda line: log(f"[rank {self.rank}] {line}")
        return lambda line: None

    # ------------------------------------------------------------------------------ the bounded wait

    def wait(self, request: Any, what: str) -> None:
        """Poll ``request`` until it completes; past the time bound, when another rank calls the roll, when the
        launcher says a rank died, or when MPI reports an error, call the roll and raise ``DistributedError``
        naming the ranks that did not answer."""
        start = time.perf_counter()
        try:
            if request.Test():
                return
            spin_until, pause, next_probe = start + 2e-4, 2e-5, start + 0.01
            while not self.peer_failed:
                now = time.perf_counter()
                if now >= spin_until:  # past a short spin, sleep between polls (the other rank may share this core)
                    time.sleep(pause)
                    pause = min(pause * 2, 1e-3)
                if request.Test():
                    return
                now = time.perf_counter()
                if now - start > self.timeout:
                    break
                if now >= next_probe:
                    next_probe = now + 0.01
                    if self.ctrl.Iprobe(source=self.MPI.ANY_SOURCE, tag=_ROLL):
                        break  # a rank gave up waiting: join its roll call now rather than at our own bound
        except self.MPI.Exception:  # the MPI library saw a peer fail (a broken connection): find out who
            pass
        self._roll_call(what, time.perf_counter() - start)

    def _roll_call(self, what: str, waited: float) -> None:
        """Tell every rank this one is alive and at collective ``self.calls``; hear who else is; raise."""
        mine = np.array([self.rank, self.calls], dtype=np.int64)
        sends = []
        for r in range(self.size):
            if r != self.rank:
                try:
                    sends.append(self.ctrl.Isend(mine, dest=r, tag=_ROLL))
                except self.MPI.Exception:  # that rank's connection is gone: it will not answer
                    pass
        heard = {self.rank: self.calls}
        status, got = self.MPI.Status(), np.empty(2, dtype=np.int64)
        deadline = time.perf_counter() + self.timeout  # a live rank answers within one step (or one evaluation)
        while len(heard) < self.size and time.perf_counter() < deadline:
            try:
                while self.ctrl.Iprobe(source=self.MPI.ANY_SOURCE, tag=_ROLL, status=status):
                    self.ctrl.Recv(got, source=status.Get_source(), tag=_ROLL)
                    heard[int(got[0])] = int(got[1])
            except self.MPI.Exception:
                pass
            time.sleep(1e-3)
        del sends  # small messages: sent eagerly; a dead peer never receives, and that is fine
        self.state, self.alive = "failed", sorted(r for r in heard if r != self.rank)
        stopped = [r for r in range(self.size) if r not in heard]
        if stopped:
            who = f"rank {stopped[0]}" if len(stopped) == 1 else f"ranks {', '.join(map(str, stopped))}"
            why = ("the launcher reported a rank failed" if self.peer_failed else
                   f"rank {self.rank} waited {waited:.0f} s for {what} (--dist-timeout {self.timeout:g})")
            raise DistributedError(
                f"{who} of {self.size} stopped: {why} and {'it' if len(stopped) == 1 else 'they'} did not answer "
                f"the roll call of rank {self.rank}; ending every rank"
            )
        places = ", ".join(f"rank {r} at #{c}" for r, c in sorted(heard.items()))
        raise DistributedError(f"the ranks are out of step (collectives: {places}) while rank {self.rank} waited for {what}")

    def _at_exit(self) -> None:
        """After a clean run: finalize MPI. After a failure this rank announced: tell the live ranks it has
        printed its line, wait (bounded) for theirs, then end the whole job with ``MPI_Abort``. After anything
        else: exit at once, no finalize (the launcher ends the other ranks).

        Why abort rather than exit: a peer that hangs (frozen, stuck in a collective) never exits, so the job
        ends only when the launcher kills it. On a plain non-zero exit MPICH's Hydra kills the others only if
        it sees the rank's PMI connection close before it reaps the process; in the other order (about one run
        in six here, seen in CI) it takes the exit for a normal one and ``mpiexec`` waits for the frozen rank
        for ever. ``MPI_Abort`` on COMM_WORLD sends the launcher an explicit "abort" (on a duplicate
        communicator MPICH just exits). The launcher may act on it before it has read this rank's last line,
        so the abort waits until the output pipes are read, then silences MPICH's own "application called
        MPI_Abort" line, which would only repeat ours."""
        if self.state == "done":
            self.MPI.Finalize()
            return
        if self.state != "failed":
            return
        sys.stdout.flush(), sys.stderr.flush()
        if self.alive:
            token = np.array([self.rank], dtype=np.int64)
            sends = [self.ctrl.Isend(token, dest=r, tag=_BYE) for r in self.alive]
            got, pending = np.empty(1, dtype=np.int64), set(self.alive)
            deadline = time.perf_counter() + min(self.timeout, 5.0)
            while pending and time.perf_counter() < deadline:
                for r in list(pending):
                    if self.ctrl.Iprobe(source=r, tag=_BYE):
                        self.ctrl.Recv(got, source=r, tag=_BYE)
                        pending.discard(r)
                time.sleep(1e-3)
            del sends
        _wait_until_read((1, 2), min(self.timeout, 5.0))
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1), os.dup2(null, 2)
        self.comm_world.Abort(self.exit_code)

    def end_job_at_exit(self, code: int) -> None:
        """This rank is leaving with an error of its own (a bad file, a bug) that the others may not share:
        at exit, end the whole job with ``MPI_Abort(code)`` rather than leave them to find out at their time
        bound (Hydra's own clean-up after a plain exit is not certain, see ``_at_exit``)."""
        if self.state == "running":
            self.state, self.alive = "failed", []
        self.exit_code = code

    # ------------------------------------------------------------------------------ collectives

    def allreduce(self, reducer: Any, what: str) -> None:
        """Sum ``reducer``'s buffer across the ranks (one all-reduce), in place, with the bounded wait."""
        self.calls += 1
        self.wait(reducer.start(), what)

    def mean(self, value: float) -> float:
        """The mean of a host number over the ranks."""
        self.calls += 1
        buf = np.array([value], dtype=np.float64)
        self.wait(self.comm.Iallreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM), "the mean of the epoch's loss")
        return float(buf[0]) / self.size

    def allgather_bytes(self, payload: bytes, what: str) -> list[bytes]:
        """Every rank's ``payload``, in rank order."""
        self.calls += 1
        counts = np.zeros(self.size, dtype=np.int64)
        self.wait(self.comm.Iallgather(np.array([len(payload)], dtype=np.int64), counts), what)
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        out = np.zeros(int(counts.sum()), dtype=np.uint8)
        mine = np.frombuffer(payload, dtype=np.uint8) if payload else np.zeros(0, dtype=np.uint8)
        self.calls += 1
        self.wait(self.comm.Iallgatherv(mine, [out, (counts, displs), self.MPI.BYTE]), what)
        return [out[d:d + c].tobytes() for d, c in zip(displs, counts)]

    def barrier(self, what: str) -> None:
        """Wait (bounded) until every rank gets here."""
        self.calls += 1
        self.wait(self.comm.Ibarrier(), what)

    def finish(self) -> None:
        """The run ended well on this rank: wait (bounded) for every rank to get here, then MPI may finalize."""
        self.barrier("the other ranks to finish")
        self.state = "done"

    # ------------------------------------------------------------------------------ training

    def shard(self, batches: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """This rank's contiguous slice of each global batch; sets ``shard_weight`` = n_r / G for it.

        A global batch of G samples gives rank r ``G // N`` samples, plus one for the first ``G % N``
        ranks. A rank left with no sample (G < N, only in an epoch's last batch) computes on one sample
        with weight 0, so it still joins the step's all-reduce and adds nothing to the sum.
        """
        for xb, yb in batches:
            g = int(yb.shape[0])
            base, extra = divmod(g, self.size)
            start = self.rank * base + min(self.rank, extra)
            n = base + (1 if self.rank < extra else 0)
            if n == 0:
                self.shard_weight = 0.0
                yield _rows(xb, 0, 1), _rows(yb, 0, 1)
            else:
                self.shard_weight = n / g
                yield _rows(xb, start, start + n), _rows(yb, start, start + n)

    def prepare(self, optimizer: Any, model: Any, agreement: dict[str, Any], log: Log = print,
                random_states: list[dict[str, Any]] | None = None) -> "DistributedOptimizer":
        """Check that every rank starts from the same place, then wrap ``optimizer`` to average gradients.

        ``random_states``: a resumed run's saved generator state of every rank (``share_random_states``), so
        that each rank's dropout masks go on where they stopped; without them (a new run, or a run saved with
        another number of ranks) each rank gets its stream from the seed."""
        self.agree({**agreement, "weights": weights_digest(model), "world": {"timeout": self.timeout,
                                                                              "transport": self.transport}})
        wrapped = DistributedOptimizer(optimizer, self, self.transport)
        if random_states is not None and len(random_states) == self.size:
            from .random import generator

            generator().bit_generator.state = random_states[self.rank]
        else:
            self.seed_dropout(agreement.get("config", {}).get("seed", 0))
        log(f"\n🌐 Data parallel: {self.size} rank{'s' if self.size > 1 else ''} ({self.library}); all-reduce over {wrapped.transport}: "
            f"{wrapped.buffer.size:,} {np.dtype(wrapped.buffer.dtype).name} = {wrapped.nbytes:,} bytes per step, "
            f"one call; bounded wait {self.timeout:g} s")
        return wrapped

    def agree(self, mine: dict[str, Any]) -> None:
        """Gather every rank's ``mine`` (JSON-able) and compare with rank 0's; a mismatch ends every rank."""
        payload = json.dumps(mine, sort_keys=True, default=str).encode()
        records = [json.loads(b) for b in self.allgather_bytes(payload, "the start-up agreement")]
        problem = disagreement(records)
        if problem is not None:
            self.state, self.alive = "failed", [r for r in range(self.size) if r != self.rank]
            raise DistributedError(problem)

    def share_random_states(self) -> None:
        """Gather every rank's generator state (dropout masks) into ``random_states``, so that a save made by
        rank 0 holds them all and a resumed run continues each rank's stream (``prepare``)."""
        from .random import generator

        payload = json.dumps(generator().bit_generator.state).encode()
        self.random_states = [json.loads(b) for b in self.allgather_bytes(payload, "the random states")]

    def seed_dropout(self, seed: int) -> None:
        """Give each rank other than 0 its own random stream (dropout masks), once the weights are built:
        the same masks on every shard would correlate the ranks. Rank 0 keeps the single-process stream."""
        if self.rank:
            from . import random

            random._generator = np.random.default_rng([int(seed), self.rank])


def _rows(a: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of a tensor or an array, as the same kind."""
    from .tensor import Tensor

    if isinstance(a, Tensor):
        return Tensor._make(a.data[start:stop], a.backend, False)
    return a[start:stop]


# ------------------------------------------------------------------------------------------- agreement


def digest(*arrays: Any) -> str:
    """SHA-256 over the arrays' dtypes, shapes and bytes (host copies for device arrays)."""
    from .backend import backend_of

    h = hashlib.sha256()
    for a in arrays:
        host = np.ascontiguousarray(backend_of(a).to_numpy(a))
        h.update(f"{host.dtype.str}{host.shape}".encode())
        h.update(host.data)
    return h.hexdigest()[:16]


def weights_digest(model: Any) -> dict[str, str]:
    """A hash of every parameter and buffer (4-bit storage included), and of which of them train."""
    state = model.state_dict()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return {"all": digest(*state.values()) + ":" + ",".join(state), "trainable": ",".join(trainable)}


_WHAT = {
    "config": "the configuration",
    "data": "the training data (check --dataset, --limit and the data files on every host)",
    "weights": "the initial weights (check --model-dir and --seed on every host)",
    "versions": "the software versions (numpy's shuffling differs between versions)",
    "world": "the distributed settings",
}


def disagreement(records: list[dict[str, Any]]) -> str | None:
    """The first way a rank's start differs from rank 0's, as one line; None when they all agree."""
    first = records[0]
    for rank, rec in enumerate(records[1:], start=1):
        for key in sorted(set(first) | set(rec)):
            mine, theirs = first.get(key), rec.get(key)
            if mine == theirs:
                continue
            detail = ""
            if isinstance(mine, dict) and isinstance(theirs, dict):
                diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
                if diff:
                    k = diff[0]
                    flag = f"--{k.replace('_', '-')}" if key == "config" else k
                    detail = f": {flag} is {mine.get(k)!r} on rank 0 but {theirs.get(k)!r} on rank {rank}"
            return f"the ranks disagree on {_WHAT.get(key, key)}{detail or f' (rank {rank} differs from rank 0)'}"
    return None


def agreement_record(cfg: dict[str, Any], data: Any) -> dict[str, Any]:
    """What every rank must share before training: the settings (paths excluded: they may differ per host,
    and only rank 0 writes), the training data, and the versions that shape the shuffle and the math."""
    from . import __version__

    config = {k: v for k, v in cfg.items() if k not in ("output", "data_dir")}
    return {"config": config, "data": digest(data.x_train, data.y_train),
            "versions": {"minitorch_peft": __version__, "numpy": np.__version__}}


# ------------------------------------------------------------------------------------------- the optimizer


class DistributedOptimizer:
    """Wraps an optimizer: ``step()`` averages the trainable gradients over the ranks, then steps.

    The gradients are packed into one preallocated flat buffer (each scaled by this rank's share of the
    global batch), summed across the ranks by one all-reduce, and handed back to the tensors as views of
    that buffer (no copy); the wrapped optimizer then updates every rank's weights identically.
    ``zero_grad`` and everything else are the wrapped optimizer's.
    """

    def __init__(self, optimizer: Any, world: World, transport: str = "auto") -> None:
        self.optimizer, self.world = optimizer, world
        seen: set[int] = set()
        params = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        if not params:
            raise DistributedError("nothing trains: the optimizer holds no tensor that requires grad")
        dtypes = {np.dtype(p.data.dtype) for p in params}
        if len(dtypes) != 1:
            raise DistributedError(f"the trainable tensors mix dtypes ({', '.join(sorted(d.name for d in dtypes))}); "
                                   "one all-reduce buffer needs one")
        backend = params[0].backend
        self.xp = backend.xp
        self.buffer = self.xp.zeros(sum(p.size for p in params), dtype=dtypes.pop())
        self.slices, offset = [], 0
        for p in params:
            self.slices.append((p, offset, offset + p.size))
            offset += p.size
        kernels = backend.kernels
        chosen = kernels.ALLREDUCE_TRANSPORTS[0] if transport == "auto" else transport
        if chosen not in kernels.ALLREDUCE_TRANSPORTS:
            raise DistributedError(f"--dist-transport {transport} is not available on backend {backend.name!r}; "
                                   f"use one of: auto, {', '.join(kernels.ALLREDUCE_TRANSPORTS)}")
        try:
            self.reducer = kernels.make_allreduce(chosen, world.comm, self.buffer)
        except ValueError as e:
            raise DistributedError(f"--dist-transport {chosen}: {e}") from None
        self.transport = chosen
        self.steps, self.comm_seconds = 0, 0.0

    @property
    def nbytes(self) -> int:
        """Bytes all-reduced per step: the live buffer's size."""
        return int(self.buffer.nbytes)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        buf, weight, xp = self.buffer, self.world.shard_weight, self.xp
        for p, a, b in self.slices:
            if p.grad is None:  # a tensor this rank's graph did not reach adds nothing
                buf[a:b] = 0
            else:
                xp.multiply(xp.reshape(p.grad, (-1,)), weight, out=buf[a:b])
        self.steps += 1
        t0 = time.perf_counter()
        self.world.allreduce(self.reducer, f"the gradients of step {self.steps}")
        self.comm_seconds += time.perf_counter() - t0
        for p, a, b in self.slices:
            p.grad = xp.reshape(buf[a:b], p.shape)  # a view: the wrapped step reads the summed gradient in place
        self.optimizer.step()

    def __getattr__(self, name: str) -> Any:  # param_groups, state, state_nbytes, ...: the wrapped optimizer's
        return getattr(self.optimizer, name)


# ------------------------------------------------------------------------------------------- launching


def find_mpiexec() -> str | None:
    """``mpiexec`` beside this Python (the ``mpich`` wheel installs it there), else on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def mpiexec_command(n: int, mpiexec: str | None = None, extra: list[str] | None = None) -> list[str]:
    """``mpiexec -n N`` with the flags this machine's launcher needs (Open MPI refuses root without one)."""
    mpiexec = mpiexec or find_mpiexec()
    if mpiexec is None:
        raise DistributedError(f"mpiexec not found (beside {sys.executable} or on PATH): {EXTRA}")
    cmd = [mpiexec]
    if hasattr(os, "geteuid") and os.geteuid() == 0 and _is_open_mpi(mpiexec):
        cmd.append("--allow-run-as-root")
    return cmd + (extra or []) + ["-n", str(n)]


def _is_open_mpi(mpiexec: str) -> bool:
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout + out.stderr


def start_world(distributed: bool, timeout: float = DEFAULT_TIMEOUT, transport: str = "auto",
                log_all_ranks: bool = False) -> Solo | World:
    """``World.start`` when asked (``--distributed``) or launched with more than one rank; else ``Solo``."""
    if distributed or launched_size() > 1:
        return World.start(timeout, transport, log_all_ranks)
    return Solo()
