"""The gradient all-reduce on device (CuPy) buffers, through one of three transports, chosen explicitly:

- ``nccl``: NVIDIA's collective library through ``cupy.cuda.nccl``; the sum runs on the GPU's stream and
  (over NVLink / InfiniBand) never touches the host. The NCCL communicator is set up once over MPI
  (rank 0 makes the unique id, MPI broadcasts it). The default.
- ``cuda-aware-mpi``: the device buffer handed straight to MPI (``mpi4py`` reads ``__cuda_array_interface__``);
  needs an MPI library built CUDA-aware (the ``mpich`` wheel from PyPI is not).
- ``host``: copy the buffer to the host, ``Iallreduce`` there, copy back; works with any MPI, at the cost of
  two PCIe copies per step.

Each returns, from ``start()``, a request whose ``Test()`` never blocks (see ``collective``). Unverified on
this project's CI machines, which have no GPU: the CPU path is what the tests run.
"""

from __future__ import annotations

from typing import Any

import cupy
import numpy as np

from .collective import MpiAllreduce

ALLREDUCE_TRANSPORTS = ("nccl", "cuda-aware-mpi", "host")  # the first is the default


class _EventRequest:
    """Completion of work queued on a CUDA stream, polled without blocking."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def Test(self) -> bool:  # noqa: N802  (the MPI request's spelling)
        return bool(self.event.done)


class NcclAllreduce:
    name = "nccl"

    def __init__(self, comm: Any, buffer: Any) -> None:
        from cupy.cuda import nccl

        if not nccl.available:
            raise ValueError("this CuPy was built without NCCL; pick --dist-transport host or cuda-aware-mpi")
        types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                 np.dtype(np.float16): nccl.NCCL_FLOAT16}
        if np.dtype(buffer.dtype) not in types:
            raise ValueError(f"NCCL cannot all-reduce {buffer.dtype}")
        uid = nccl.get_unique_id() if comm.Get_rank() == 0 else None
        uid = comm.bcast(uid, root=0)
        self.nccl = nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())
        self.buffer, self.dtype, self.op = buffer, types[np.dtype(buffer.dtype)], nccl.NCCL_SUM

    def start(self) -> _EventRequest:
        stream = cupy.cuda.get_current_stream()
        ptr = self.buffer.data.ptr
        self.nccl.allReduce(ptr, ptr, self.buffer.size, self.dtype, self.op, stream.ptr)
        return _EventRequest(stream.record())


class CudaAwareMpiAllreduce(MpiAllreduce):
    name = "cuda-aware-mpi"

    def start(self) -> Any:
        cupy.cuda.get_current_stream().synchronize()  # the gradients are written by kernels still queued
        return super().start()


class _HostRequest:
    def __init__(self, request: Any, host: np.ndarray, device: Any) -> None:
        self.request, self.host, self.device = request, host, device

    def Test(self) -> bool:  # noqa: N802
        if not self.request.Test():
            return False
        self.device.set(self.host)
        return True


class HostStagedAllreduce:
    name = "host"

    def __init__(self, comm: Any, buffer: Any) -> None:
        self.buffer = buffer
        self.host = cupyx_pinned_empty(buffer.shape, buffer.dtype)
        self.mpi = MpiAllreduce(comm, self.host)

    def start(self) -> _HostRequest:
        self.buffer.get(out=self.host)  # synchronizes the stream
        return _HostRequest(self.mpi.start(), self.host, self.buffer)


def cupyx_pinned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A host array in page-locked memory (faster device <-> host copies)."""
    import cupyx

    return cupyx.empty_pinned(shape, dtype=dtype)


def make_allreduce(transport: str, comm: Any, buffer: Any) -> Any:
    kinds = {"nccl": NcclAllreduce, "cuda-aware-mpi": CudaAwareMpiAllreduce, "host": HostStagedAllreduce}
    if transport not in kinds:
        raise ValueError(f"all-reduce transport {transport!r} is not available on the GPU; use: {', '.join(ALLREDUCE_TRANSPORTS)}")
    return kinds[transport](comm, buffer)
