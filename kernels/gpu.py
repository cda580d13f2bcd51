"""GPU kernels: cuBLAS (through CuPy) for the matmuls, fused CUDA kernels for the element-wise work.

Mirrors ``kernels.cpu`` name for name, with the same arguments, results and math (results agree to
float rounding; the 4-bit codes agree bit for bit). Only ``minitorch_peft.backend`` imports this
module, and only after ``import cupy`` worked and a GPU was found.

Nothing here waits for the GPU: no ``float()``, ``.item()`` or host copy inside a training step. The
loss stays a 0-d device array, dropout draws its random numbers on the device, and the optimizer
updates are one fused kernel per tensor. Custom kernels are compiled on first use (and cached by
CuPy on disk), so importing this module costs nothing.
"""

from __future__ import annotations

from typing import Any, Callable

import cupy
import numpy as np

xp = cupy
DEVICE = "cuda"  # where this module's arrays live, in PyTorch's device names

_kernels: dict[Any, Any] = {}  # compiled-once kernels, keyed by name (and dtypes for raw kernels)


def _elementwise(name: str, in_params: str, out_params: str, body: str) -> Any:
    """A cupy.ElementwiseKernel, built the first time it is asked for."""
    kernel = _kernels.get(name)
    if kernel is None:
        kernel = _kernels[name] = cupy.ElementwiseKernel(in_params, out_params, body, name)
    return kernel


def _reduction(name: str, in_params: str, out_params: str, map_expr: str, reduce_expr: str, post: str) -> Any:
    """A cupy.ReductionKernel (sum of ``map_expr``), built the first time it is asked for."""
    kernel = _kernels.get(name)
    if kernel is None:
        kernel = _kernels[name] = cupy.ReductionKernel(in_params, out_params, map_expr, reduce_expr, post, "0", name)
    return kernel


# --------------------------------------------------------------------------------------------- linear


def linear_forward(x: Any, w: Any, b: Any | None, out: Any | None = None) -> Any:
    """y = x @ w.T + b, for x of shape (..., in) and w of shape (out, in); into ``out`` if given (C-contiguous,
    of y's shape)."""
    y = cupy.matmul(x, w.T, out=out)  # cuBLAS reads the transposed view as is: no copy of w
    if b is not None:
        y += b
    return y


def linear_backward(
    g: Any, x: Any, w: Any, need_x: bool, need_w: bool, need_b: bool,
) -> tuple[Any | None, Any | None, Any | None]:
    """dx = g @ w, dw = g.T @ x, db = sum_batch g; each computed only when asked for."""
    gx = g @ w if need_x else None
    if need_w or need_b:
        g2 = g.reshape(-1, g.shape[-1])
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if need_w else None
        gb = g2.sum(axis=0) if need_b else None
    else:
        gw = gb = None
    return gx, gw, gb


# ------------------------------------------------------------------------------------- row products


def rowdot(p: Any, q: Any, axis: int) -> Any:
    """sum(p * q, axis) of two 2-D arrays in one reduction kernel, without the (p * q) temporary."""
    kernel = _reduction("mtp_rowdot", "T p, T q", "T out", "p * q", "a + b", "out = a")
    return kernel(p, q, axis=axis)


def row_sumsq(w: Any) -> Any:
    """||w_i||^2 per row, one reduction kernel."""
    return rowdot(w, w, 1)


# --------------------------------------------------------------------------------------------- relu


def relu_forward(x: Any) -> Any:
    """y = max(x, 0)."""
    return cupy.maximum(x, 0)


def relu_backward(g: Any, y: Any) -> Any:
    """dx = g * [y > 0], one kernel (not a compare and a multiply)."""
    return _elementwise("mtp_relu_backward", "T g, T y", "T dx", "dx = y > (T)0 ? g : (T)0")(g, y)


# ------------------------------------------------------------------------------------ cross-entropy

# One warp per row: max, sum of exp, softmax and the row's loss in one pass; rows beyond 32 classes
# are strided over the lanes. A label outside [0, C) gives a NaN loss (the CPU kernel raises for a label
# >= C; a negative one wraps around, as NumPy indexing does).
_CE_SOURCE = r"""
typedef %(T)s T;
typedef %(I)s I;
extern "C" __global__ void mtp_ce_forward(const T* z, const I* labels, T* probs, T* row_loss,
                                          long long n, int c) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x & 31;
    if (row >= n) return;  // whole warps leave together: the shuffles below stay full-warp
    const T* zr = z + row * c;
    T* pr = probs + row * c;
    T m = zr[lane < c ? lane : 0];
    for (int j = lane + 32; j < c; j += 32) m = fmax(m, zr[j]);
    for (int o = 16; o > 0; o >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, o));
    T s = 0;
    for (int j = lane; j < c; j += 32) {
        T e = exp(zr[j] - m);
        pr[j] = e;
        s += e;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) {
        long long y = (long long)labels[row];
        row_loss[row] = (y >= 0 && y < c) ? log(s) - (zr[y] - m) : (T)nan("");
    }
    for (int j = lane; j < c; j += 32) pr[j] = pr[j] / s;
}
"""
_C_TYPES = {
    "float32": "float", "float64": "double",
    "int8": "signed char", "uint8": "unsigned char", "int16": "short", "uint16": "unsigned short",
    "int32": "int", "uint32": "unsigned int", "int64": "long long", "uint64": "unsigned long long",
}
_CE_ROWS_PER_BLOCK = 8  # 8 warps = 256 threads


def _ce_kernel(dtype: Any, label_dtype: Any) -> Any:
    key = ("mtp_ce_forward", np.dtype(dtype).name, np.dtype(label_dtype).name)
    kernel = _kernels.get(key)
    if kernel is None:
        try:
            types = {"T": _C_TYPES[key[1]], "I": _C_TYPES[key[2]]}
        except KeyError:
            raise TypeError(f"cross_entropy on the GPU wants float32/float64 logits and integer labels, "
                            f"got {key[1]} and {key[2]}") from None
        if key[1] not in ("float32", "float64"):
            raise TypeError(f"cross_entropy on the GPU wants float32 or float64 logits, got {key[1]}")
        kernel = _kernels[key] = cupy.RawKernel(_CE_SOURCE % types, "mtp_ce_forward")
    return kernel


def cross_entropy_forward(logits: Any, labels: Any) -> tuple[Any, Any]:
    """loss = mean_i (logsumexp(z_i) - z_i[label_i]) as a 0-d device array; also softmax(z).

    Two kernels (the fused row kernel and the mean), and no wait for the GPU.
    """
    z = cupy.ascontiguousarray(logits)
    y = cupy.ascontiguousarray(labels)
    n, c = z.shape
    probs = cupy.empty_like(z)
    row_loss = cupy.empty(n, dtype=z.dtype)
    if n:
        blocks = (n + _CE_ROWS_PER_BLOCK - 1) // _CE_ROWS_PER_BLOCK
        _ce_kernel(z.dtype, y.dtype)((blocks,), (32 * _CE_ROWS_PER_BLOCK,), (z, y, probs, row_loss, np.int64(n), np.int32(c)))
    return row_loss.mean(), probs


def cross_entropy_backward(g: Any, probs: Any, labels: Any) -> Any:
    """dz = g * (softmax(z) - onehot(label)) / N, g the loss's 0-d (device) gradient; one kernel."""
    n, c = probs.shape
    kernel = _elementwise(
        "mtp_ce_backward", "T p, T g, raw I labels, int64 c, int64 n", "T d",
        "T gn = g / (T)n; d = p * gn; if ((long long)labels[i / c] == i % c) d -= gn;",
    )
    return kernel(probs, g, labels, c, n)


# ------------------------------------------------------------------------------------ misc helpers


def _device_index(index: Any) -> Any:
    """An index with its NumPy arrays moved to the device (CuPy wants device index arrays)."""
    if isinstance(index, tuple):
        return tuple(_device_index(i) for i in index)
    if isinstance(index, (np.ndarray, list)):
        return cupy.asarray(index)
    return index


def index_add(target: Any, index: object, values: Any) -> Any:
    """target[index] += values, accumulating over repeated indices (the backward of indexing)."""
    cupy.add.at(target, _device_index(index), values)  # (cupyx.scatter_add is deprecated)
    return target


_device_rng: list[Any] = [None, None]  # [the host generator it was seeded from, cupy RandomState]


def _rng_for(rng: np.random.Generator) -> Any:
    """The device generator that follows ``rng``: seeded from it once, then drawn from on the GPU.

    ``manual_seed`` makes a new host generator, which makes a new device one here, so a seed still
    makes a run repeatable; no host randomness is drawn per step.
    """
    if _device_rng[0] is not rng:
        _device_rng[:] = [rng, cupy.random.RandomState(int(rng.integers(0, 2**63 - 1)))]
    return _device_rng[1]


def dropout_mask(shape: tuple[int, ...], p: float, dtype: Any, rng: np.random.Generator) -> Any:
    """mask = Bernoulli(1 - p) / (1 - p), so E[x * mask] = x (inverted dropout), drawn on the GPU."""
    dtype = np.dtype(dtype)
    u = _rng_for(rng).random_sample(shape, dtype=np.float32)
    kernel = _elementwise("mtp_dropout_mask", "float32 u, float32 p, T scale", "T mask", "mask = u >= p ? scale : (T)0")
    return kernel(u, np.float32(p), dtype.type(1.0 / (1.0 - p)), cupy.empty(shape, dtype=dtype))


def to_numpy(a: Any) -> np.ndarray:
    """A host copy of a device array (NumPy arrays are returned as they are)."""
    return a.get() if isinstance(a, cupy.ndarray) else np.asarray(a)


# ------------------------------------------------------------------------------------ measuring

PEAK_METHOD = "cupy memory pool (hook)"


def synchronize() -> None:
    """Wait for the GPU to finish the queued work (what makes a clock around GPU calls honest)."""
    cupy.cuda.Device().synchronize()


def peak_bytes(call: Callable[[], Any]) -> int:  # pragma: no cover - needs a GPU
    """Peak bytes of the memory pool taken while ``call`` runs, above what was live before it.

    Only blocks taken during the call count, as with tracemalloc on the CPU: freeing an older array (last
    step's gradients) must not make room that this step's allocations then seem not to use.
    """
    from cupy.cuda import MemoryHook

    class PoolPeak(MemoryHook):
        name = "minitorch_peft_peak"

        def __init__(self) -> None:
            self.used = self.peak = 0
            self.live: dict[int, int] = {}

        def malloc_postprocess(self, **kw: Any) -> None:
            self.live[kw["mem_ptr"]] = kw["mem_size"]
            self.used += kw["mem_size"]
            self.peak = max(self.peak, self.used)

        def free_postprocess(self, **kw: Any) -> None:
            self.used -= self.live.pop(kw["mem_ptr"], 0)

    synchronize()
    hook = PoolPeak()
    with hook:
        call()
        synchronize()
    return max(0, hook.peak)


def device_info() -> dict[str, str]:  # pragma: no cover - needs a GPU
    """The GPU's name and the CuPy version, for the benchmark's header."""
    try:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        return {"gpu": name.decode() if isinstance(name, bytes) else str(name), "cupy": cupy.__version__}
    except Exception as e:
        return {"gpu": f"unknown ({e.__class__.__name__})"}


# -------------------------------------------------------------------------------------- optimizers


def adam_step(
    p: Any, g: Any, m: Any, v: Any, *,
    lr: float, beta1: float, beta2: float, eps: float, step: int,
    weight_decay: float = 0.0, decoupled: bool = True,
) -> None:
    """In place, one fused kernel: the update of kernels.cpu.adam_step (AdamW when ``decoupled``), moments
    below the smallest normal number stored as 0 as there (a GPU is not slowed by subnormals, but the two
    devices keep the same optimizer state)."""
    t = np.dtype(p.dtype).type
    l2 = weight_decay if (weight_decay and not decoupled) else 0.0
    decay = 1.0 - lr * weight_decay if (weight_decay and decoupled) else 1.0
    kernel = _elementwise(
        "mtp_adam_step",
        "T g, T step_size, T beta1, T beta2, T eps, T bc2_sqrt, T decay, T l2, T tiny",
        "T p, T m, T v",
        """
        T gi = l2 != (T)0 ? g + l2 * p : g;
        T mi = beta1 * m + ((T)1 - beta1) * gi;
        T vi = beta2 * v + ((T)1 - beta2) * gi * gi;
        if (mi < tiny && mi > -tiny) mi = (T)0;
        if (vi < tiny) vi = (T)0;
        m = mi;
        v = vi;
        p = p * decay - step_size * mi / (sqrt(vi) / bc2_sqrt + eps);
        """,
    )
    kernel(
        g, t(lr / (1.0 - beta1**step)), t(beta1), t(beta2), t(eps), t(np.sqrt(1.0 - beta2**step)), t(decay), t(l2),
        t(np.finfo(p.dtype).tiny), p, m, v,
    )


def sgd_step(
    p: Any, g: Any, buf: Any | None, *, lr: float, momentum: float, weight_decay: float, first: bool,
) -> None:
    """In place, one fused kernel: g' = g + wd p; buf = mu buf + g' (buf = g' at first); p -= lr * buf."""
    t = np.dtype(p.dtype).type
    if buf is None or not momentum:
        kernel = _elementwise("mtp_sgd_step", "T g, T lr, T wd", "T p", "p -= lr * (g + wd * p)")
        kernel(g, t(lr), t(weight_decay), p)
        return
    kernel = _elementwise(
        "mtp_sgd_momentum_step",
        "T g, T lr, T momentum, T wd, bool first, T tiny",
        "T p, T buf",
        "T gi = g + wd * p; T bi = first ? gi : momentum * buf + gi; if (bi < tiny && bi > -tiny) bi = (T)0;"
        " buf = bi; p -= lr * bi;",
    )
    kernel(g, t(lr), t(momentum), t(weight_decay), np.bool_(first), t(np.finfo(p.dtype).tiny), p, buf)


# ------------------------------------------------------------------------------------ quantization


def quantize_4bit(x: Any, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False) -> Any:
    """Blockwise 4-bit quantization on the GPU (kernels.quant_cuda); codes bit-identical to the CPU's."""
    from . import quant_cuda

    return quant_cuda.quantize_4bit(x, quant_type=quant_type, block_size=block_size, double_quant=double_quant)


def dequantize_4bit(
    packed: Any, state: Any, out: Any | None = None, validate: bool = True, serial: bool = False,
    rows: tuple[int, int] | None = None,
) -> Any:
    """x_hat = code[q] * absmax_block on the GPU (kernels.quant_cuda), only rows r0:r1 if ``rows``;
    ``validate=False`` skips the checks. ``serial`` (a CPU option: stay on one thread) means nothing here."""
    from . import quant_cuda

    return quant_cuda.dequantize_4bit(packed, state, out, validate, rows)


def dequantize_absmax(state: Any) -> Any:
    """The per-block absmax of a QuantState as float32 on the GPU (decoding double-quantized codes if any)."""
    from . import quant_cuda

    return quant_cuda.dequantize_absmax(state)


# The gradient all-reduce for data-parallel training (minitorch_peft.distributed).
from .gpu_collective import ALLREDUCE_TRANSPORTS, make_allreduce  # noqa: E402,F401
