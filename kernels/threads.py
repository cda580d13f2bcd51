"""BLAS threads: the budget of every matmul (``--threads``), and an optional size policy.

Waking a BLAS worker thread, splitting the product and joining costs tens of microseconds, so a product
too small to pay for a second thread could run on one: with the size policy on, each matmul of
``cpu.linear_forward`` / ``linear_backward`` asks ``for_gemm(m, n, k)`` first, and below ``SMALL_GEMM``
multiply-adds it runs single-threaded. The policy is **off by default**, because measuring it said so
(``python -m minitorch_peft.bench.thread_table --rounds 15 --steps 50 --epoch``, 2 CPUs, quiet, two runs;
each cell over the policy column, lower is faster):

    setting                         medium full  medium LoRA  small full  small LoRA  epoch full  epoch LoRA
    1 thread                        0.75 / 0.90  1.38 / 1.65  0.85 / 1.28 0.96 / 1.14 1.25 / 1.31 1.21 / 1.26
    2 threads, every matmul         0.60 / 0.58  1.00 / 0.94  0.84 / 0.98 0.92 / 0.90 0.96 / 0.97 0.98 / 1.00
    2 threads, small on 1 (policy)  1.00         1.00         1.00        1.00        1.00        1.00

Changing OpenBLAS's thread count between calls cost more than running the small products on one thread
saved (the medium full step: 53-61 ms with the policy, 31-33 ms without). So by default every product gets
the budget and BLAS decides; ``set_threads(n, size_policy=True)`` (and the thread table) keep the alternative
measurable. On a busy machine the picture turns: with one competing process (``--load 1``) one thread was
3-17x faster than two (an epoch of LoRA 3.7 s against 62 s), as the split waits for a worker thread that has
lost its core; that is what ``--threads 1`` is for (and ``bench --load K`` gives both sides the CPUs its
load leaves). The default does not switch by itself, because the thread count changes BLAS's rounding and so
a run's bytes.

This is the only module besides ``cpu`` that knows a BLAS library is there. Without threadpoolctl every
function here does nothing and BLAS keeps its own choice.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

# m*n*k below which one thread is used (for the products of linear_forward / linear_backward: the adapters'
# thin products are plain ``@`` and never ask). OpenBLAS itself splits a product from 262,144 multiply-adds;
# the 10-way head (at most ~655k multiply-adds for the medium model at batch 64) sits below this, the
# 784 x 512 layers and larger above it.
SMALL_GEMM = 1 << 22
# The budget of a product when nobody sets one: None is what the BLAS library starts with (every CPU, or
# $OPENBLAS_NUM_THREADS). `python -m minitorch_peft.bench.thread_table` measures the alternatives.
DEFAULT_THREADS: int | None = None
# Whether small products run on one thread when nobody says: off, as measured (the table above).
DEFAULT_SIZE_POLICY = False


class _Policy:
    def __init__(self) -> None:
        self.libs: list[Any] | None = None  # threadpoolctl controllers of the loaded BLAS libraries
        self.budget: int | None = None  # threads for a large product; None: what BLAS started with
        self.current: int | None = None  # what the libraries are set to now (None: unknown)
        self.size_policy = DEFAULT_SIZE_POLICY

    def controllers(self) -> list[Any]:
        if self.libs is None:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:
                self.libs = []
            else:
                import numpy  # noqa: F401  (its BLAS must be loaded to be found)

                self.libs = list(ThreadpoolController().select(user_api="blas").lib_controllers)
            if self.budget is None:
                self.budget = DEFAULT_THREADS or max((int(c.num_threads) for c in self.libs), default=None)
            self.current = self.budget
        return self.libs

    def set(self, n: int) -> None:
        if n != self.current:
            for c in self.libs or ():
                c.set_num_threads(n)
            self.current = n


_policy = _Policy()


def for_gemm(m: int, n: int, k: int) -> None:
    """Set the BLAS thread count for an (m x k) @ (k x n) product: 1 if it is small, else the budget."""
    p = _policy
    if not p.size_policy or not p.controllers() or p.budget is None:
        return
    p.set(1 if m * n * k < SMALL_GEMM else p.budget)


def set_threads(n: int | None, size_policy: bool = DEFAULT_SIZE_POLICY) -> None:
    """The thread budget of a product (None: what BLAS started with); ``size_policy`` True runs a product
    below ``SMALL_GEMM`` multiply-adds on one thread, False gives every product the budget (as BLAS alone)."""
    p = _policy
    libs = p.controllers()
    if n is None:
        n = max((int(c.num_threads) for c in libs), default=None) if p.budget is None else p.budget
    p.budget = n
    p.size_policy = size_policy
    if n is not None:
        p.current = None
        p.set(n)


def policy() -> dict[str, Any]:
    """The policy in force, for reports: budget, the small-product threshold, and whether it applies."""
    p = _policy
    p.controllers()
    return {"threads": p.budget, "small_gemm": SMALL_GEMM if p.size_policy else None,
            "libraries": [c.internal_api for c in p.libs or ()]}


@contextlib.contextmanager
def limit(n: int | None) -> Iterator[None]:
    """Within the block, large products get ``n`` threads (None: leave everything as it is); every other
    thread pool threadpoolctl knows (OpenMP, Numba's) is limited to ``n`` too. Restored on exit."""
    if n is None:
        yield
        return
    p = _policy
    p.controllers()
    saved = (p.budget, p.size_policy)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        cm: Any = contextlib.nullcontext()
    else:
        cm = threadpool_limits(limits=n)
    with cm:
        p.current = None  # threadpool_limits changed the libraries behind our back
        set_threads(n, saved[1])
        try:
            yield
        finally:
            p.budget, p.size_policy = saved
            p.current = None
    p.current = None
