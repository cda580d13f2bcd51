"""What the numbers were measured on: CPU, BLAS, thread counts, library versions, machine load."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from ..backend import Backend

_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


def blas_threads() -> tuple[int, str]:
    """How many threads NumPy's BLAS uses, and how that was found out.

    threadpoolctl asks the loaded BLAS library itself; without it, a thread-count environment variable
    is what OpenBLAS/MKL obey; failing both, they use every CPU this process may run on.
    """
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        pass
    else:
        import numpy  # noqa: F401  (load NumPy's BLAS before asking)

        counts = [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"]
        if counts:
            return max(counts), "threadpoolctl"
    for var in _THREAD_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value), f"${var}"
    return cpu_count(), "CPU count (threadpoolctl not installed)"


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def blas_info() -> dict[str, Any]:
    """NumPy's BLAS: name, version and build configuration as NumPy reports them."""
    import numpy as np

    try:
        config = np.show_config(mode="dicts")  # NumPy >= 1.26
        blas = config.get("Build Dependencies", {}).get("blas", {})
        info = {k: blas.get(k) for k in ("name", "version", "openblas configuration") if blas.get(k)}
        simd = config.get("SIMD Extensions", {}).get("found")
        if simd:
            info["simd"] = simd
        return info
    except Exception:  # older NumPy prints instead of returning; the name is still worth having
        return {"name": "unknown"}


def environment(backend: Backend, threads: int, threads_source: str) -> dict[str, Any]:
    import numba
    import numpy as np

    env: dict[str, Any] = {
        "backend": backend.name,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "numba": numba.__version__,
        "blas": blas_info(),
        "threads": threads,
        "threads_source": threads_source,
        "cpu": cpu_model(),
        "cpu_count": cpu_count(),
        "platform": platform.platform(),
        "load_average_start": load_average(),
    }
    env.update(backend.kernels.device_info())  # the GPU's name and CuPy's version on a GPU backend
    return env
