"""The 4-bit quantize/dequantize of ``kernels.quant`` as ``numba.cuda`` kernels, bit-identical to the
CPU kernels (same math, same tables, same tie rule; see ``kernels.quant``'s docstring).

One GPU thread per packed byte (quantize: both values of a byte) or per value (dequantize). The
per-block absmax is an ``atomic.max`` over the bit patterns of ``|x|`` (as unsigned integers they
order like the floats, and Inf/NaN come out above ``0x7f800000``); the double-quant scale is an
``atomic.max`` over float32 ``|absmax - offset|``. Max is exact and order-free, so the result does not
depend on scheduling. The double-quant offset is computed on the host with NumPy, exactly as the
CPU path does (the absmax vector is 1/block of the data).

Arrays: CuPy arrays on a GPU (passed to the kernels through ``__cuda_array_interface__``; outputs are
CuPy arrays), or NumPy arrays under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1`` set before
Numba is imported). ``numba.cuda`` is imported on first use only. On a real GPU the float32
division, multiply and add go through libdevice's ``*_rn`` functions, so that no FMA contraction or
approximate division can change a bit. (Checked by compiling every kernel to PTX for sm_90: the
arithmetic is div.rn / mul.rn / add.rn, and the only fma is in a guess that an exact walk corrects.)
Numba's CUDA target mistypes the builtin ``max``/``min``, so the kernels compare explicitly.
"""

from __future__ import annotations

import numpy as np

from .quant import (
    DQ8_CODE,
    FP4_CODE,
    NF4_CODE,
    DQ8_THRESHOLDS,
    DQ_BLOCK_SIZE,
    QuantState,
    absmax_offset,
    array_module,
    check_block_size,
    check_packed,
    check_quant_type,
    check_rows,
    kernel_tables,
)

__all__ = ["quantize_4bit", "dequantize_4bit", "dequantize_absmax", "to_host", "to_device"]

_THREADS = 256  # threads per CUDA block on a GPU; 32 under the simulator (a Python thread each)
_kernels_cache: dict | None = None
_tables_cache: dict = {}


cuda = None  # numba.cuda, bound on first use; a module global so the simulator can swap it in kernels


def _build_kernels() -> dict:
    global cuda
    from numba import config
    from numba import cuda as _numba_cuda

    cuda = _numba_cuda

    float32, int32, int64, uint8, uint32 = np.float32, np.int32, np.int64, np.uint8, np.uint32

    if config.ENABLE_CUDASIM:

        @cuda.jit(device=True)
        def div_rn(a, b):
            return a / b

        @cuda.jit(device=True)
        def mul_rn(a, b):
            return a * b

        @cuda.jit(device=True)
        def add_rn(a, b):
            return a + b

    else:  # pragma: no cover - needs a GPU
        from numba.cuda import libdevice

        @cuda.jit(device=True)
        def div_rn(a, b):
            return libdevice.fdiv_rn(a, b)

        @cuda.jit(device=True)
        def mul_rn(a, b):
            return libdevice.fmul_rn(a, b)

        @cuda.jit(device=True)
        def add_rn(a, b):
            return libdevice.fadd_rn(a, b)

    @cuda.jit(device=True)
    def code_index(y, thr, step, base):
        c = base
        for k in range(15):
            if y > thr[k]:
                c += step[k]
        return int32(c)

    @cuda.jit
    def absmax_bits(xbits, n, shift, out_bits):
        """out_bits[b] = max over block b of the bits of |x| (one thread per byte)."""
        j = cuda.grid(1)
        i = 2 * j
        if i < n:
            m = uint32(xbits[i] & uint32(0x7FFFFFFF))
            if i + 1 < n:
                m2 = uint32(xbits[i + 1] & uint32(0x7FFFFFFF))
                if m2 > m:  # (no builtin max: Numba's CUDA target mistypes it)
                    m = m2
            cuda.atomic.max(out_bits, i >> shift, m)

    @cuda.jit
    def quantize4(x, n, shift, absmax, thr, step, base, packed):
        """packed[j] = code(x[2j]) << 4 | code(x[2j+1]), code = nearest of x / absmax."""
        j = cuda.grid(1)
        i = 2 * j
        if i < n:
            a = absmax[i >> shift]
            d = a if a > float32(0.0) else float32(1.0)
            hi = code_index(div_rn(x[i], d), thr, step, base)
            lo = int32(0)
            if i + 1 < n:
                lo = code_index(div_rn(x[i + 1], d), thr, step, base)
            packed[j] = uint8((hi << 4) | lo)

    @cuda.jit
    def dequantize4(packed, n, shift, absmax, code, out):
        """out[i] = code[nibble i] * absmax[i >> shift] (one thread per value)."""
        i = cuda.grid(1)
        if i < n:
            q = int32(packed[i >> 1])
            nib = (q >> 4) if (i & 1) == 0 else (q & 15)
            out[i] = mul_rn(code[nib], absmax[i >> shift])

    @cuda.jit
    def dq_scale(absmax, nb, offset, gshift, scale):
        """scale[g] = max |absmax - offset| over group g."""
        i = cuda.grid(1)
        if i < nb:
            cuda.atomic.max(scale, i >> gshift, abs(absmax[i] - offset))

    @cuda.jit
    def dq_codes(absmax, nb, offset, gshift, scale, thr8, codes):
        """codes[i] = number of DQ8 thresholds strictly below (absmax - offset) / scale."""
        i = cuda.grid(1)
        if i < nb:
            sc = scale[i >> gshift]
            d = sc if sc > float32(0.0) else float32(1.0)
            u = div_rn(absmax[i] - offset, d)
            nthr = thr8.shape[0]
            k = int64(u * float32(127.0) + float32(127.5))  # a guess; the walk below is exact
            if k < 0:
                k = int64(0)
            if k > nthr:
                k = int64(nthr)
            while k < nthr and u > thr8[k]:
                k += 1
            while k > 0 and not (u > thr8[k - 1]):
                k -= 1
            codes[i] = uint8(k)

    @cuda.jit
    def dq_absmax(codes, nb, gshift, scale, offset, code8, out):
        """out[i] = float32(code8[codes[i]] * scale[i >> gshift]) + offset[0], two roundings.

        ``offset`` is a one-value device array: read here, it costs the host no wait for the GPU."""
        i = cuda.grid(1)
        if i < nb:
            out[i] = add_rn(mul_rn(code8[codes[i]], scale[i >> gshift]), offset[0])

    return dict(
        absmax_bits=absmax_bits,
        quantize4=quantize4,
        dequantize4=dequantize4,
        dq_scale=dq_scale,
        dq_codes=dq_codes,
        dq_absmax=dq_absmax,
    )


def _kernels() -> dict:
    global _kernels_cache
    if _kernels_cache is None:
        _kernels_cache = _build_kernels()
    return _kernels_cache


def _launch(kernel, count: int, *args) -> None:
    """Run ``kernel`` over ``count`` threads (1-D grid)."""
    if count > 0:
        tpb = 32 if _simulated() else _THREADS
        kernel[(count + tpb - 1) // tpb, tpb](*args)


def _log2(block: int) -> int:
    """Shift for a power-of-two block size (the kernels divide by shifting)."""
    return int(block).bit_length() - 1


def _simulated() -> bool:
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def _table(xp, name: str, host: np.ndarray):
    """A constant table on the device of ``xp`` (cached), passed as a read-only kernel input."""
    key = (xp.__name__, name)
    if key not in _tables_cache:
        _tables_cache[key] = xp.asarray(host)
    return _in(xp, _tables_cache[key])


def _in(xp, a):
    """Mark a NumPy argument as input-only (no copy back; it may be read-only); CuPy passes as is."""
    if xp is not np:
        return a
    from numba import cuda as numba_cuda

    return numba_cuda.In(a)


def _code_book(quant_type: str) -> np.ndarray:
    return NF4_CODE if quant_type == "nf4" else FP4_CODE


def to_host(a):
    """A NumPy copy of a device (CuPy) array; NumPy arrays are returned as they are.

    For a whole state: ``state.map_arrays(to_host)`` (and ``state.map_arrays(to_device)`` back)."""
    xp = array_module(a)
    return a if xp is np else xp.asnumpy(a)


def to_device(a, xp=None):
    """``a`` as an array of ``xp`` (CuPy by default)."""
    if xp is None:
        import cupy as xp
    return xp.asarray(a)


def quantize_4bit(x, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False):
    """Blockwise 4-bit quantization on the GPU: q = nearest(code, x / absmax_block), 2 codes a byte.

    ``x``: a CuPy float32 array (or NumPy under the simulator). Returns ``(packed, state)`` with
    device arrays, bit-identical to ``kernels.quant.quantize_4bit``.
    """
    check_quant_type(quant_type)
    block = check_block_size(block_size)
    xp = array_module(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"cannot quantize an array of dtype {x.dtype}; expected float32")
    x = xp.ascontiguousarray(x, dtype=xp.float32)
    flat = x.reshape(-1)
    n = int(flat.size)
    nb = (n + block - 1) // block
    packed = xp.empty((n + 1) // 2, dtype=xp.uint8)
    bits = xp.zeros(nb, dtype=xp.uint32)
    if n:
        k = _kernels()
        _launch(k["absmax_bits"], packed.size, _in(xp, flat.view(xp.uint32)), n, _log2(block), bits)
        if bool((bits >= 0x7F800000).any()):
            raise ValueError("input to quantize_4bit contains NaN or Inf")
    absmax = bits.view(xp.float32)
    if n:
        thr, step, base = kernel_tables(quant_type)
        _launch(
            k["quantize4"],
            packed.size,
            _in(xp, flat),
            n,
            _log2(block),
            absmax,
            _table(xp, quant_type + "_thr", thr),
            _table(xp, quant_type + "_step", step),
            base,
            packed,
        )
    state = QuantState(shape=tuple(x.shape), quant_type=quant_type, block_size=block, absmax=absmax)
    if double_quant:
        state = _double_quantize(state, xp)
    return packed, state


def _double_quantize(state: QuantState, xp) -> QuantState:
    absmax = state.absmax
    nb = int(absmax.size)
    offset = absmax_offset(to_host(absmax))  # NumPy's float64 sum, as on the CPU path
    ngroups = (nb + DQ_BLOCK_SIZE - 1) // DQ_BLOCK_SIZE
    scale = xp.zeros(ngroups, dtype=xp.float32)
    codes = xp.empty(nb, dtype=xp.uint8)
    if nb:
        k = _kernels()
        _launch(k["dq_scale"], nb, _in(xp, absmax), nb, offset, _log2(DQ_BLOCK_SIZE), scale)
        _launch(
            k["dq_codes"], nb, _in(xp, absmax), nb, offset, _log2(DQ_BLOCK_SIZE), _in(xp, scale),
            _table(xp, "dq8_thr", DQ8_THRESHOLDS), codes,
        )
    return state.with_double_quant(codes, scale, xp.asarray(np.array(offset, dtype=np.float32)))


def dequantize_absmax(state: QuantState):
    """Per-block float32 absmax on the device: stored, or rebuilt from the double-quant codes."""
    if state.absmax is not None:
        return state.absmax
    codes = state.absmax_codes
    xp = array_module(codes)
    nb = int(codes.size)
    out = xp.empty(nb, dtype=xp.float32)
    # The offset stays on the device (a one-value view, float32 as the CPU path uses): copying it to the
    # host here would make every double-quant dequantize, so every QLoRA forward, wait for the GPU.
    offset = state.absmax_offset.reshape(1)
    if offset.dtype != np.float32:
        offset = offset.astype(xp.float32)
    _launch(
        _kernels()["dq_absmax"], nb, _in(xp, codes), nb, _log2(DQ_BLOCK_SIZE), _in(xp, state.absmax_scale),
        _in(xp, offset),
        _table(xp, "dq8_code", DQ8_CODE), out,
    )
    return out


def dequantize_4bit(packed, state: QuantState, out=None, validate: bool = True, rows=None):
    """x_hat = code[q] * absmax_block on the GPU, float32 of ``state.shape`` (into ``out`` if given).

    ``validate=False`` skips the checks of ``state`` and ``packed``, which wait for the GPU once (three times
    with double quantization): for a caller that dequantizes the same already-validated arrays every step.
    ``rows=(r0, r1)``: only
    those rows of a 2-D state (r0 * in on a block boundary), through the same kernel on that range's
    codes and its blocks' absmax.
    """
    if validate:
        state.validate()
        check_packed(packed, state)
    if rows is not None:
        v0, n = check_rows(state, rows)
        block, n_in = state.block_size, int(state.shape[1])
        absmax = dequantize_absmax(state)[v0 // block: -(-(v0 + n) // block)]
        sub = QuantState(shape=(n // n_in, n_in), quant_type=state.quant_type, block_size=block, absmax=absmax)
        return dequantize_4bit(packed[v0 // 2: (v0 + n + 1) // 2], sub, out, False)
    xp = array_module(packed)
    if out is None:
        out = xp.empty(state.shape, dtype=xp.float32)
    elif (
        array_module(out) is not xp
        or out.dtype != np.float32
        or tuple(out.shape) != state.shape
        or not out.flags.c_contiguous
    ):
        raise ValueError(
            f"out must be a C-contiguous float32 array of shape {state.shape} on the packed "
            f"codes' device, got {getattr(out, 'dtype', type(out))} of shape {getattr(out, 'shape', None)}"
        )
    n = state.n
    if n:
        absmax = dequantize_absmax(state)
        _launch(
            _kernels()["dequantize4"], n, _in(xp, xp.ascontiguousarray(packed)), n, _log2(state.block_size),
            _in(xp, absmax),
            _table(xp, state.quant_type + "_code", _code_book(state.quant_type)), out.reshape(-1),
        )
    return out
