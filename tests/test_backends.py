"""Every backend ("numpy", and "cupy" on a machine with a GPU) against the NumPy reference.

Run through the ``backend`` fixture of conftest.py: on a CPU-only machine the cupy cases are skipped
with the reason, and what can be checked without a GPU is checked here too: kernels/gpu.py mirrors
kernels/cpu.py name for name and argument for argument, its per-step kernels never wait for the GPU,
and ``--backend cupy`` without CuPy or without a GPU ends in one clear line.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from op_cases import OPS, r  # noqa: E402

import minitorch_peft.kernels.cpu as cpu  # noqa: E402
import minitorch_peft.backend as backend_module  # noqa: E402
from minitorch_peft import Tensor, manual_seed, nn, optim  # noqa: E402
from minitorch_peft import functional as F  # noqa: E402
from minitorch_peft.backend import Backend, BackendError, get_backend  # noqa: E402
from minitorch_peft.checkpoint import load_model, save_model  # noqa: E402
from minitorch_peft.data import iterate_batches  # noqa: E402
from minitorch_peft.peft.model import inject_adapters  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUMPY = get_backend("numpy")


def host(be: Backend, a: Any) -> np.ndarray:
    return np.asarray(be.to_numpy(a))


def on_backend(be: Backend, a: Any) -> bool:
    """``a`` is an array of ``be`` (NumPy's full reductions give NumPy scalars: those count too)."""
    return be.owns(a) or (isinstance(a, np.generic) and be.owns(np.asarray(a)))


@pytest.fixture
def other(backend: Backend) -> Backend:
    """A backend compared with the NumPy reference (the reference itself would only be compared with itself)."""
    if backend.name == "numpy":
        pytest.skip("numpy is the reference these results are compared with")
    return backend


# ------------------------------------------------------------------------------------------ ops


def _run(be: Backend, fn: Callable[..., Tensor], arrays: list[np.ndarray], seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    ts = [Tensor(be.asarray(np.array(a)), requires_grad=True, backend=be) for a in arrays]
    manual_seed(seed)
    out = fn(*ts)
    proj = np.random.default_rng(seed).standard_normal(out.shape)
    out.backward(be.asarray(proj, dtype=out.dtype))
    return out, ts


@pytest.mark.parametrize("name", sorted(k for k in OPS if k != "dropout"))  # dropout: device masks differ
def test_op_forward_backward_match_numpy(other: Backend, name: str) -> None:
    fn, arrays = OPS[name]
    ref, ref_in = _run(NUMPY, fn, arrays)
    out, ins = _run(other, fn, arrays)
    assert out.backend is other and on_backend(other, out.data)
    np.testing.assert_allclose(host(other, out.data), ref.numpy(), rtol=1e-9, atol=1e-12)
    for i, (a, b) in enumerate(zip(ref_in, ins)):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            assert on_backend(other, b.grad), f"input {i}: gradient left the backend"
            np.testing.assert_allclose(host(other, b.grad), a.grad, rtol=1e-9, atol=1e-12, err_msg=f"input {i}")


def test_dropout_keeps_expectation_and_mask_values(backend: Backend) -> None:
    manual_seed(0)
    x = Tensor(backend.xp.ones((200, 500), dtype=np.float32), requires_grad=True, backend=backend)
    y = F.dropout(x, 0.25)
    y.sum().backward()
    vals = host(backend, y.data)
    assert set(np.unique(vals).tolist()) <= {0.0, np.float32(1 / 0.75)}
    assert abs((vals == 0).mean() - 0.25) < 0.01 and abs(vals.mean() - 1.0) < 0.02
    np.testing.assert_array_equal(host(backend, x.grad), vals)  # d(x * mask)/dx = mask
    manual_seed(0)
    again = host(backend, F.dropout(Tensor(backend.xp.ones((200, 500), dtype=np.float32), backend=backend), 0.25).data)
    np.testing.assert_array_equal(again, vals)  # a seed makes the device masks repeatable too


# -------------------------------------------------------------------------------------- kernels


def f32(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def dev(be: Backend, *arrays: np.ndarray | None) -> list[Any]:
    return [None if a is None else be.asarray(np.array(a)) for a in arrays]  # copies: kernels may work in place


def assert_all_close(be: Backend, got: Any, want: Any, rtol: float = 2e-5, atol: float = 2e-5) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"result {i}"
        if w is not None:
            np.testing.assert_allclose(host(be, g), w, rtol=rtol, atol=atol, err_msg=f"result {i}")


@pytest.mark.parametrize("bias", [True, False])
def test_linear_kernels(other: Backend, bias: bool) -> None:
    x, w, b, g = f32(6, 5), f32(3, 5, seed=1), f32(3, seed=2) if bias else None, f32(6, 3, seed=3)
    k = other.kernels
    assert_all_close(other, [k.linear_forward(*dev(other, x, w, b))], [cpu.linear_forward(x, w, b)])
    for need in [(True, True, bias), (False, True, False), (True, False, False)]:
        got = k.linear_backward(*dev(other, g, x, w), *need)
        assert_all_close(other, got, cpu.linear_backward(g, x, w, *need))


def test_row_kernels(backend: Backend) -> None:
    """row_sumsq and rowdot (the row products DoRA's norm and dm need) agree with NumPy's definitions."""
    p, q = f32(7, 5), f32(7, 5, seed=1)
    k = backend.kernels
    dp, dq = dev(backend, p, q)
    assert_all_close(backend, [k.row_sumsq(dp)], [(p * p).sum(axis=1)])
    assert_all_close(backend, [k.rowdot(dp, dq, 1), k.rowdot(dp, dq, 0)], [(p * q).sum(axis=1), (p * q).sum(axis=0)])


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_fused_adapter_ops_match_numpy(other: Backend, dora: bool, dropout: bool) -> None:
    """The fused LoRA / DoRA ops, written once over the array module, give NumPy's outputs and gradients."""
    from minitorch_peft.peft import DoRAFunction, LoRAFunction

    x, w, a, bm, m, b = f32(7, 6), f32(4, 6, seed=1), f32(2, 6, seed=3), f32(4, 2, seed=4), f32(4, seed=5) + 3, f32(4, seed=2)
    mask = (np.random.default_rng(6).random((7, 6)) > 0.3).astype(np.float32) / np.float32(0.7) if dropout else None

    def op(x, w, a, bm, m, b):
        if dora:
            return DoRAFunction.apply(x, w, a, bm, m, b, scaling=0.5, mask=mask_on(x), norm_grad=True)
        return LoRAFunction.apply(x, w, a, bm, b, scaling=0.5, mask=mask_on(x))

    def mask_on(x):
        return None if mask is None else x.backend.asarray(mask)

    ref, ref_in = _run(NUMPY, op, [x, w, a, bm, m, b])
    out, ins = _run(other, op, [x, w, a, bm, m, b])
    assert_all_close(other, [out.data], [ref.numpy()])
    for t, r in zip(ins, ref_in):
        assert (t.grad is None) == (r.grad is None)
        if r.grad is not None:
            assert_all_close(other, [t.grad], [r.grad])


def test_relu_kernels(other: Backend) -> None:
    x, g = f32(5, 4), f32(5, 4, seed=1)
    y = other.kernels.relu_forward(other.asarray(x))
    assert_all_close(other, [y, other.kernels.relu_backward(other.asarray(g), y)],
                     [cpu.relu_forward(x), cpu.relu_backward(g, cpu.relu_forward(x))], rtol=0, atol=0)


@pytest.mark.parametrize("n, c, label_dtype", [(64, 10, np.int64), (13, 100, np.uint8), (1, 1, np.int32), (9, 33, np.int16)])
def test_cross_entropy_kernels_keep_the_loss_on_the_device(backend: Backend, n: int, c: int, label_dtype: Any) -> None:
    logits = f32(n, c) * 3
    labels = np.random.default_rng(1).integers(0, c, n).astype(label_dtype)
    loss, probs = backend.kernels.cross_entropy_forward(*dev(backend, logits, labels))
    assert on_backend(backend, loss) and loss.shape == () and loss.dtype == np.float32  # not a Python float: no sync
    loss_ref, probs_ref = cpu.cross_entropy_forward(logits, labels)
    assert_all_close(backend, [loss, probs], [loss_ref, probs_ref], rtol=1e-5, atol=1e-6)
    g = backend.asarray(np.float32(0.7))
    d = backend.kernels.cross_entropy_backward(g, probs, backend.asarray(labels))
    assert_all_close(backend, [d], [cpu.cross_entropy_backward(np.asarray(np.float32(0.7)), probs_ref, labels)], rtol=1e-5, atol=1e-7)


def test_index_add_accumulates_repeats(backend: Backend) -> None:
    target = backend.xp.zeros((4, 3), dtype=np.float32)
    out = backend.kernels.index_add(target, np.array([0, 2, 0, 0]), backend.asarray(np.ones((4, 3), np.float32)))
    np.testing.assert_array_equal(host(backend, out)[:, 0], [3, 0, 1, 0])


def _adam_ref(p: np.ndarray, g: np.ndarray, steps: int, **kw: Any) -> tuple[np.ndarray, ...]:
    p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    for t in range(1, steps + 1):
        cpu.adam_step(p, g, m, v, step=t, **kw)
    return p, m, v


@pytest.mark.parametrize("weight_decay, decoupled", [(0.0, True), (0.1, True), (0.1, False)])
def test_adam_step_matches_cpu(other: Backend, weight_decay: float, decoupled: bool) -> None:
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=weight_decay, decoupled=decoupled)
    p0, g = f32(33, 17), f32(33, 17, seed=1)
    p, m, v = dev(other, p0, np.zeros_like(p0), np.zeros_like(p0))
    gd = other.asarray(g)
    for t in range(1, 4):
        other.kernels.adam_step(p, gd, m, v, step=t, **kw)
    assert_all_close(other, [p, m, v], _adam_ref(p0, g, 3, **kw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_stores_moments_below_the_smallest_normal_as_zero(backend: Backend, dtype: Any) -> None:
    """Subnormal moments (slow on x86) become 0, on every backend; normal ones are kept."""
    tiny = np.finfo(dtype).tiny
    m0 = np.array([tiny * 0.5, -tiny * 0.25, tiny * 1.5, 0.0, 1e-3, -tiny * 2], dtype=dtype)
    v0 = np.array([tiny * 0.5, tiny * 3, tiny * 0.9, 0.0, 1e-6, tiny * 2], dtype=dtype)
    p, g, m, v = dev(backend, np.ones(6, dtype), np.zeros(6, dtype), m0, v0)
    backend.kernels.adam_step(p, g, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=5)
    got_m, got_v = host(backend, m), host(backend, v)
    np.testing.assert_array_equal(got_m[[0, 1, 3]], 0.0)
    np.testing.assert_array_equal(got_v[[0, 2, 3]], 0.0)
    # 0.9 * 1.5 tiny and 0.999 * 3 tiny are normal: kept, as the plain formula gives them
    assert got_m[2] == dtype(0.9) * m0[2] and got_v[1] == dtype(0.999) * v0[1]
    assert got_m[4] == dtype(0.9) * m0[4] and abs(got_m[5]) >= tiny


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_stores_a_momentum_buffer_below_the_smallest_normal_as_zero(backend: Backend, dtype: Any) -> None:
    tiny = np.finfo(dtype).tiny
    b0 = np.array([tiny * 0.5, -tiny * 0.25, tiny * 1.5, 1e-3], dtype=dtype)
    p, g, buf = dev(backend, np.ones(4, dtype), np.zeros(4, dtype), b0)
    backend.kernels.sgd_step(p, g, buf, lr=0.1, momentum=0.9, weight_decay=0.0, first=False)
    got = host(backend, buf)
    np.testing.assert_array_equal(got[:2], 0.0)
    assert got[2] == dtype(0.9) * b0[2] and got[3] == dtype(0.9) * b0[3]


def test_adam_flushing_moments_leaves_the_weights_bit_identical() -> None:
    """A weight whose gradient is 0 after its first step: m decays to subnormal (~830 steps in float32) and
    is then stored as 0; the weight still takes exactly the steps the plain formula gives, bit for bit."""
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(64).astype(np.float32) * np.float32(0.05)
    g1 = rng.standard_normal(64).astype(np.float32) * np.float32(1e-4)
    f = np.float32
    p, m, v = p0.copy(), np.zeros(64, f), np.zeros(64, f)
    rp, rm, rv = p0.copy(), np.zeros(64, f), np.zeros(64, f)
    b1, b2, lr, eps = f(0.9), f(0.999), 1e-3, f(1e-8)
    for t in range(1, 1201):
        g = g1 if t == 1 else np.zeros(64, f)
        cpu.adam_step(p, g, m, v, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, step=t)
        rm = b1 * rm + f(0.1) * g  # the formula without the flush, in float32, operation for operation
        rv = b2 * rv + f(1 - 0.999) * g * g
        rp = rp - f(lr / (1 - 0.9**t)) * rm / (np.sqrt(rv) / f(np.sqrt(1 - 0.999**t)) + eps)
    assert np.count_nonzero((rm != 0) & (np.abs(rm) < np.finfo(f).tiny)) > 0  # the reference went subnormal
    assert not np.any(m) and np.all(np.abs(rm) < np.finfo(f).tiny)
    np.testing.assert_array_equal(p, rp)


def test_adam_step_updates_strided_views_in_place(backend: Backend) -> None:
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    p0, g = f32(6, 8), f32(4, 6, seed=1)
    big = backend.asarray(p0.copy())
    p = big[:4, :6]  # a strided view into a bigger array
    m, v = backend.xp.zeros((4, 6), dtype=np.float32), backend.xp.zeros((4, 6), dtype=np.float32)
    backend.kernels.adam_step(p, backend.asarray(g), m, v, step=1, **kw)
    want, _, _ = _adam_ref(p0[:4, :6], g, 1, **kw)
    np.testing.assert_allclose(host(backend, big)[:4, :6], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(host(backend, big)[4:], p0[4:])


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_step_matches_cpu(other: Backend, momentum: float) -> None:
    p0, g = f32(10, 3), f32(10, 3, seed=1)
    p_ref, buf_ref = p0.copy(), np.zeros_like(p0) if momentum else None
    p, buf = dev(other, p0, np.zeros_like(p0) if momentum else None)
    for t in range(3):
        cpu.sgd_step(p_ref, g, buf_ref, lr=0.1, momentum=momentum, weight_decay=0.01, first=t == 0)
        other.kernels.sgd_step(p, other.asarray(g), buf, lr=0.1, momentum=momentum, weight_decay=0.01, first=t == 0)
    assert_all_close(other, [p, buf], [p_ref, buf_ref], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------- training


def _train_lora(be: Backend, steps: int = 6) -> tuple[list[float], dict[str, np.ndarray]]:
    x = f32(256, 20)
    y = np.random.default_rng(1).integers(0, 4, 256)
    manual_seed(0)
    model = nn.MLP([20, 16, 12, 4])
    inject_adapters(model, r=4, lora_alpha=8.0, target_modules=["fc1", "fc2", "fc3"])
    model.to(be)
    opt = optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    xd, yd = be.asarray(x), be.asarray(y)
    losses = []
    for step in range(steps):
        for xb, yb in iterate_batches(xd, yd, 64, shuffle=True, seed=0, epoch=step):
            loss = F.cross_entropy(model(Tensor._make(xb, be, False)), Tensor._make(yb, be, False))
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert be.owns(loss.data) and loss.shape == ()
        losses.append(float(host(be, loss.data)))
    return losses, {k: host(be, v) for k, v in model.state_dict().items()}


def test_lora_training_follows_the_numpy_trajectory(other: Backend) -> None:
    ref_losses, ref_state = _train_lora(NUMPY)
    losses, state = _train_lora(other)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-4)
    assert ref_losses[-1] < ref_losses[0]
    for k, v in ref_state.items():
        np.testing.assert_allclose(state[k], v, rtol=1e-3, atol=1e-5, err_msg=k)


def test_iterate_batches_yields_backend_arrays(backend: Backend) -> None:
    x, y = backend.asarray(f32(10, 3)), backend.asarray(np.arange(10))
    batches = list(iterate_batches(x, y, 4, shuffle=True, seed=3, epoch=1))
    assert [int(b[0].shape[0]) for b in batches] == [4, 4, 2]
    assert all(backend.owns(xb) and backend.owns(yb) for xb, yb in batches)
    seen = np.concatenate([host(backend, yb) for _, yb in batches])
    assert sorted(seen.tolist()) == list(range(10))
    np.testing.assert_array_equal(np.concatenate([host(backend, xb) for xb, _ in batches]), host(backend, x)[seen])


def test_iterate_batches_moves_the_permutation_once_per_epoch() -> None:
    calls = []

    class CountingXp:  # stands in for a device array module
        @staticmethod
        def asarray(a: Any) -> Any:
            calls.append(np.asarray(a).shape)
            return np.asarray(a)

    x, y = np.zeros((10, 2)), np.arange(10)
    assert len(list(iterate_batches(x, y, 3, seed=0, epoch=0, xp=CountingXp))) == 4
    assert calls == [(10,)]


@pytest.mark.parametrize("direction", ["save_here_load_numpy", "save_numpy_load_here"])
def test_checkpoints_cross_backends(backend: Backend, direction: str, tmp_path: Path) -> None:
    save_be, load_be = (backend, NUMPY) if direction == "save_here_load_numpy" else (NUMPY, backend)
    manual_seed(4)
    model = nn.MLP([6, 5, 3])
    inject_adapters(model, r=2, lora_alpha=4.0, target_modules=["fc1", "fc2"])
    model.to(save_be)
    for layer in (model.fc1, model.fc2):  # non-zero B, so the adapters change the output
        b = layer.lora_B["default"]
        b.data = save_be.asarray(f32(*b.shape, seed=9))
    x = f32(4, 6)
    want = host(save_be, model(Tensor(save_be.asarray(x), backend=save_be)).data)
    save_model(model, tmp_path / "m")
    loaded, config = load_model(tmp_path / "m", backend=load_be)
    assert loaded.backend is load_be and all(load_be.owns(v) for v in loaded.state_dict().values())
    got = host(load_be, loaded(Tensor(load_be.asarray(x), backend=load_be)).data)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert config["active_adapter"] == "default"


# --------------------------------------------------------------------------------- quantization


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", False), ("nf4", True), ("fp4", True)])
def test_quantization_codes_equal_the_cpu_kernel(other: Backend, quant_type: str, double_quant: bool) -> None:
    quant = pytest.importorskip("minitorch_peft.kernels.quant")
    x = f32(37, 29) * 2  # odd count: a half-filled last byte and a partial last block
    packed_ref, state_ref = quant.quantize_4bit(x, quant_type, 64, double_quant)
    packed, state = other.kernels.quantize_4bit(other.asarray(x), quant_type, 64, double_quant)
    np.testing.assert_array_equal(host(other, packed), packed_ref)
    for name in ("absmax", "absmax_codes", "absmax_scale", "absmax_offset"):
        a, b = getattr(state, name), getattr(state_ref, name)
        assert (a is None) == (b is None), name
        if b is not None:
            np.testing.assert_array_equal(host(other, a), b, err_msg=name)
    back = other.kernels.dequantize_4bit(packed, state)
    np.testing.assert_array_equal(host(other, back), quant.dequantize_4bit(packed_ref, state_ref))


# ------------------------------------------------------------------------- checks without a GPU


def _functions(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}


def _arg_names(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]


def test_gpu_kernels_mirror_cpu_kernels_name_for_name() -> None:
    """Every public kernel of kernels/cpu.py exists in kernels/gpu.py with the same arguments
    (checked from the source: no CuPy needed), so the engine never meets a kernel missing on the GPU."""
    cpu_fns, gpu_fns = _functions(ROOT / "kernels" / "cpu.py"), _functions(ROOT / "kernels" / "gpu.py")
    missing = sorted(set(cpu_fns) - set(gpu_fns))
    assert not missing, f"kernels/gpu.py lacks {missing}: every kernel in kernels/cpu.py needs a GPU twin"
    for name, fn in cpu_fns.items():
        assert _arg_names(gpu_fns[name]) == _arg_names(fn), f"{name}: arguments differ between cpu.py and gpu.py"


STEP_KERNELS = ["linear_forward", "linear_backward", "row_sumsq", "rowdot", "relu_forward", "relu_backward",
                "cross_entropy_forward", "cross_entropy_backward", "dropout_mask", "adam_step", "sgd_step",
                "index_add"]


def test_gpu_step_kernels_never_wait_for_the_device() -> None:
    """No host round trip (float(), .item(), .get(), .tolist(), asnumpy, bool()) in a per-step GPU kernel."""
    fns = _functions(ROOT / "kernels" / "gpu.py")
    for name in STEP_KERNELS:
        if name not in fns:
            continue
        for node in ast.walk(fns[name]):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                assert called not in {"float", "bool", "item", "get", "tolist", "asnumpy", "synchronize"}, (
                    f"kernels/gpu.py {name} calls {called}(): that waits for the GPU every step")


def test_cli_cupy_missing_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import cli

    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` raises ImportError
    monkeypatch.setattr(backend_module, "_cache", {})
    commands = [["train", "--backend", "cupy", "--epochs", "1", "--limit", "10", "--output", str(tmp_path / "o")],
                ["infer", "--backend", "cupy", "--model-dir", str(tmp_path / "none")]]
    if "bench" in cli.cli.commands:
        commands.append(["bench", "--backend", "cupy", "--quick"])
    for argv in commands:
        assert cli.main(argv) != 0
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), err
        assert "CuPy" in err and "not installed" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("runtime", ["raises", "zero"])
def test_cli_no_gpu_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, runtime: str) -> None:
    import cli

    def count() -> int:
        if runtime == "raises":
            raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return 0

    fake = types.SimpleNamespace(cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(backend_module, "_cache", {})
    assert cli.main(["train", "--backend", "cupy", "--epochs", "1", "--output", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "no CUDA" in err and "installed" in err and "Traceback" not in err
    with pytest.raises(BackendError):
        get_backend("cupy")


def test_cupy_skip_reason_is_clear() -> None:
    from conftest import cupy_skip_reason

    reason = cupy_skip_reason()
    assert reason is None or reason.startswith(("CuPy not installed", "no CUDA GPU"))


@pytest.mark.slow
def test_engine_code_outside_kernels_imports_no_cupy() -> None:
    """Only backend.py may import CuPy (lazily) in the engine, so it imports and runs on machines without CuPy."""
    offenders = []
    for path in (ROOT / "minitorch_peft").rglob("*.py"):
        if path.name == "backend.py" or "bench" in path.parts:  # the benchmark may time CuPy and torch directly
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("cupy", "cupyx") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_signature_of_backend_helpers() -> None:
    be = NUMPY
    a = np.arange(6.0).reshape(2, 3)
    assert be.astype(a, np.float32).dtype == np.float32
    assert be.permute_dims(a, (1, 0)).shape == (3, 2) and be.matrix_transpose(a).shape == (3, 2)
    assert "copy" in inspect.signature(be.astype).parameters


@pytest.mark.parametrize("out", [10, 1023, 1024, 2048])
def test_cpu_linear_forward_gives_the_plain_products_bits_on_both_paths(out: int) -> None:
    """From WIDE_OUT out features the product is computed transposed, for speed; the bits must not change."""
    rng = np.random.default_rng(out)
    x = rng.standard_normal((64, 784)).astype(np.float32)
    w = rng.standard_normal((out, 784)).astype(np.float32)
    b = rng.standard_normal(out).astype(np.float32)
    y = cpu.linear_forward(x, w, b)
    want = x @ w.T
    want += b
    assert y.flags.c_contiguous and y.tobytes() == want.tobytes()
    y3 = cpu.linear_forward(x.reshape(4, 16, 784), w, None)  # a leading batch shape
    assert y3.shape == (4, 16, out) and y3.reshape(64, out).tobytes() == (x @ w.T).tobytes()
    given = np.full((64, out), np.nan, np.float32)  # written in place by BLAS, or by the transposing copy
    assert cpu.linear_forward(x, w, b, given) is given and given.tobytes() == want.tobytes()
    rows = np.full((80, out), np.nan, np.float32)[8:72]  # a block of rows of a bigger array (QLoRA's chunks)
    assert cpu.linear_forward(x, w, None, rows) is rows and rows.tobytes() == (x @ w.T).tobytes()
    y3 = np.empty((4, 16, out), np.float32)
    assert cpu.linear_forward(x.reshape(4, 16, 784), w, b, y3) is y3 and y3.tobytes() == want.tobytes()
