"""Blockwise 4-bit quantization kernels: the Numba kernels (kernels.quant) against the NumPy reference
(kernels.quant_ref), bit for bit, plus the properties both must have on their own."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minitorch_peft.kernels import quant as Q
from minitorch_peft.kernels import quant_ref as R

IMPLS = [pytest.param(Q, id="numba"), pytest.param(R, id="numpy_ref")]

# bitsandbytes' code books, typed in from its get_4bit_type (NF4 as is; FP4 before dividing by 12)
BNB_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
BNB_FP4_RAW = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
# the widest gap between neighbouring code values: NF4 -1 .. -0.6961928, FP4 (12 - 8) / 12
WIDEST_GAP = {"nf4": 1.0 - 0.6961928009986877, "fp4": 4.0 / 12.0}
MLP_SHAPES = [(512, 784), (256, 512), (10, 256)]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN == NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _assert_same_result(x, quant_type, block_size, double_quant):
    p1, s1 = Q.quantize_4bit(x, quant_type, block_size, double_quant)
    p2, s2 = R.quantize_4bit(x, quant_type, block_size, double_quant)
    assert _same(p1, p2)
    a1, a2 = s1.arrays(), s2.arrays()
    assert a1.keys() == a2.keys()
    for k in a1:
        assert _same(a1[k], a2[k]), k
    d1, d2 = Q.dequantize_4bit(p1, s1), R.dequantize_4bit(p2, s2)
    assert _same(d1, d2)
    return p1, s1, d1


def _unpack(packed: np.ndarray, n: int) -> np.ndarray:
    q = np.empty(2 * packed.size, np.uint8)
    q[0::2], q[1::2] = packed >> 4, packed & 15
    return q[:n]


# ------------------------------------------------------------------------------------ code books


def test_widest_gaps():
    for name, raw in (("nf4", BNB_NF4), ("fp4", np.array(BNB_FP4_RAW) / 12)):
        assert np.isclose(np.diff(np.unique(raw)).max(), WIDEST_GAP[name], rtol=1e-12)


def test_code_books_are_the_bitsandbytes_values():
    nf4 = np.array(BNB_NF4, dtype=np.float32)
    fp4 = np.array(BNB_FP4_RAW, dtype=np.float32) / np.float32(12)
    for mod in (Q, R):
        assert _same(mod.NF4_CODE, nf4)
        assert _same(mod.FP4_CODE, fp4)
    assert Q.FP4_CODE[3] == 1.0 and Q.FP4_CODE[11] == -1.0 and Q.FP4_CODE[5] == 0.5
    assert np.signbit(Q.FP4_CODE[8]) and Q.FP4_CODE[8] == 0.0  # bnb's -0 code is kept
    assert _same(Q.DQ8_CODE, R.DQ8_CODE) and Q.DQ8_CODE.size == 255
    assert Q.DQ8_CODE[0] == -1.0 and Q.DQ8_CODE[127] == 0.0 and Q.DQ8_CODE[254] == 1.0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_kernel_tables_pick_the_nearest_code_with_ties_to_the_lower_index(quant_type):
    code = Q.NF4_CODE if quant_type == "nf4" else Q.FP4_CODE
    thr, step, base = Q.kernel_tables(quant_type)
    # every code value, every exact midpoint between sorted neighbours, and their float32 neighbours
    vals = np.unique(code.astype(np.float64))
    mids = (vals[:-1] + vals[1:]) / 2
    probes = [code, mids.astype(np.float32), np.random.default_rng(0).uniform(-1, 1, 4000)]
    y = np.concatenate([np.asarray(p, np.float32) for p in probes])
    y = np.concatenate([y, np.nextafter(y, np.float32(2)), np.nextafter(y, np.float32(-2))])
    got = base + ((y[:, None] > thr[None, :]) * step[None, :]).sum(axis=1)
    want = R.nearest_index(y, code)
    assert np.array_equal(got.astype(np.int64), want.astype(np.int64))


@pytest.mark.parametrize("impl", IMPLS)
def test_exact_ties_go_to_the_lower_index(impl):
    # halfway between 0.0 and the smallest positive NF4 code: c / 2 is exact in float32
    c = Q.NF4_CODE[8]
    packed, _ = impl.quantize_4bit(np.array([1.0, c / 2, Q.NF4_CODE[6] / 2, c], np.float32), "nf4", 32)
    assert list(_unpack(packed, 4)) == [15, 7, 6, 8]  # 0.0 (index 7) beats c (8); -0.091 (6) beats 0 (7)
    # FP4: halfway between 0 (index 0) and +-0.0052 (indices 1 and 9): index 0 both ways; 0 and -0 -> 0
    f = Q.FP4_CODE[1]
    x = np.array([1.0, f / 2, -f / 2, -0.0, 0.0], np.float32)
    packed, _ = impl.quantize_4bit(x, "fp4", 32)
    assert list(_unpack(packed, 5)) == [3, 0, 0, 0, 0]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_normalisation_is_a_float32_division_right_at_the_thresholds(impl, quant_type):
    # values within a few ulps of threshold * absmax: here x / d and x * (1 / d) round differently
    # often enough that a reciprocal, a float64 or a fused normalisation would pick other codes
    code = Q.NF4_CODE if quant_type == "nf4" else Q.FP4_CODE
    thr = Q.kernel_tables(quant_type)[0]
    thr = thr[np.isfinite(thr)]
    rng = np.random.default_rng(11)
    d = rng.uniform(0.3, 7.0, 64).astype(np.float32)
    base = (thr[None, :, None] * d[:, None, None]).astype(np.float32)  # (64 blocks, 15, 1)
    ulps = np.arange(-3, 4, dtype=np.int32)[None, None, :]
    x = (base.view(np.int32) + np.sign(base).astype(np.int32) * ulps).view(np.float32)
    x = x.reshape(64, -1)
    x = np.concatenate([x, d[:, None]], axis=1)  # put each block's absmax in the block
    x = np.pad(x, ((0, 0), (0, 128 - x.shape[1]))).reshape(-1)
    packed, state = impl.quantize_4bit(x, quant_type, 128)
    assert np.array_equal(state.absmax, d)
    y = (x.reshape(64, 128) / d[:, None]).reshape(-1)  # float32 / float32: the documented rule
    assert np.array_equal(_unpack(packed, x.size), R.nearest_index(y, code))
    recip = (x.reshape(64, 128) * (np.float32(1) / d)[:, None]).reshape(-1)
    assert not np.array_equal(R.nearest_index(recip, code), R.nearest_index(y, code))  # not vacuous


# ------------------------------------------------------------------------------------ layout


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_puts_the_first_value_in_the_high_nibble(impl):
    code = Q.NF4_CODE
    idx = np.array([15, 3, 12, 0, 7, 9, 1], np.uint8)  # 15 and 0 fix absmax = 2.5 exactly
    x = code[idx] * np.float32(2.5)
    packed, state = impl.quantize_4bit(x, "nf4", 64)
    assert packed.dtype == np.uint8 and packed.shape == (4,)
    assert list(packed) == [0xF3, 0xC0, 0x79, 0x10]  # odd n: the last low nibble is 0
    assert state.absmax[0] == np.float32(2.5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [32, 64, 4096])
def test_values_on_code_points_round_trip_exactly(impl, quant_type, block_size):
    code = Q.NF4_CODE if quant_type == "nf4" else Q.FP4_CODE
    rng = np.random.default_rng(block_size)
    n = 3 * block_size + 5
    idx = rng.integers(0, 16, n).astype(np.uint8)
    top = 15 if quant_type == "nf4" else 3  # the +1.0 code: every block's absmax is its scale
    idx[::block_size] = top
    scales = rng.uniform(0.01, 50, -(-n // block_size)).astype(np.float32)
    x = code[idx] * np.repeat(scales, block_size)[:n]
    packed, state = impl.quantize_4bit(x, quant_type, block_size)
    want = idx.copy()
    if quant_type == "fp4":
        want[want == 8] = 0  # -0 and +0 are the same value: the lower index
    assert np.array_equal(_unpack(packed, n), want)
    assert np.array_equal(state.absmax, scales)
    assert np.array_equal(impl.dequantize_4bit(packed, state), x)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_is_within_half_the_widest_gap(impl, quant_type, double_quant):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((37, 101)) * rng.uniform(0.1, 10, (37, 1))).astype(np.float32)
    packed, state = impl.quantize_4bit(x, quant_type, 64, double_quant)
    x_hat = impl.dequantize_4bit(packed, state)
    flat, err = x.reshape(-1), np.abs(x - x_hat).reshape(-1)
    absmax = np.abs(np.pad(flat, (0, (-flat.size) % 64))).reshape(-1, 64).max(axis=1)
    bound = np.repeat(absmax, 64)[: flat.size] * (WIDEST_GAP[quant_type] / 2 + 1e-6)
    if double_quant:  # + the error of the rebuilt absmax, at most half a DQ8 step of its group
        a_hat = impl.dequantize_absmax(state)
        a_err = np.abs(a_hat - absmax)
        scale = np.repeat(state.absmax_scale, 256)[: absmax.size]
        assert np.all(a_err <= scale / 254 * (1 + 1e-5) + 1e-6 * absmax)
        bound = bound + np.repeat(a_err, 64)[: flat.size]
    assert np.all(err <= bound)
    assert err.max() > 0  # not vacuous: the data is not on code points


# ------------------------------------------------------------------------------------ numba == numpy


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    block_size=st.sampled_from([32, 64, 128, 256, 4096]),
    double_quant=st.booleans(),
)
@pytest.mark.slow
def test_numba_kernel_matches_numpy_reference_bit_for_bit(data, quant_type, block_size, double_quant):
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=40), label="shape")
    elements = st.one_of(
        st.floats(-4, 4, width=32),
        st.floats(width=32, allow_nan=False, allow_infinity=False),  # subnormals to 3.4e38
        st.just(0.0),
    )
    x = data.draw(hnp.arrays(np.float32, shape, elements=elements), label="x")
    _assert_same_result(x, quant_type, block_size, double_quant)


def test_many_blocks_and_double_quant_groups_match_reference():
    # 300 * 64 + 17 values: 301 blocks, two double-quant groups, a partial block, odd n
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(300 * 64 + 17) * np.repeat(rng.uniform(0.1, 9, 301), 64)[: 300 * 64 + 17])
    for quant_type in ("nf4", "fp4"):
        _assert_same_result(x.astype(np.float32), quant_type, 64, True)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.slow
def test_784_wide_rows_use_the_flat_c_order_layout(quant_type, double_quant):
    # 784 is not a multiple of 64: blocks straddle rows, so the layout must be the flat one
    x = np.random.default_rng(3).standard_normal((2048, 784)).astype(np.float32)
    x[5] *= 40.0  # one loud row: the absmax of the blocks it touches shows where blocks lie
    packed, state, x_hat = _assert_same_result(x, quant_type, 64, double_quant)
    flat = x.reshape(-1)
    want = np.abs(flat.reshape(-1, 64)).max(axis=1)
    if not double_quant:
        assert np.array_equal(state.absmax, want)
    else:
        assert np.allclose(Q.dequantize_absmax(state), want, rtol=0, atol=want.max() / 200)
    assert packed.size == 2048 * 784 // 2 and x_hat.shape == (2048, 784)
    assert state.n_blocks == 2048 * 784 // 64  # not 2048 * ceil(784 / 64): no per-row padding
    assert np.abs(x_hat[5]).max() > 10 * np.abs(x_hat[7]).max()


# ------------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_single_element_and_odd_partial_blocks(impl, double_quant):
    packed, state = impl.quantize_4bit(np.array([-2.5], np.float32), "nf4", 64, double_quant)
    assert packed.shape == (1,) and packed[0] == 0x00  # code 0 (-1.0) in the high nibble, 0 pad
    assert state.n_blocks == 1 and state.shape == (1,)
    assert impl.dequantize_4bit(packed, state)[0] == np.float32(-2.5)
    for n in (31, 33, 63, 65, 127, 129):
        x = np.linspace(-1, 1, n, dtype=np.float32)
        packed, state = impl.quantize_4bit(x, "nf4", 32, double_quant)
        assert packed.size == (n + 1) // 2 and state.n_blocks == -(-n // 32)
        x_hat = impl.dequantize_4bit(packed, state)
        assert x_hat.shape == (n,) and np.abs(x - x_hat).max() <= 0.15
        assert abs(x_hat[-1] - 1.0) < 1e-2  # the partial last block is quantized, not dropped


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_all_zero_blocks_dequantize_to_exact_zeros(impl, quant_type, double_quant):
    x = np.zeros((4, 64), np.float32)
    x[1] = np.random.default_rng(0).standard_normal(64)
    x[3, :7] = 0.5
    packed, state = impl.quantize_4bit(x, quant_type, 64, double_quant)
    if not double_quant:
        assert state.absmax[0] == 0.0 and state.absmax[2] == 0.0
    x_hat = impl.dequantize_4bit(packed, state)
    assert not np.isnan(x_hat).any()
    assert np.all(x_hat[0] == 0.0) and np.all(x_hat[2] == 0.0) and np.all(x_hat[3, 7:] == 0.0)
    assert np.any(x_hat[1] != 0.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_tensor(impl):
    packed, state = impl.quantize_4bit(np.zeros((0, 5), np.float32), "nf4", 64, True)
    assert packed.size == 0 and state.n_blocks == 0
    assert impl.dequantize_4bit(packed, state).shape == (0, 5)


@pytest.mark.parametrize("impl", IMPLS)
def test_dequantize_writes_into_out(impl):
    x = np.random.default_rng(2).standard_normal((3, 70)).astype(np.float32)
    packed, state = impl.quantize_4bit(x, "nf4", 32, True)
    out = np.full((3, 70), np.nan, np.float32)
    res = impl.dequantize_4bit(packed, state, out=out)
    assert res is out and _same(out, impl.dequantize_4bit(packed, state))
    for bad in (np.empty((3, 71), np.float32), np.empty((3, 70), np.float64), np.empty(210, np.float32)):
        with pytest.raises(ValueError, match="out"):
            impl.dequantize_4bit(packed, state, out=bad)


@pytest.fixture(params=["avx512", "portable"])
def lookup(request, monkeypatch):
    """Runs a test through each 4-bit lookup loop that this machine can compile (``dequantize_4bit``
    picks the AVX-512 one wherever Numba targets AVX-512)."""
    if request.param == "avx512" and not Q.AVX512:
        pytest.skip("Numba does not generate AVX-512 code on this machine")
    monkeypatch.setattr(Q, "AVX512", request.param == "avx512")
    return request.param


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("block_size", [32, 64, 4096])
# tails shorter than one 32-value step, odd counts, and several groups of 64 blocks
@pytest.mark.parametrize("n", [1, 2, 31, 32, 33, 95, 4096 + 31, 64 * 64 * 3 + 33])
def test_each_lookup_loop_matches_the_reference_bit_for_bit(lookup, quant_type, block_size, n):
    x = np.random.default_rng(n + block_size).standard_normal(n).astype(np.float32) * 3
    x[::7] = 0.0  # zero codes, and FP4's signed zero
    packed, state = Q.quantize_4bit(x, quant_type, block_size, double_quant=n % 2 == 1)
    ref = R.dequantize_4bit(packed, state)
    assert _same(Q.dequantize_4bit(packed, state), ref)
    assert _same(Q.dequantize_4bit(packed, state, serial=True), ref)


@pytest.mark.parametrize("serial", [False, True])
@pytest.mark.parametrize("n", [1, 63, 4097, 64 * 64 * 3 + 33])  # odd tails; several groups of 64 blocks
def test_dequantize_into_an_out_that_starts_mid_word_matches_the_reference(lookup, n, serial):
    """The kernel writes value pairs as 8-byte words; an ``out`` 4 bytes past a word boundary (a slice of a
    bigger buffer) still gets exactly the reference's values."""
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    packed, state = Q.quantize_4bit(x, "nf4", 64, True)
    buf = np.full(n + 2, np.nan, np.float32)
    out = buf[1:n + 1] if buf.ctypes.data % 8 == 0 else buf[2:n + 2]
    assert out.ctypes.data % 8 == 4
    assert Q.dequantize_4bit(packed, state, out=out, serial=serial) is out
    assert _same(out, R.dequantize_4bit(packed, state))


@pytest.mark.parametrize("quant_type,dq", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("shape,block,spans", [
    # 784 = 12.25 blocks of 64 a row: ranges start every 4 rows, and past the first group of 256 blocks
    ((600, 784), 64, [(0, 600), (4, 8), (332, 600), (596, 600), (100, 101), (0, 4)]),
    ((64, 33), 32, [(32, 64), (32, 63), (0, 32)]),  # an odd number of values: the last byte's high nibble
    ((3, 4096), 4096, [(1, 3), (2, 3)]),
])
def test_a_row_range_gives_those_rows_of_the_whole_bit_for_bit(lookup, quant_type, dq, shape, block, spans):
    """rows=(r0, r1) decodes each block's absmax in the loop from the state's own arrays, starting at block
    r0 * in / block: the bits of the whole tensor's rows r0:r1, in either build."""
    x = np.random.default_rng(shape[0]).standard_normal(shape).astype(np.float32) * 3
    packed, state = Q.quantize_4bit(x, quant_type, block, dq)
    whole = Q.dequantize_4bit(packed, state)
    for r0, r1 in spans:
        for serial in (False, True):
            assert _same(Q.dequantize_4bit(packed, state, serial=serial, rows=(r0, r1)), whole[r0:r1])
        out = np.full((r1 - r0, shape[1]), np.nan, np.float32)
        assert Q.dequantize_4bit(packed, state, out, False, True, (r0, r1)) is out and _same(out, whole[r0:r1])


def test_a_row_range_is_checked() -> None:
    packed, state = Q.quantize_4bit(np.ones((8, 40), np.float32), "nf4", 64, True)
    for rows, what in [((1, 3), "inside a block"), ((0, 9), "row range"), ((3, 3), "row range"), ((-8, 2), "row range")]:
        with pytest.raises(ValueError, match=what):
            Q.dequantize_4bit(packed, state, rows=rows)
    with pytest.raises(ValueError, match=r"shape \(2, 40\)"):
        Q.dequantize_4bit(packed, state, np.empty((8, 40), np.float32), rows=(0, 2))  # out must fit the rows
    p1, s1 = Q.quantize_4bit(np.ones(80, np.float32), "nf4", 64)
    with pytest.raises(ValueError, match="2-D"):
        Q.dequantize_4bit(p1, s1, rows=(0, 1))


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 1001])
def test_serial_dequantize_matches_the_parallel_one_bit_for_bit(lookup, n):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    packed, state = Q.quantize_4bit(x, "fp4", 32, True)
    assert _same(Q.dequantize_4bit(packed, state, serial=True), Q.dequantize_4bit(packed, state))


def test_dequantize_twins_are_compiled_apart_with_their_own_cache_files():
    """One loop compiled twice: Numba's disk cache keys on the function's name, not on its flags, so
    the twins need their own names, or the serial one would load the parallel machine code."""
    for par, ser in (
        (Q._dequantize4_kernel, Q._dequantize4_serial_kernel),
        (Q._dequantize4_avx512_kernel, Q._dequantize4_avx512_serial_kernel),
    ):
        assert par.targetoptions.get("parallel") is True and not ser.targetoptions.get("parallel")
        assert par._cache._cache_file._index_name != ser._cache._cache_file._index_name


def test_readonly_and_non_float32_inputs():
    x = np.random.default_rng(4).standard_normal((9, 13))
    ro = x.astype(np.float32)
    ro.setflags(write=False)
    p1, s1 = Q.quantize_4bit(ro)
    p2, s2 = Q.quantize_4bit(x)  # float64 is cast to float32 first
    p3, s3 = Q.quantize_4bit(np.asfortranarray(ro))  # flattened in C order whatever the layout
    assert _same(p1, p2) and _same(p1, p3) and _same(s1.absmax, s2.absmax)
    with pytest.raises(TypeError):
        Q.quantize_4bit(x.astype(np.complex64))


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("block_size", [0, 16, 31, 48, 100, 8192, 64.0, True, "64", -64])
def test_bad_block_size_raises(impl, block_size):
    with pytest.raises(ValueError, match=r"block_size=.*power of two from 32 to 4096") as e:
        impl.quantize_4bit(np.ones(64, np.float32), "nf4", block_size)
    assert repr(block_size) in str(e.value)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("quant_type", ["int4", "NF4", "", None])
def test_bad_quant_type_raises(impl, quant_type):
    with pytest.raises(ValueError, match="quant_type"):
        impl.quantize_4bit(np.ones(64, np.float32), quant_type)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 63, 64, 130])  # first block, block end, next block, odd tail
def test_nan_or_inf_input_raises(impl, bad, where):
    x = np.random.default_rng(0).standard_normal(131).astype(np.float32)
    x[where] = bad
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        impl.quantize_4bit(x, "nf4", 64, True)


def _corruptions(packed, state):
    """(name, packed, arrays) triples that each must be refused."""
    a = state.arrays()

    def with_(**kw):
        d = dict(a)
        d.update(kw)
        return {k: v for k, v in d.items() if v is not None}

    yield "short packed", packed[:-1], a
    yield "long packed", np.concatenate([packed, packed[:1]]), a
    yield "packed dtype", packed.astype(np.int16), a
    yield "shape", packed, with_(shape=np.array([3, 71], np.int64))
    yield "meta version", packed, with_(meta=a["meta"] + np.array([1, 0, 0, 0, 0]))
    yield "quant type id", packed, with_(meta=a["meta"] * np.array([1, 0, 1, 1, 1]) + np.array([0, 7, 0, 0, 0]))
    yield "block size", packed, with_(meta=a["meta"] * np.array([1, 1, 0, 1, 1]) + np.array([0, 0, 48, 0, 0]))
    yield "no shape", packed, with_(shape=None)
    if "absmax" in a:
        yield "absmax length", packed, with_(absmax=a["absmax"][:-1])
        yield "absmax dtype", packed, with_(absmax=a["absmax"].astype(np.float64))
        yield "absmax nan", packed, with_(absmax=np.where(np.arange(a["absmax"].size) == 1, np.nan, a["absmax"]).astype(np.float32))
        yield "no absmax", packed, with_(absmax=None)
    else:
        yield "codes length", packed, with_(absmax_codes=a["absmax_codes"][1:])
        yield "codes > 254", packed, with_(absmax_codes=np.full_like(a["absmax_codes"], 255))
        yield "scale length", packed, with_(absmax_scale=np.ones(2, np.float32))
        yield "scale inf", packed, with_(absmax_scale=np.full_like(a["absmax_scale"], np.inf))
        yield "offset dtype", packed, with_(absmax_offset=a["absmax_offset"].astype(np.float64))
        yield "no offset", packed, with_(absmax_offset=None)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_corrupted_state_raises_one_clear_error(impl, double_quant):
    x = np.random.default_rng(5).standard_normal((3, 70)).astype(np.float32)
    packed, state = impl.quantize_4bit(x, "fp4", 32, double_quant)
    impl.dequantize_4bit(packed, Q.QuantState.from_arrays(state.arrays()))  # the intact one loads
    seen = 0
    for name, bad_packed, arrays in _corruptions(packed, state):
        with pytest.raises(ValueError) as e:
            impl.dequantize_4bit(bad_packed, Q.QuantState.from_arrays(arrays))
        assert "corrupted" in str(e.value) or "packed" in str(e.value) or "block_size" in str(e.value), name
        seen += 1
    assert seen >= 12


@pytest.mark.parametrize("double_quant", [False, True])
def test_npz_round_trip_is_bit_exact(tmp_path, double_quant):
    x = np.random.default_rng(6).standard_normal((33, 65)).astype(np.float32)
    packed, state = Q.quantize_4bit(x, "nf4", 64, double_quant)
    path = tmp_path / "w.npz"
    np.savez(path, packed=packed, **state.arrays())
    with np.load(path, allow_pickle=False) as f:
        packed2 = f["packed"]
        state2 = Q.QuantState.from_arrays(f)
    assert _same(packed, packed2)
    a, a2 = state.arrays(), state2.arrays()
    assert a.keys() == a2.keys() and all(_same(a[k], a2[k]) for k in a)
    assert state2.shape == (33, 65) and state2.double_quant == double_quant
    assert _same(Q.dequantize_4bit(packed2, state2), Q.dequantize_4bit(packed, state))


# ------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize("impl", IMPLS)
def test_bytes_for_the_784_512_256_10_mlp(impl):
    ws = [np.random.default_rng(i).standard_normal(s).astype(np.float32) for i, s in enumerate(MLP_SHAPES)]
    assert sum(w.size for w in ws) == 535_040
    assert sum(w.nbytes for w in ws) == 2_140_160
    plain = [impl.quantize_4bit(w, "nf4", 64) for w in ws]
    assert sum(p.nbytes + s.nbytes() for p, s in plain) == 300_960
    dq = [impl.quantize_4bit(w, "nf4", 64, double_quant=True) for w in ws]
    assert sum(p.nbytes + s.nbytes() for p, s in dq) == 276_028
    # ~4.127 bits per parameter (+ 32 bits per tensor for the offset)
    bits = 8 * sum(p.nbytes + s.nbytes() for p, s in dq) / 535_040
    assert 4.12 < bits < 4.13
    for (p, s), w in zip(dq, ws):
        assert s.absmax is None and s.absmax_codes.dtype == np.uint8
        assert s.absmax_scale.dtype == np.float32 and s.absmax_scale.size == -(-s.n_blocks // 256)
        assert s.absmax_offset.dtype == np.float32 and s.absmax_offset.size == 1


@pytest.mark.parametrize("double_quant", [False, True])
def test_unvalidated_dequantize_still_refuses_arrays_too_short_for_the_shape(double_quant):
    """validate=False skips the O(n) checks, never the sizes: the compiled loops do not check bounds."""
    packed, state = Q.quantize_4bit(np.ones(64 * 300, np.float32), "nf4", 64, double_quant)
    with pytest.raises(ValueError, match="do not fit"):
        Q.dequantize_4bit(packed[:-1], state, validate=False)
    if double_quant:
        short = state.with_double_quant(state.absmax_codes[:-1], state.absmax_scale, state.absmax_offset)
    else:
        short = Q.QuantState(shape=state.shape, quant_type="nf4", block_size=64, absmax=state.absmax[:-1])
    with pytest.raises(ValueError, match="do not fit"):
        Q.dequantize_4bit(packed, short, validate=False)
