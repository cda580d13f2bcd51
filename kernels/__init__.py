"""Compute kernels behind the backend seam: CPU (NumPy/Numba, ``cpu.py``) and GPU (CuPy/numba.cuda, ``gpu.py``).

A kernel module holds only what truly differs per device: the BLAS/cuBLAS calls of a linear layer, fused
element-wise loops (loss, optimizer updates), random masks, row reductions and the 4-bit codes. Gradient
math is not here: the engine's ops (``minitorch_peft.ops``) and the fused adapter ops
(``minitorch_peft.peft.fused``) are written once over the array module ``xp`` and call these few
functions. ``Kernels`` below is the whole contract, in one place; ``tests/test_kernel_contract.py`` checks
every backend's module against it (``gpu.py`` from its source, so without CuPy).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Protocol


class Kernels(Protocol):
    """What a backend's kernel module provides (module-level names; ``self`` stands for the module)."""

    xp: ModuleType  # the array module the kernels take and return arrays of
    DEVICE: str  # where the arrays live, in PyTorch's device names: "cpu" or "cuda"
    PEAK_METHOD: str  # how peak_bytes measures, as the benchmark reports it
    ALLREDUCE_TRANSPORTS: tuple[str, ...]  # the all-reduce transports make_allreduce offers, preferred first

    # ---- linear layers: the big matmuls
    def linear_forward(self, x: Any, w: Any, b: Any | None, out: Any | None = None) -> Any:
        """y = x W^T + b, for x (..., in), W (out, in), b (out,) or None; into ``out`` if given (C-contiguous)."""

    def linear_backward(self, g: Any, x: Any, w: Any, need_x: bool, need_w: bool,
                        need_b: bool) -> tuple[Any | None, Any | None, Any | None]:
        """(dx, dW, db) = (g W, g^T x, sum_batch g), each only if needed (x unused without dW, W without dx)."""

    # ---- row reductions (DoRA's norm and magnitude gradient)
    def row_sumsq(self, w: Any) -> Any:
        """||w_i||^2 per row of a 2-D array, in one pass."""

    def rowdot(self, p: Any, q: Any, axis: int) -> Any:
        """sum(p * q, axis) of two 2-D arrays, without the (p * q) temporary."""

    # ---- activations and the loss
    def relu_forward(self, x: Any) -> Any:
        """max(x, 0)."""

    def relu_backward(self, g: Any, y: Any) -> Any:
        """g * [y > 0]."""

    def cross_entropy_forward(self, logits: Any, labels: Any) -> tuple[Any, Any]:
        """(mean cross-entropy as a 0-d array, softmax(logits)); no wait for a device."""

    def cross_entropy_backward(self, g: Any, probs: Any, labels: Any) -> Any:
        """g * (softmax - onehot(labels)) / N."""

    # ---- indexing, randomness, host copies
    def index_add(self, target: Any, index: object, values: Any) -> Any:
        """target[index] += values, accumulating repeated indices."""

    def dropout_mask(self, shape: tuple[int, ...], p: float, dtype: Any, rng: Any) -> Any:
        """Bernoulli(1 - p) / (1 - p) of ``shape``, drawn following the host generator ``rng``."""

    def to_numpy(self, a: Any) -> Any:
        """A host (NumPy) array with a's values."""

    # ---- optimizer updates, in place
    def adam_step(self, p: Any, g: Any, m: Any, v: Any, *, lr: float, beta1: float, beta2: float, eps: float,
                  step: int, weight_decay: float = 0.0, decoupled: bool = True) -> None:
        """Adam / AdamW update of p, m, v in place."""

    def sgd_step(self, p: Any, g: Any, buf: Any | None, *, lr: float, momentum: float, weight_decay: float,
                 first: bool) -> None:
        """SGD (with momentum buffer ``buf``) update of p in place."""

    # ---- 4-bit weights (NF4 / FP4 codes, bit-identical across devices)
    def quantize_4bit(self, x: Any, quant_type: str = "nf4", block_size: int = 64,
                      double_quant: bool = False) -> tuple[Any, Any]:
        """(packed codes, QuantState) of a float array."""

    def dequantize_4bit(self, packed: Any, state: Any, out: Any | None = None, validate: bool = True,
                        serial: bool = False, rows: tuple[int, int] | None = None) -> Any:
        """code[q] * absmax_block as float32 (into ``out`` if given; ``serial``: one CPU thread; ``rows=(r0, r1)``:
        only those rows of a 2-D state, r0 * in on a block boundary)."""

    def dequantize_absmax(self, state: Any) -> Any:
        """The per-block absmax of a QuantState as float32."""

    # ---- data-parallel training (minitorch_peft.distributed)
    def make_allreduce(self, transport: str, comm: Any, buffer: Any) -> Any:
        """The gradient all-reduce over ``buffer`` through ``transport`` (one of ALLREDUCE_TRANSPORTS)."""

    # ---- measuring (the benchmark)
    def synchronize(self) -> None:
        """Wait until queued device work is done (nothing on the CPU)."""

    def peak_bytes(self, call: Callable[[], Any]) -> int:
        """Peak bytes allocated while ``call`` runs, above what was live before it."""

    def device_info(self) -> dict[str, str]:
        """Facts about the device for the benchmark's header (empty on the CPU)."""


def contract() -> dict[str, list[str] | None]:
    """name -> argument names (after ``self``) of each function of the contract; None for a data attribute."""
    import inspect

    out: dict[str, list[str] | None] = {name: None for name in Kernels.__annotations__}
    for name, fn in vars(Kernels).items():
        if callable(fn) and not name.startswith("_"):
            out[name] = list(inspect.signature(fn).parameters)[1:]
    return out
