"""The gradient all-reduce on host arrays: one non-blocking MPI ``Iallreduce`` (sum, in place) over one buffer.

This is the CPU half of the all-reduce seam; ``gpu_collective`` is the device half (NCCL, a CUDA-aware MPI,
or a staged copy through the host). A transport is a small object built once per training run around the
flat gradient buffer: ``start()`` begins summing that buffer across the ranks and returns a request whose
``Test()`` says, without blocking, whether the sum has landed in the buffer. The waiting (and its time bound)
belongs to ``minitorch_peft.distributed``, which polls ``Test()``, so no transport can block for ever.
"""

from __future__ import annotations

from typing import Any

ALLREDUCE_TRANSPORTS = ("mpi",)  # the first is the default


class MpiAllreduce:
    """``Iallreduce(IN_PLACE, buffer, SUM)`` on a host (NumPy) buffer."""

    name = "mpi"

    def __init__(self, comm: Any, buffer: Any) -> None:
        from mpi4py import MPI  # only reached under --distributed, after mpi4py imported fine

        self.comm, self.buffer, self._in_place, self._sum = comm, buffer, MPI.IN_PLACE, MPI.SUM

    def start(self) -> Any:
        return self.comm.Iallreduce(self._in_place, self.buffer, op=self._sum)


def make_allreduce(transport: str, comm: Any, buffer: Any) -> MpiAllreduce:
    """The transport named ``transport`` (one of ``ALLREDUCE_TRANSPORTS``) over ``buffer``."""
    if transport != "mpi":
        raise ValueError(f"all-reduce transport {transport!r} is not available on the CPU; use: {', '.join(ALLREDUCE_TRANSPORTS)}")
    return MpiAllreduce(comm, buffer)
