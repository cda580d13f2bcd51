"""The smoke step of scripts/gpu_check.sh: every GPU piece the project uses, once, smallest first.

Prints one ``ok <piece>: <detail> (<ms>)`` line per piece and stops at the first that fails, with one line
``FAIL smoke: <piece>: <error>`` and exit status 1, so a missing library is named before any test or
kernel compilation spends the GPU's few minutes. The pieces: a CUDA device through CuPy; the cupy
backend's start-up; numba-cuda's NVVM and libdevice; a cuBLAS matmul; a custom CuPy kernel
(ElementwiseKernel and RawKernel: NVRTC plus the CUDA headers); a random draw (cuRAND); a numba.cuda
launch on a CuPy array; a CuPy <-> NumPy round trip. Each library is checked by running it (a version lookup alone would pass where the
library's files are incomplete). Only numpy, cupy, numba and the project are imported.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

import numpy as np

STEPS: list[tuple[str, Callable[[], str]]] = []


def step(piece: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    def register(fn: Callable[[], str]) -> Callable[[], str]:
        STEPS.append((piece, fn))
        return fn

    return register


def cupy() -> Any:
    import cupy as cp

    return cp


@step("CUDA device (CuPy)")
def device() -> str:
    cp = cupy()
    count = cp.cuda.runtime.getDeviceCount()
    if count < 1:
        raise RuntimeError("CuPy sees no CUDA device")
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    rt = cp.cuda.runtime.runtimeGetVersion()
    drv = cp.cuda.runtime.driverGetVersion()
    return (f"{count} device(s), {name}, sm_{props['major']}{props['minor']}, CuPy {cp.__version__}, "
            f"CUDA runtime {rt}, driver {drv}")


@step("cupy backend start-up")
def backend_start() -> str:
    from minitorch_peft import get_backend

    # Before anything imports numba.cuda: the backend sets numba-cuda's array-interface sync here.
    be = get_backend("cupy")
    return f"{be!r}, kernels {be.kernels.__name__}"


@step("NVVM and libdevice (numba-cuda)")
def nvvm() -> str:
    from numba.cuda.cudadrv import nvvm as lib

    version = lib.NVVM().get_version()  # raises when libNVVM cannot be loaded
    lib.LibDevice()  # raises when libdevice.10.bc cannot be found
    return f"NVVM {'.'.join(map(str, version)) if isinstance(version, tuple) else version}, libdevice found"


@step("cuBLAS matmul")
def matmul() -> str:
    cp = cupy()
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((256, 128), np.float32), rng.standard_normal((128, 64), np.float32)
    got = (cp.asarray(a) @ cp.asarray(b)).get()
    np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-4)
    return f"float32 256x128 @ 128x64 matches NumPy{_lib_version('cublas')}"


@step("custom CuPy kernel (NVRTC, CUDA headers)")
def custom_kernel() -> str:
    cp = cupy()
    ew = cp.ElementwiseKernel("T x, T y", "T z", "z = x > (T)0 ? x * y : (T)0", "mtp_smoke_elementwise")
    raw = cp.RawKernel(
        r"""#include <cuda_fp16.h>
        extern "C" __global__ void mtp_smoke_raw(const float* x, float* y, int n) {
            int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) y[i] = __half2float(__float2half(x[i])) + 1.0f;
        }""",
        "mtp_smoke_raw",
    )
    x = cp.arange(-500, 500, dtype=cp.float32)
    z = ew(x, x)
    y = cp.empty_like(x)
    raw((4,), (256,), (x, y, np.int32(x.size)))
    xs = np.arange(-500, 500, dtype=np.float32)
    np.testing.assert_array_equal(z.get(), np.where(xs > 0, xs * xs, 0))
    np.testing.assert_array_equal(y.get(), xs + 1)
    return f"ElementwiseKernel and RawKernel (with cuda_fp16.h) compiled and ran{_lib_version('nvrtc')}"


@step("random draw (cuRAND)")
def random_draw() -> str:
    cp = cupy()
    u = cp.random.RandomState(0).random_sample(100_000, dtype=cp.float32)
    mean = float(u.mean())
    if not (0.49 < mean < 0.51 and float(u.min()) >= 0 and float(u.max()) < 1):
        raise AssertionError(f"uniform draw looks wrong (mean {mean:.4f})")
    return f"100,000 uniforms, mean {mean:.4f}{_lib_version('curand')}"


@step("numba.cuda launch on a CuPy array")
def numba_launch() -> str:
    cp = cupy()
    from numba import cuda

    @cuda.jit
    def add_one(x, n):
        i = cuda.grid(1)
        if i < n:
            x[i] += 1.0

    x = cp.zeros(1000, dtype=cp.float32)
    add_one[4, 256](x, x.size)
    if not bool((x == 1).all()):
        raise AssertionError("the numba.cuda kernel did not write the CuPy array")
    return (f"numba-cuda {_version('numba_cuda', 'numba-cuda')}, array-interface sync: "
            f"NUMBA_CUDA_ARRAY_INTERFACE_SYNC={os.environ.get('NUMBA_CUDA_ARRAY_INTERFACE_SYNC')}, "
            f"in effect {_sync_in_effect()}")


@step("CuPy <-> NumPy round trip")
def round_trip() -> str:
    cp = cupy()
    from minitorch_peft import get_backend

    be = get_backend("cupy")
    host = np.random.default_rng(1).standard_normal((33, 7)).astype(np.float32)
    dev = be.asarray(host)
    if not isinstance(dev, cp.ndarray):
        raise AssertionError(f"backend.asarray gave {type(dev).__name__}, not a CuPy array")
    back = be.to_numpy(dev * 2)
    if not isinstance(back, np.ndarray) or back.tobytes() != (host * 2).tobytes():
        raise AssertionError("values changed on the way to the device and back")
    return "33x7 float32 to the device and back, bit for bit"


def _lib_version(lib: str) -> str:
    """", <lib> <version>" where CuPy tells it (its internal modules differ across releases), else ""."""
    try:
        cp = cupy()
        if lib == "nvrtc":
            return ", NVRTC %d.%d" % cp.cuda.nvrtc.getVersion()
        from cupy_backends.cuda.libs import cublas, curand

        if lib == "cublas":
            return f", cuBLAS {cublas.getVersion(cp.cuda.device.get_cublas_handle())}"
        return f", cuRAND {curand.getVersion()}"
    except Exception:  # noqa: BLE001 - a version is a detail; the step itself already ran the library
        return ""


def _sync_in_effect() -> str:
    """numba-cuda's own reading of the sync setting (its config module moved between releases)."""
    import importlib

    for name in ("numba.cuda.core.config", "numba.core.config"):
        try:
            value = getattr(importlib.import_module(name), "CUDA_ARRAY_INTERFACE_SYNC")
        except Exception:  # noqa: BLE001
            continue
        return f"{value!r} ({name})"
    return "unknown"


def _version(*names: str) -> str:
    from importlib import metadata

    for n in names:
        try:
            return metadata.version(n)
        except metadata.PackageNotFoundError:
            continue
    return "(version unknown)"


def main() -> int:
    for piece, fn in STEPS:
        t0 = time.perf_counter()
        try:
            detail = fn()
        except BaseException as e:  # noqa: BLE001 - any failure is named in one line, then the trace follows
            msg = " ".join(f"{e.__class__.__name__}: {e}".split())[:300]
            print(f"FAIL smoke: {piece}: {msg}", flush=True)
            import traceback

            traceback.print_exc(file=sys.stderr)
            return 1
        print(f"ok {piece}: {detail} ({(time.perf_counter() - t0) * 1e3:.0f} ms)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
