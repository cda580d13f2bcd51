"""Plain-NumPy reference for ``kernels.quant``: the same blockwise 4-bit (NF4/FP4) quantization and
double quantization, written as vectorised array expressions and meant to be read, not to be fast.

The math (module docstring of ``kernels.quant`` has the full layout) in one line each:

* ``absmax_b = max |x|``, ``y = float32(x / d)`` with ``d = absmax_b`` or 1 for an all-zero block.
* ``q = argmin_i |y - code[i]|`` in exact arithmetic (the float64 differences are exact wherever a tie can arise);
  ``np.argmin`` takes the first minimum, so ties go to the lower index.
* ``packed[j] = q[2j] << 4 | q[2j + 1]``; ``x_hat = float32(code[q] * absmax_b)``.
* Double quant: ``offset = float32(sum_f64(absmax) / nb)``, ``diff = absmax - offset``,
  ``scale_g = max |diff|`` per 256, ``k = argmin |diff / d - DQ8_CODE|``,
  ``absmax_hat = float32(float32(DQ8_CODE[k] * scale_g) + offset)``.

It deliberately does not use the Numba kernels or the threshold tables of ``kernels.quant``; it only
shares the :class:`QuantState` container and its validation.
"""

from __future__ import annotations

import numpy as np

from .quant import DQ_BLOCK_SIZE, QuantState, check_block_size, check_packed, check_quant_type

__all__ = ["NF4_CODE", "FP4_CODE", "DQ8_CODE", "quantize_4bit", "dequantize_4bit", "nearest_index"]

NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    dtype=np.float32,
)
FP4_CODE = (
    np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, -0.0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=np.float32)
    / np.float32(12)
)
DQ8_CODE = (np.arange(255, dtype=np.float32) - np.float32(127)) / np.float32(127)
_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def nearest_index(y: np.ndarray, code: np.ndarray, chunk: int = 1 << 15) -> np.ndarray:
    """uint8 index of the nearest ``code`` value to each float32 ``y`` (exact; ties: lower index)."""
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    c64 = np.asarray(code, dtype=np.float32).astype(np.float64)
    out = np.empty(y.size, dtype=np.uint8)
    for s in range(0, y.size, chunk):
        dist = np.abs(y[s : s + chunk, None].astype(np.float64) - c64[None, :])
        out[s : s + chunk] = np.argmin(dist, axis=1)
    return out


def _blocks(flat: np.ndarray, block: int) -> np.ndarray:
    """(n_blocks, block) view of ``flat`` padded with zeros (zeros change no |max|)."""
    nb = -(-flat.size // block)
    padded = np.zeros(nb * block, dtype=flat.dtype)
    padded[: flat.size] = flat
    return padded.reshape(nb, block)


def _divisor(scale: np.ndarray) -> np.ndarray:
    return np.where(scale > 0, scale, np.float32(1)).astype(np.float32)


def quantize_4bit(
    x, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False
) -> tuple[np.ndarray, QuantState]:
    """Blockwise 4-bit quantization: q = nearest(code, x / absmax_block), two codes per byte."""
    check_quant_type(quant_type)
    block = check_block_size(block_size)
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"cannot quantize an array of dtype {x.dtype}; expected float32")
    x = np.ascontiguousarray(x, dtype=np.float32)
    flat = x.reshape(-1)
    n = flat.size
    if not np.isfinite(flat).all():
        raise ValueError("input to quantize_4bit contains NaN or Inf")
    blocks = _blocks(flat, block)
    absmax = np.abs(blocks).max(axis=1) if n else np.zeros(0, np.float32)
    y = (blocks / _divisor(absmax)[:, None]).reshape(-1)[:n]
    q = nearest_index(y, _CODES[quant_type])
    if n % 2:
        q = np.concatenate([q, np.zeros(1, np.uint8)])
    packed = ((q[0::2] << 4) | q[1::2]).astype(np.uint8)
    state = QuantState(shape=tuple(x.shape), quant_type=quant_type, block_size=block, absmax=absmax)
    if double_quant:
        offset = np.float32(np.sum(absmax, dtype=np.float64) / absmax.size) if n else np.float32(0)
        diff = absmax - offset
        groups = _blocks(diff, DQ_BLOCK_SIZE)
        scale = np.abs(groups).max(axis=1) if n else np.zeros(0, np.float32)
        u = (groups / _divisor(scale)[:, None]).reshape(-1)[: diff.size]
        state = QuantState(
            shape=state.shape,
            quant_type=quant_type,
            block_size=block,
            absmax_codes=nearest_index(u, DQ8_CODE),
            absmax_scale=scale.astype(np.float32),
            absmax_offset=np.array(offset, dtype=np.float32),
        )
    return packed, state


def dequantize_absmax(state: QuantState) -> np.ndarray:
    """Per-block float32 absmax: stored, or DQ8_CODE[k] * scale_g + offset (two float32 roundings)."""
    if state.absmax is not None:
        return state.absmax
    scale = np.repeat(state.absmax_scale, DQ_BLOCK_SIZE)[: state.absmax_codes.size]
    return DQ8_CODE[state.absmax_codes] * scale + state.absmax_offset.reshape(())


def dequantize_4bit(packed: np.ndarray, state: QuantState, out: np.ndarray | None = None) -> np.ndarray:
    """x_hat = code[q] * absmax_block, float32 of ``state.shape`` (into ``out`` when given)."""
    state.validate()
    check_packed(packed, state)
    n = state.n
    q = np.empty(2 * packed.size, dtype=np.uint8)
    q[0::2] = packed >> 4
    q[1::2] = packed & 15
    absmax = np.repeat(dequantize_absmax(state), state.block_size)[:n]
    values = (_CODES[state.quant_type][q[:n]] * absmax).reshape(state.shape)
    if out is None:
        return values
    if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != state.shape:
        raise ValueError(f"out must be a float32 array of shape {state.shape}")
    out[...] = values
    return out
