"""Blockwise 4-bit quantization (NF4 / FP4) with optional double quantization of the absmax: the
compute core of QLoRA, as Numba CPU kernels.

Layout and math (shared bit for bit by ``kernels.quant_ref`` (NumPy) and ``kernels.quant_cuda``):

* The float32 tensor is flattened in C order into ``n`` values and cut into ``ceil(n / B)`` blocks of
  ``B`` values (``B`` a power of two in [32, 4096], 64 by default); the last block may be partial.
* Per block: ``absmax = max |x|`` (float32); ``y = x / d`` in float32 (an IEEE-rounded division, never
  a multiply by a reciprocal) with ``d = absmax`` when ``absmax > 0`` else ``d = 1``, so an all-zero
  block gives ``y = 0`` and dequantizes to exact zeros.
* ``y`` is rounded to the nearest value of the 16-entry code book in exact arithmetic; a ``y`` exactly
  halfway between two code values takes the one with the lower index (for FP4, where +0 and -0 are
  the same value, 0 always encodes as index 0).
* Codes are packed two per byte, the FIRST value in the HIGH nibble; for odd ``n`` the low nibble of
  the last byte is 0. ``packed`` has ``ceil(n / 2)`` bytes.
* Dequantization: ``x_hat = code[q] * absmax`` (one float32 multiply).
* Double quantization (the bitsandbytes scheme, with a LINEAR signed 8-bit map, not bitsandbytes'
  dynamic map): ``offset = float32(sum_f64(absmax) / n_blocks)`` (NumPy's float64 sum), then per group
  of 256 absmax values ``diff = absmax - offset`` (float32), ``scale = max |diff|``, ``u = diff / d``
  (``d`` as above) rounded to the nearest of the 255 values ``DQ8_CODE[k] = float32(k - 127) / 127``
  (ties to the lower index), stored as the byte ``k`` (0..254). Reconstruction:
  ``absmax_hat = float32(float32(DQ8_CODE[k] * scale) + offset)`` (two roundings, no fused FMA).
  The 4-bit codes are always computed against the exact absmax, as bitsandbytes does. (An absmax
  within a rounding step of the float32 maximum, ~3.4e38, may rebuild as Inf.)

Dequantizing is a table lookup: on a CPU with AVX-512 (where Numba targets it), ``lookup32`` does 16
lookups with one ``vpermps``; elsewhere a portable loop copies both values of a byte from a 256-entry pair
table. Both give the same float32 products, so the same bits.

Storage per parameter: 4 bits + 32/B bits (plain) or 4 + 8/B + 32/(256 B) bits (double quant, about
4.127 at B = 64) plus one float32 offset per tensor.
"""

from __future__ import annotations

import functools
import math
import types
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable

import numpy as np
from llvmlite import ir
from numba import njit, prange
from numba import types as nbtypes
from numba.core import cgutils, config
from numba.core.codegen import get_host_cpu_features
from numba.extending import intrinsic

__all__ = [
    "NF4_CODE",
    "FP4_CODE",
    "DQ8_CODE",
    "QUANT_TYPES",
    "DQ_BLOCK_SIZE",
    "QuantState",
    "quantize_4bit",
    "dequantize_4bit",
    "dequantize_absmax",
    "absmax_offset",
    "check_block_size",
    "check_quant_type",
    "check_packed",
    "check_rows",
    "array_module",
    "nearest_tables",
    "kernel_tables",
]

# ----------------------------------------------------------------------------------- code books

#: bitsandbytes' NF4 code book (quantiles of N(0, 1) rescaled to [-1, 1]), as float32.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
NF4_CODE.setflags(write=False)

#: bitsandbytes' FP4 code book (E2M1 with its own bit order: sign bit 8), divided by 12 in float32.
FP4_CODE = np.array(
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    dtype=np.float32,
) / np.float32(12.0)
FP4_CODE.setflags(write=False)

#: Linear signed 8-bit map for the double-quantized absmax: byte k (0..254) means (k - 127) / 127.
DQ8_CODE = np.arange(-127, 128, dtype=np.float32) / np.float32(127.0)
DQ8_CODE.setflags(write=False)

QUANT_TYPES = ("nf4", "fp4")
DQ_BLOCK_SIZE = 256
MIN_BLOCK_SIZE = 32
MAX_BLOCK_SIZE = 4096
_FORMAT_VERSION = 1
_QTYPE_ID = {"nf4": 0, "fp4": 1}
_CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def nearest_tables(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tables for exact nearest-code rounding by counting: ``index = lut[sum_k (y > thr[k])]``.

    ``thr`` (float32, ascending, one per gap between distinct code values) is the exact midpoint
    of the gap moved to a float32 so that the strict float32 comparison ``y > thr`` is true exactly
    when the exact nearest rule (ties to the lower index) picks the upper value; ``lut`` (uint8)
    maps a sorted position to the lowest code index holding that value.
    """
    code = np.asarray(code, dtype=np.float32)
    order = sorted(range(code.size), key=lambda i: (float(code[i]), i))
    values: list[float] = []
    index: list[int] = []
    for i in order:
        v = float(code[i])
        if values and v == values[-1]:
            continue  # duplicate value (+0 / -0): keep the lowest index, already taken
        values.append(v)
        index.append(i)
    thr = np.empty(len(values) - 1, dtype=np.float32)
    neg_inf = np.float32(-np.inf)
    for j in range(len(values) - 1):
        mid = (values[j] + values[j + 1]) / 2.0  # exact in float64 for these float32 values
        assert Fraction(mid) == (Fraction(values[j]) + Fraction(values[j + 1])) / 2
        t = np.float32(mid)
        if float(t) > mid:
            t = np.nextafter(t, neg_inf)  # largest float32 <= mid
        if index[j + 1] < index[j] and float(t) == mid:
            t = np.nextafter(t, neg_inf)  # a tie goes up: step up for y >= mid
        thr[j] = t
    return thr, np.array(index, dtype=np.uint8)


_TABLES = {name: nearest_tables(code) for name, code in _CODES.items()}
_NTHR = 15  # thresholds per 4-bit code book in the kernel (FP4 has 14, padded with +inf)


def _kernel_tables(thr: np.ndarray, lut: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """Kernel form of (thr, lut): index = base + sum_k step[k] * (y > thr[k]) over 15 thresholds,
    in float32 (small integers, exact) because the float adds vectorise best in the CPU kernel."""
    step = np.diff(lut.astype(np.float32)).astype(np.float32)
    pad = _NTHR - thr.size
    thr = np.concatenate([thr, np.full(pad, np.inf, np.float32)])
    step = np.concatenate([step, np.zeros(pad, np.float32)])
    return thr, step, np.float32(lut[0])


_STEPS = {name: _kernel_tables(*tables) for name, tables in _TABLES.items()}


def kernel_tables(quant_type: str) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """(thr, step, base) for ``quant_type``: code index = base + sum_k step[k] * (y > thr[k])."""
    return _STEPS[check_quant_type(quant_type)]


_DQ8_THR, _DQ8_LUT = nearest_tables(DQ8_CODE)
assert np.array_equal(_DQ8_LUT, np.arange(255))  # sorted map: position == byte
#: 254 float32 thresholds: a DQ8 byte is the number of thresholds strictly below u.
DQ8_THRESHOLDS = _DQ8_THR
for _a in (DQ8_THRESHOLDS, *(a for t in _STEPS.values() for a in t[:2])):
    _a.setflags(write=False)

# ----------------------------------------------------------------------------------- validation


def check_block_size(block_size: int) -> int:
    """Return ``block_size`` as an int, or raise ValueError unless a power of two in [32, 4096]."""
    ok = isinstance(block_size, (int, np.integer)) and not isinstance(block_size, bool)
    if ok:
        b = int(block_size)
        ok = MIN_BLOCK_SIZE <= b <= MAX_BLOCK_SIZE and (b & (b - 1)) == 0
    if not ok:
        raise ValueError(
            f"block_size={block_size!r} is not allowed: it must be a power of two from "
            f"{MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
        )
    return int(block_size)


def check_quant_type(quant_type: str) -> str:
    """Return the quant type, or raise ValueError unless it is 'nf4' or 'fp4'."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type={quant_type!r} is not supported; use one of {QUANT_TYPES}")
    return quant_type


def _n_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


@dataclass
class QuantState:
    """Everything besides the packed codes needed to dequantize one tensor.

    Exactly one of ``absmax`` (float32, one per block) or the double-quant triple
    ``absmax_codes`` (uint8, one per block) / ``absmax_scale`` (float32, one per 256 blocks) /
    ``absmax_offset`` (float32 0-d array) is set.
    """

    shape: tuple[int, ...]
    quant_type: str
    block_size: int
    absmax: np.ndarray | None = None
    absmax_codes: np.ndarray | None = None
    absmax_scale: np.ndarray | None = None
    absmax_offset: np.ndarray | None = None
    dq_block_size: int = DQ_BLOCK_SIZE

    @property
    def n(self) -> int:
        """Number of quantized values."""
        return math.prod(int(s) for s in self.shape)  # not np.prod: ~4 us a call, and it is asked per dequantize

    @property
    def n_blocks(self) -> int:
        return _n_blocks(self.n, self.block_size)

    @property
    def n_bytes_packed(self) -> int:
        """Length of the packed uint8 code array: ceil(n / 2)."""
        return (self.n + 1) // 2

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def code(self) -> np.ndarray:
        """The 16-entry float32 code book of this state's quant type."""
        return _CODES[self.quant_type]

    def _live(self) -> list[np.ndarray]:
        arrs = (self.absmax, self.absmax_codes, self.absmax_scale, self.absmax_offset)
        return [a for a in arrs if a is not None]

    def nbytes(self) -> int:
        """Bytes of the live state arrays (absmax, or codes + scales + offset); excludes the codes."""
        return int(sum(a.nbytes for a in self._live()))

    def validate(self) -> "QuantState":
        """Raise ValueError unless every field is consistent (types, lengths, finite scales)."""
        check_quant_type(self.quant_type)
        check_block_size(self.block_size)
        if self.dq_block_size != DQ_BLOCK_SIZE:
            raise ValueError(f"dq_block_size={self.dq_block_size} is not {DQ_BLOCK_SIZE}")
        if not isinstance(self.shape, tuple) or any(
            not isinstance(s, (int, np.integer)) or s < 0 for s in self.shape
        ):
            raise ValueError(f"corrupted quant state: bad shape {self.shape!r}")
        nb = self.n_blocks
        if self.absmax is not None:
            if self.absmax_codes is not None or self.absmax_scale is not None:
                raise ValueError("corrupted quant state: both absmax and absmax_codes are set")
            _check_array("absmax", self.absmax, np.float32, nb)
            _check_finite("absmax", self.absmax)
        else:
            if self.absmax_codes is None or self.absmax_scale is None or self.absmax_offset is None:
                raise ValueError(
                    "corrupted quant state: absmax is missing (neither absmax nor the "
                    "double-quant absmax_codes/absmax_scale/absmax_offset are all present)"
                )
            _check_array("absmax_codes", self.absmax_codes, np.uint8, nb)
            _check_array("absmax_scale", self.absmax_scale, np.float32, _n_blocks(nb, DQ_BLOCK_SIZE))
            _check_finite("absmax_scale", self.absmax_scale)
            off = self.absmax_offset
            if not _is_array(off) or off.dtype != np.float32 or off.size != 1:
                raise ValueError("corrupted quant state: absmax_offset must be one float32")
            _check_finite("absmax_offset", off)
            if nb and int(self.absmax_codes.max()) > 254:
                raise ValueError("corrupted quant state: absmax_codes holds a byte > 254")
        return self

    def with_double_quant(self, codes: Any, scale: Any, offset: Any) -> "QuantState":
        """This state with its absmax stored as the double-quant triple (codes, scales, 0-d offset)."""
        return QuantState(
            shape=self.shape,
            quant_type=self.quant_type,
            block_size=self.block_size,
            absmax_codes=codes,
            absmax_scale=scale,
            absmax_offset=offset,
        )

    def map_arrays(self, fn) -> "QuantState":
        """A copy with ``fn`` applied to every live array (e.g. ``cupy.asarray`` / ``cupy.asnumpy``)."""
        def f(a):
            return None if a is None else fn(a)

        return QuantState(
            shape=self.shape,
            quant_type=self.quant_type,
            block_size=self.block_size,
            absmax=f(self.absmax),
            absmax_codes=f(self.absmax_codes),
            absmax_scale=f(self.absmax_scale),
            absmax_offset=f(self.absmax_offset),
            dq_block_size=self.dq_block_size,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        """Name -> array (metadata included) for ``np.savez``; ``from_arrays`` inverts it bit-exact."""
        meta = np.array(
            [_FORMAT_VERSION, _QTYPE_ID[self.quant_type], self.block_size, int(self.double_quant),
             self.dq_block_size],
            dtype=np.int64,
        )
        out = {"meta": meta, "shape": np.array(self.shape, dtype=np.int64)}
        if self.absmax is not None:
            out["absmax"] = self.absmax
        else:
            out["absmax_codes"] = self.absmax_codes
            out["absmax_scale"] = self.absmax_scale
            out["absmax_offset"] = self.absmax_offset.reshape(())
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "QuantState":
        """Rebuild (and validate) a state from ``arrays()``'s dict or a loaded ``.npz``."""
        try:
            meta = np.asarray(arrays["meta"])
            shape = np.asarray(arrays["shape"])
        except KeyError as e:
            raise ValueError(f"corrupted quant state: missing array {e.args[0]!r}") from None
        if meta.dtype != np.int64 or meta.shape != (5,):
            raise ValueError("corrupted quant state: 'meta' must be 5 int64 values")
        if shape.dtype != np.int64 or shape.ndim != 1:
            raise ValueError("corrupted quant state: 'shape' must be a 1-D int64 array")
        version, qid, block, dq, dq_block = (int(v) for v in meta)
        if version != _FORMAT_VERSION:
            raise ValueError(f"corrupted quant state: unknown format version {version}")
        names = {v: k for k, v in _QTYPE_ID.items()}
        if qid not in names:
            raise ValueError(f"corrupted quant state: unknown quant type id {qid}")
        if dq not in (0, 1):
            raise ValueError(f"corrupted quant state: double-quant flag {dq}")

        def get(name):
            try:
                return np.asarray(arrays[name])
            except KeyError:
                raise ValueError(f"corrupted quant state: missing array {name!r}") from None

        kw = {}
        if dq:
            kw = dict(
                absmax_codes=get("absmax_codes"),
                absmax_scale=get("absmax_scale"),
                absmax_offset=get("absmax_offset").reshape(()),
            )
        else:
            kw = dict(absmax=get("absmax"))
        state = cls(
            shape=tuple(int(s) for s in shape),
            quant_type=names[qid],
            block_size=block,
            dq_block_size=dq_block,
            **kw,
        )
        return state.validate()


def array_module(a):
    """``cupy`` for a CuPy array, else ``numpy`` (CuPy is imported only when it is the answer)."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def _is_array(a) -> bool:
    return all(hasattr(a, attr) for attr in ("dtype", "ndim", "size", "shape", "nbytes"))


def _check_array(name: str, a, dtype, length: int) -> None:
    if not _is_array(a) or a.dtype != dtype or a.ndim != 1:
        got = f"{a.dtype} array of shape {a.shape}" if _is_array(a) else type(a).__name__
        raise ValueError(f"corrupted quant state: {name} must be a 1-D {np.dtype(dtype)} array, got {got}")
    if a.size != length:
        raise ValueError(f"corrupted quant state: {name} has {a.size} values, expected {length}")


def _check_finite(name: str, a) -> None:
    if a.size and not bool(array_module(a).isfinite(a).all()):
        raise ValueError(f"corrupted quant state: {name} contains NaN or Inf")


def check_packed(packed, state: QuantState) -> None:
    """Raise ValueError unless ``packed`` is a 1-D uint8 array of ``ceil(n / 2)`` bytes."""
    if getattr(packed, "dtype", None) != np.uint8 or getattr(packed, "ndim", None) != 1:
        raise ValueError(
            f"packed codes must be a 1-D uint8 array, got {getattr(packed, 'dtype', type(packed))} "
            f"of shape {getattr(packed, 'shape', None)}"
        )
    if packed.size != state.n_bytes_packed:
        raise ValueError(
            f"packed codes have {packed.size} bytes, but shape {state.shape} needs "
            f"{state.n_bytes_packed} (two 4-bit codes per byte)"
        )


def absmax_offset(absmax: np.ndarray) -> np.float32:
    """Double-quant offset: float32(sum_f64(absmax) / n_blocks), 0 for no blocks (NumPy's sum)."""
    if absmax.size == 0:
        return np.float32(0.0)
    return np.float32(np.sum(absmax, dtype=np.float64) / absmax.size)


# ----------------------------------------------------------------------------------- kernels

@njit(cache=True, inline="always")
def _bits_to_f32(bits):  # pragma: no cover - compiled
    """The float32 whose bit pattern is ``bits`` (finite, sign bit clear), built exactly."""
    e = np.int64(bits >> 23)
    m = np.int64(bits & 0x7FFFFF)
    if e == 0:
        return np.float32(math.ldexp(np.float64(m), -149))
    return np.float32(math.ldexp(np.float64(m | 0x800000), e - 150))


# _quantize4_kernel indexes with uint64: a signed index costs Numba a negative-index fix-up per access,
# which blocks vectorisation of its short per-block loops (about 3x slower).


@njit(cache=True, parallel=True, nogil=True)
def _quantize4_kernel(x, block, thr, step, base, packed, absmax):  # pragma: no cover - compiled
    """absmax[b] = max|x| over block b (NaN if it holds NaN/Inf); packed = nearest codes, two per
    byte, first value in the high nibble. The code index of y is
    ``base + sum_k step[k] * (y > thr[k])`` (telescoping to ``lut[#thresholds below y]``)."""
    n = x.size
    nb = absmax.size
    xbits = x.view(np.uint32)
    one = np.uint64(1)
    for b in prange(nb):
        s = np.uint64(b * block)
        e = np.uint64(min(b * block + block, n))
        mb = np.uint32(0)
        for i in range(s, e):
            mb = max(mb, xbits[i] & np.uint32(0x7FFFFFFF))
        # |x| bit patterns order like the floats; 0x7f800000 and above are Inf and NaN
        if mb >= np.uint32(0x7F800000):
            absmax[b] = np.float32(np.nan)
            continue
        a = _bits_to_f32(mb)
        absmax[b] = a
        d = a if a > np.float32(0.0) else np.float32(1.0)
        for j in range(s >> one, e >> one):
            y0 = x[j << one] / d
            y1 = x[(j << one) | one] / d
            c0 = base
            c1 = base
            for k in range(_NTHR):  # constant trip count: unrolled and vectorised over j
                t = thr[k]
                w = step[k]
                c0 += w if y0 > t else np.float32(0.0)
                c1 += w if y1 > t else np.float32(0.0)
            packed[j] = np.uint8((np.int32(c0) << 4) | np.int32(c1))
        if (e - s) & one:  # odd tail of the last block: low nibble stays 0
            y0 = x[e - one] / d
            c0 = base
            for k in range(_NTHR):
                c0 += step[k] if y0 > thr[k] else np.float32(0.0)
            packed[e >> one] = np.uint8(np.int32(c0) << 4)


# ------------------------------------------------------------------ AVX-512: one lookup, 16 values
# Dequantizing is a lookup in a 16-entry table. Written as ``table[nibble]``, LLVM compiles it to one
# scalar load per value; a 16-entry float32 table fills exactly one 512-bit register, and AVX-512's
# ``vpermps`` picks 16 entries of it by 16 indices at once. ``lookup32`` turns 16 packed bytes into their
# 32 values with two of them. Numba compiles for the machine it runs on, so it is used only where Numba's
# code generator targets AVX-512 (``AVX512``); elsewhere the portable loop gives the same bits. It lives
# in this file on purpose: Numba's disk cache of a kernel is checked against its own file only, so an
# intrinsic edited in another file would leave stale machine code behind.


def _codegen_has(feature: str) -> bool:
    """Whether Numba's code generator targets ``feature`` (the host's, or the user's NUMBA_CPU_FEATURES)."""
    features = config.CPU_FEATURES if config.CPU_FEATURES is not None else get_host_cpu_features()
    return f"+{feature}" in str(features).split(",")


#: True where Numba generates AVX-512F code; calling ``lookup32`` elsewhere would fail to compile.
AVX512: bool = _codegen_has("avx512f")

_F32X16 = ir.VectorType(ir.FloatType(), 16)
_I32X16 = ir.VectorType(ir.IntType(32), 16)
_U8X16 = ir.VectorType(ir.IntType(8), 16)
# vpermps: result[k] = table[index[k] & 15]
_VPERMPS = ir.FunctionType(_F32X16, [_F32X16, _I32X16])
# byte k's two values go to out[2k] (high nibble) and out[2k + 1] (low nibble)
_FIRST_16 = ir.Constant(_I32X16, [i for k in range(8) for i in (k, 16 + k)])
_LAST_16 = ir.Constant(_I32X16, [i for k in range(8, 16) for i in (k, 16 + k)])


@intrinsic
def lookup32(typingctx: Any, table: Any, packed: Any, i: Any, out: Any, o: Any, scale: Any) -> Any:
    """out[o + 2k] = table[packed[i + k] >> 4] * scale, out[o + 2k + 1] = table[packed[i + k] & 15] * scale
    for k < 16 (float32 products, as a scalar loop gives them).

    ``table`` is a contiguous float32 array of 16 values; the caller keeps ``i + 16`` within ``packed`` and
    ``o + 32`` within ``out`` (nothing here checks bounds).
    """
    sig = nbtypes.void(table, packed, i, out, o, scale)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        table_a, packed_a, i_v, out_a, o_v, scale_v = args
        i_v = context.cast(builder, i_v, signature.args[2], nbtypes.intp)
        o_v = context.cast(builder, o_v, signature.args[4], nbtypes.intp)
        scale_v = context.cast(builder, scale_v, signature.args[5], nbtypes.float32)
        data = [context.make_array(signature.args[k])(context, builder, a).data
                for k, a in ((0, table_a), (1, packed_a), (3, out_a))]
        table_p, packed_p, out_p = data
        codes = builder.load(builder.bitcast(table_p, _F32X16.as_pointer()), align=4)
        byte = builder.load(builder.bitcast(builder.gep(packed_p, [i_v]), _U8X16.as_pointer()), align=1)
        wide = builder.zext(byte, _I32X16)
        high = builder.lshr(wide, ir.Constant(_I32X16, [4] * 16))
        low = builder.and_(wide, ir.Constant(_I32X16, [15] * 16))
        vpermps = cgutils.get_or_insert_function(builder.module, _VPERMPS, "llvm.x86.avx512.permvar.sf.512")
        high_v = builder.call(vpermps, [codes, high])
        low_v = builder.call(vpermps, [codes, low])
        one = builder.insert_element(ir.Constant(_F32X16, ir.Undefined), scale_v, ir.Constant(ir.IntType(32), 0))
        scale_x16 = builder.shuffle_vector(one, one, ir.Constant(_I32X16, [0] * 16))
        dst = builder.gep(out_p, [o_v])
        for part, mask in ((0, _FIRST_16), (16, _LAST_16)):
            values = builder.fmul(builder.shuffle_vector(high_v, low_v, mask), scale_x16)
            at = builder.gep(dst, [ir.Constant(ir.IntType(64), part)])
            builder.store(values, builder.bitcast(at, _F32X16.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@functools.lru_cache(maxsize=None)
def code_pairs(quant_type: str) -> np.ndarray:
    """(256, 2) float32: row q holds the codes of byte q's high and low nibble, in that order."""
    code = _CODES[quant_type]
    q = np.arange(256)
    # left writeable: Numba's dispatcher types a read-only array on a slow path (about 9 us a call)
    return np.stack([code[q >> 4], code[q & 15]], axis=1).astype(np.float32)


# Blocks per unit of work in _dequantize4_loop: 64 blocks of 64 values are 16 KiB of output, which stay in
# L1/L2 between the copy and the scaling, and give the parallel build enough units to share.
_DEQUANT_GROUP = 64


@njit(cache=True, inline="always")
def _absmax_from_code(code8, k, scale, offset):  # pragma: no cover - compiled
    """absmax_hat = float32(code8[k] * scale) + offset (``code8`` is DQ8_CODE): two float32 roundings, no
    fused multiply-add."""
    t = code8[k] * scale
    return t + offset


@njit(cache=True, inline="always")
def _block_absmax(b, absmax, codes, scale, offset):  # pragma: no cover - compiled
    """Block b's absmax: stored (``absmax``), or, where ``absmax`` is empty (double quantization), rebuilt
    from its 8-bit code: decoding inside the 4-bit loop saves a pass and an array per call."""
    if absmax.size:
        return absmax[b]
    return _absmax_from_code(DQ8_CODE, codes[b], scale[b // DQ_BLOCK_SIZE], offset)


def _dequantize4_loop(packed, absmax, codes, scale, offset, block, first, pairs, out):  # pragma: no cover - compiled
    """out[i] = code[nibble i] * absmax[first + i // block]; compiled twice below (parallel and serial).

    Each byte holds two codes, so ``pairs`` (``code_pairs``: row q = the codes of byte q's two nibbles)
    turns a byte into both its values with one 8-byte load and store; each block is then scaled in place
    by its absmax (a loop LLVM vectorises). Against one loop looking up and scaling each nibble, which
    compiled to scalar code, this ran 1.2-1.3x faster serially and 1.3-1.5x in the parallel build, with
    the same float32 products, so the same bits. ``out`` must be 8-byte aligned (``dequantize_4bit``
    sees to it) and ``block`` even (a power of two from 32). ``first``: the state's block that ``out``
    and ``packed`` start at (0 for a whole tensor; a row range of it starts further on).
    """
    n = out.size
    nb = (n + block - 1) // block
    pair = pairs.reshape(-1).view(np.uint64)  # a byte copy: the same on either endianness
    for g in prange((nb + _DEQUANT_GROUP - 1) // _DEQUANT_GROUP):  # a plain range in the serial build
        b0 = g * _DEQUANT_GROUP
        b1 = min(b0 + _DEQUANT_GROUP, nb)
        s = b0 * block  # even, so this group's values start on a byte
        e = min(b1 * block, n)
        h = (e - s) >> 1
        out64 = out[s: s + 2 * h].view(np.uint64)
        src = packed[s >> 1: (s >> 1) + h]
        for j in range(h):
            out64[j] = pair[src[j]]
        if (e - s) & 1:  # an odd number of values in all: the last byte's high nibble
            out[e - 1] = pairs[packed[e >> 1], 0]
        for b in range(b0, b1):
            a = _block_absmax(first + b, absmax, codes, scale, offset)
            values = out[b * block: min(b * block + block, n)]
            for i in range(values.size):
                values[i] *= a


def _njit_as(name: str, fn: Callable[..., None], **flags: bool) -> Any:
    """``njit(cache=True, nogil=True, **flags)`` of a copy of ``fn`` named ``name``.

    Numba's on-disk cache files a compiled function under its module, qualified name and first line,
    and its index keys on the signature and bytecode, never on the flags: two compilations of one
    function object (parallel and serial) would load each other's machine code from the cache. A
    copy under its own name gets its own cache file.
    """
    copy = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = name
    copy.__doc__ = fn.__doc__
    return njit(cache=True, nogil=True, **flags)(copy)


def _dequantize4_avx512_loop(packed, absmax, codes, scale, offset, block, first, table, out):  # pragma: no cover - compiled
    """out[i] = code[nibble i] * absmax[first + i // block] with ``lookup32`` (AVX-512): 32 values per instruction
    pair, the same float32 products as ``_dequantize4_loop``, so the same bits.

    ``table`` is the 16-entry code book (``code_table``). A step of 32 values starts at a multiple of
    32 and ``block`` is a power of two from 32, so a step never straddles two blocks; the tail of fewer
    than 32 values (all in the last block) is looked up one by one.
    """
    n = out.size
    steps = n // 32
    per_block = block // 32
    nb = (n + block - 1) // block
    for g in prange((nb + _DEQUANT_GROUP - 1) // _DEQUANT_GROUP):  # a plain range in the serial build
        for b in range(g * _DEQUANT_GROUP, min(g * _DEQUANT_GROUP + _DEQUANT_GROUP, nb)):
            a = _block_absmax(first + b, absmax, codes, scale, offset)
            for c in range(b * per_block, min(b * per_block + per_block, steps)):
                lookup32(table, packed, c * 16, out, c * 32, a)
    if steps * 32 < n:
        a = _block_absmax(first + nb - 1, absmax, codes, scale, offset)  # the tail lies in the last block
        for i in range(steps * 32, n):
            q = np.int64(packed[i >> 1])
            out[i] = table[(q >> 4) if (i & 1) == 0 else (q & 15)] * a


@functools.lru_cache(maxsize=None)
def code_table(quant_type: str) -> np.ndarray:
    """The 16-entry float32 code book as a contiguous array (writeable: see ``code_pairs``)."""
    return np.array(_CODES[quant_type], dtype=np.float32)


_dequantize4_kernel = _njit_as("_dequantize4_kernel", _dequantize4_loop, parallel=True)

# _dequantize4_kernel on the calling thread only (same loop, same result bit for bit). For callers
# that dequantize a modest tensor many times (a QLoRA layer, once per op): there the parallel
# region's start-up and thread wake-ups cost more than they save, and on a busy 2-core machine the
# region also waits for a second core (measured: a QLoRA step ~10% slower).
_dequantize4_serial_kernel = _njit_as("_dequantize4_serial_kernel", _dequantize4_loop)

# The AVX-512 loop in the same two builds; compiled on first use, and used only where Numba targets
# AVX-512 (``AVX512``).
_dequantize4_avx512_kernel = _njit_as("_dequantize4_avx512_kernel", _dequantize4_avx512_loop, parallel=True)
_dequantize4_avx512_serial_kernel = _njit_as("_dequantize4_avx512_serial_kernel", _dequantize4_avx512_loop)


@njit(cache=True, nogil=True)
def _quantize8_kernel(vals, offset, group, thr, codes, scale):  # pragma: no cover - compiled
    """codes = nearest DQ8 byte of (vals - offset) / d per group; scale = max|vals - offset|."""
    n = vals.size
    ng = scale.size
    nthr = thr.size
    for g in range(ng):
        s = g * group
        e = min(s + group, n)
        sc = np.float32(0.0)
        for i in range(s, e):
            v = abs(vals[i] - offset)
            if v > sc:
                sc = v
        scale[g] = sc
        d = sc if sc > np.float32(0.0) else np.float32(1.0)
        for i in range(s, e):
            u = (vals[i] - offset) / d
            # DQ8 is linear, so rint(127 u) + 127 is within one step of the answer; the exact
            # count of thresholds strictly below u is then found by walking the thresholds.
            k = np.int64(u * np.float32(127.0) + np.float32(127.5))
            k = min(max(k, 0), nthr)
            while k < nthr and u > thr[k]:
                k += 1
            while k > 0 and not (u > thr[k - 1]):
                k -= 1
            codes[i] = k


@njit(cache=True, nogil=True)
def _dequantize8_kernel(codes, scale, offset, group, code8, out):  # pragma: no cover - compiled
    """out[i] = float32(code8[codes[i]] * scale[i // group]) + offset (an argument, not the global
    DQ8_CODE: read as a frozen constant here the loop ran 1.6x slower)."""
    n = codes.size
    for g in range(scale.size):  # group by group: no integer division per value (3x faster)
        s = scale[g]
        for i in range(g * group, min(g * group + group, n)):
            out[i] = _absmax_from_code(code8, codes[i], s, offset)


# ----------------------------------------------------------------------------------- public API


def _as_float32(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"cannot quantize an array of dtype {x.dtype}; expected float32")
    return np.ascontiguousarray(x, dtype=np.float32)


def quantize_4bit(
    x, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False
) -> tuple[np.ndarray, QuantState]:
    """Blockwise 4-bit quantization: q = nearest(code, x / absmax_block), two codes per byte.

    Returns ``(packed, state)``: ``packed`` is uint8 of length ceil(n/2) (first value in the high
    nibble), ``state`` a :class:`QuantState`. Raises ValueError for a bad quant type or block size
    and for NaN/Inf in ``x``.
    """
    check_quant_type(quant_type)
    block = check_block_size(block_size)
    x = _as_float32(x)
    flat = x.reshape(-1)
    n = flat.size
    nb = _n_blocks(n, block)
    packed = np.empty((n + 1) // 2, dtype=np.uint8)
    absmax = np.empty(nb, dtype=np.float32)
    thr, step, base = _STEPS[quant_type]
    if n:
        _quantize4_kernel(flat, block, thr, step, base, packed, absmax)
        if not np.isfinite(absmax).all():
            raise ValueError("input to quantize_4bit contains NaN or Inf")
    state = QuantState(shape=tuple(x.shape), quant_type=quant_type, block_size=block, absmax=absmax)
    if double_quant:
        state = _double_quantize(state)
    return packed, state


def _double_quantize(state: QuantState) -> QuantState:
    absmax = state.absmax
    nb = absmax.size
    offset = absmax_offset(absmax)
    codes = np.empty(nb, dtype=np.uint8)
    scale = np.empty(_n_blocks(nb, DQ_BLOCK_SIZE), dtype=np.float32)
    _quantize8_kernel(absmax, offset, DQ_BLOCK_SIZE, _DQ8_THR, codes, scale)
    return state.with_double_quant(codes, scale, np.array(offset, dtype=np.float32))


def dequantize_absmax(state: QuantState) -> np.ndarray:
    """The per-block float32 absmax: stored, or rebuilt as DQ8_CODE[k] * scale + offset."""
    if state.absmax is not None:
        return np.ascontiguousarray(state.absmax)
    out = np.empty(state.absmax_codes.size, dtype=np.float32)
    offset = np.float32(state.absmax_offset.reshape(()))
    codes = np.ascontiguousarray(state.absmax_codes)
    scale = np.ascontiguousarray(state.absmax_scale)
    _dequantize8_kernel(codes, scale, offset, DQ_BLOCK_SIZE, DQ8_CODE, out)
    return out


# the arrays a kernel gets for the absmax representation a state does not use
_NO_CODES = np.empty(0, dtype=np.uint8)
_NO_SCALE = np.empty(0, dtype=np.float32)


def check_rows(state: QuantState, rows: tuple[int, int]) -> tuple[int, int]:
    """(first value, number of values) of rows r0:r1 of a 2-D state; ValueError unless the range is within
    the rows and starts on a block boundary (so it dequantizes on its own)."""
    r0, r1 = (int(r) for r in rows)
    if len(state.shape) != 2 or not 0 <= r0 < r1 <= state.shape[0]:
        raise ValueError(f"rows {rows} are not a non-empty row range of a 2-D state of shape {state.shape}")
    n_in = int(state.shape[1])
    if (r0 * n_in) % state.block_size:
        raise ValueError(f"rows {rows} start inside a block of {state.block_size} values (shape {state.shape})")
    return r0 * n_in, (r1 - r0) * n_in


def dequantize_4bit(
    packed: np.ndarray, state: QuantState, out: np.ndarray | None = None, validate: bool = True,
    serial: bool = False, rows: tuple[int, int] | None = None,
) -> np.ndarray:
    """x_hat = code[q] * absmax_block as float32 of ``state.shape``, written into ``out`` if given.

    ``validate=False`` skips the checks of ``state`` and ``packed`` (about 20 us a call), for a caller
    that dequantizes the same already-validated arrays every step (a QLoRA layer's forward);
    ``serial=True`` runs on the calling thread only (``_dequantize4_serial_kernel``). ``rows=(r0, r1)``:
    only those rows of a 2-D state (r0 * in on a block boundary), as a (r1 - r0, in) array: a big
    weight's row chunk, its absmax decoded in the loop like a whole tensor's, not in a pass of its own.
    """
    if validate:
        state.validate()
        check_packed(packed, state)
    v0, n = (0, state.n) if rows is None else check_rows(state, rows)
    shape = tuple(state.shape) if rows is None else (n // int(state.shape[1]), int(state.shape[1]))
    given = out is not None
    if out is None:
        out = np.empty(shape, dtype=np.float32)  # NumPy's allocations are aligned well past 8 bytes
    elif (
        not isinstance(out, np.ndarray)
        or out.dtype != np.float32
        or out.shape != shape
        or not out.flags.c_contiguous
        or not out.flags.writeable
    ):
        raise ValueError(
            f"out must be a writeable C-contiguous float32 array of shape {shape}, got "
            f"{getattr(out, 'dtype', type(out))} of shape {getattr(out, 'shape', None)}"
        )
    if n:
        if state.absmax is not None:
            absmax, codes, scale, offset = np.ascontiguousarray(state.absmax), _NO_CODES, _NO_SCALE, np.float32(0)
        else:  # double quantization: the kernel rebuilds each block's absmax itself
            absmax, codes, scale = _NO_SCALE, np.ascontiguousarray(state.absmax_codes), np.ascontiguousarray(state.absmax_scale)
            offset = np.float32(state.absmax_offset.reshape(()))
        # O(1) size checks even without ``validate``: the compiled loops index without bounds checks
        nb = _n_blocks(state.n, state.block_size)
        fits = absmax.size == nb if absmax.size else (codes.size == nb and scale.size == _n_blocks(nb, DQ_BLOCK_SIZE))
        if not fits or np.size(packed) < (state.n + 1) // 2:
            raise ValueError(f"packed codes or absmax arrays do not fit a QuantState of shape {state.shape}")
        flat = out.reshape(-1)
        first = v0 // state.block_size
        packed = np.ascontiguousarray(packed[v0 // 2: (v0 + n + 1) // 2])  # v0 is a block start, so even
        if AVX512:
            kernel = _dequantize4_avx512_serial_kernel if serial else _dequantize4_avx512_kernel
            kernel(packed, absmax, codes, scale, offset, state.block_size, first,
                   code_table(state.quant_type), flat)
            return out
        kernel = _dequantize4_serial_kernel if serial else _dequantize4_kernel
        # the kernel stores value pairs as 8-byte words: an ``out`` that starts mid-word gets a copy
        mid_word = given and flat.size > 1 and not flat[:2].view(np.uint64).flags.aligned
        aligned = np.empty(flat.size, dtype=np.float32) if mid_word else flat
        kernel(packed, absmax, codes, scale, offset, state.block_size, first, code_pairs(state.quant_type), aligned)
        if aligned is not flat:
            flat[...] = aligned
    return out
