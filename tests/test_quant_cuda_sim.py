"""The numba.cuda quantization kernels (kernels.quant_cuda) under Numba's CUDA simulator, against the
CPU kernels bit for bit. The simulator must be switched on before Numba is imported, so the checks
run in a fresh interpreter with NUMBA_ENABLE_CUDASIM=1; shapes stay small (a Python thread per GPU
thread)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    r'''
    import sys
    try:
        from numba import config, cuda
        assert config.ENABLE_CUDASIM, "NUMBA_ENABLE_CUDASIM was not picked up"
        assert cuda.is_available(), "no simulated device"
    except Exception as e:  # pragma: no cover - depends on the Numba build
        print(f"SKIP numba.cuda simulator unavailable: {e!r}")
        sys.exit(0)

    import numpy as np
    from minitorch_peft.kernels import quant as Q, quant_cuda as C

    def same(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()

    rng = np.random.default_rng(0)
    cases = 0
    for shape, block in [((1,), 32), ((3,), 32), ((65,), 32), ((5, 13), 64), ((2, 150), 32), ((), 64)]:
        x = (rng.standard_normal(shape) * rng.uniform(0.1, 20)).astype(np.float32)
        if x.size > 64:
            x.reshape(-1)[:32] = 0.0  # an all-zero block
        for quant_type in ("nf4", "fp4"):
            for dq in (False, True):
                p1, s1 = Q.quantize_4bit(x, quant_type, block, dq)
                p2, s2 = C.quantize_4bit(x, quant_type, block, dq)
                assert same(p1, p2), (shape, quant_type, dq, p1, p2)
                a1, a2 = s1.arrays(), s2.arrays()
                assert a1.keys() == a2.keys()
                for k in a1:
                    assert same(a1[k], a2[k]), (shape, quant_type, dq, k, a1[k], a2[k])
                d1 = Q.dequantize_4bit(p1, s1)
                out = np.full(s2.shape, np.nan, np.float32)
                d2 = C.dequantize_4bit(p2, s2, out=out)
                assert d2 is out and same(d1, d2), (shape, quant_type, dq)
                assert not np.isnan(d2).any()
                cases += 1

    # the double-quant kernels over 600 absmax values (3 groups of 256, the last partial)
    absmax = rng.uniform(0.5, 3.0, 600) * np.repeat([1.0, 4.0, 0.25], 256)[:600]
    absmax[[3, 300]] = 0.0  # all-zero blocks
    absmax = absmax.astype(np.float32)
    st = Q.QuantState(shape=(600 * 32,), quant_type="nf4", block_size=32, absmax=absmax)
    d1, d2 = Q._double_quantize(st), C._double_quantize(st, np)
    for k in ("absmax_codes", "absmax_scale", "absmax_offset"):
        assert same(getattr(d1, k), getattr(d2, k)), k
    assert same(Q.dequantize_absmax(d1), C.dequantize_absmax(d2))
    err = np.abs(C.dequantize_absmax(d2) - absmax)  # at most half a DQ8 step of the group's scale
    assert np.all(err <= np.repeat(d2.absmax_scale, 256)[:600] / 254 * 1.0001 + 1e-6), err.max()
    cases += 1

    # a row range: the whole kernel over the range's codes and its blocks' absmax (300 blocks: two
    # double-quant groups, the range starting inside the first)
    x = rng.standard_normal((300, 32)).astype(np.float32)
    for dq in (False, True):
        p1, s1 = Q.quantize_4bit(x, "nf4", 32, dq)
        p2, s2 = C.quantize_4bit(x, "nf4", 32, dq)
        for rows in ((100, 300), (0, 1), (255, 257)):
            assert same(Q.dequantize_4bit(p1, s1, rows=rows), C.dequantize_4bit(p2, s2, rows=rows)), (dq, rows)
        cases += 1

    # exact ties go to the lower index, as on the CPU
    c = Q.NF4_CODE[8]
    p, _ = C.quantize_4bit(np.array([1.0, c / 2, Q.NF4_CODE[6] / 2, c], np.float32), "nf4", 32)
    assert list(p) == [0xF7, 0x68], [hex(v) for v in p]

    for bad in (np.nan, np.inf):
        y = np.ones(70, np.float32)
        y[69] = bad
        try:
            C.quantize_4bit(y, "nf4", 32)
        except ValueError as e:
            assert "NaN or Inf" in str(e)
        else:
            raise AssertionError("NaN/Inf was not refused")
    try:
        C.quantize_4bit(np.ones(64, np.float32), "nf4", 48)
    except ValueError as e:
        assert "block_size=48" in str(e)
    else:
        raise AssertionError("block size 48 was not refused")
    try:
        C.dequantize_4bit(p2[:-1], s2)
    except ValueError as e:
        assert "packed" in str(e)
    else:
        raise AssertionError("short packed codes were not refused")
    print(f"OK {cases} cases")
    '''
)


@pytest.mark.slow
def test_cuda_kernels_match_cpu_under_the_simulator():
    env = dict(os.environ)
    env["NUMBA_ENABLE_CUDASIM"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    if proc.returncode == 0 and proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, out
    assert "OK 27 cases" in proc.stdout, out


@pytest.mark.slow
def test_importing_the_quant_modules_does_not_import_numba_cuda():
    code = (
        "import sys, minitorch_peft.kernels.quant, minitorch_peft.kernels.quant_ref, minitorch_peft.kernels.quant_cuda; "
        "print(sorted(m for m in ('numba.cuda', 'cupy') if m in sys.modules))"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
