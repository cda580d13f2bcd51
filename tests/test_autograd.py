"""The autograd engine itself: graph recording, no_grad, detach, accumulation, release, errors, dtypes."""

from __future__ import annotations

import sys
import tracemalloc
import weakref

import numpy as np
import pytest

import minitorch_peft as mp
from minitorch_peft import BackendError, ShapeError, Tensor, get_backend, nn, no_grad
from minitorch_peft import backend as backend_module
from minitorch_peft import functional as F
from minitorch_peft.optim import Adam


def leaf(values, requires_grad=True, dtype=np.float64):
    return Tensor(np.array(values, dtype=dtype), requires_grad=requires_grad)


# ------------------------------------------------------------------------------- requires_grad


def test_requires_grad_propagation():
    a, b, c = leaf([1.0, 2.0]), leaf([3.0, 4.0], requires_grad=False), leaf([5.0, 6.0], requires_grad=False)
    assert (a + b).requires_grad
    assert (b * a).requires_grad
    assert not (b * c).requires_grad
    assert (b * c)._ctx is None
    assert not (b + 1.0).requires_grad
    assert (a.exp().sum()).requires_grad
    y = a * b
    assert not y.is_leaf and a.is_leaf and b.is_leaf


def test_only_leaves_that_require_grad_receive_grad():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0], requires_grad=False)
    (a * b).sum().backward()
    np.testing.assert_array_equal(a.grad, [3.0, 4.0])
    assert b.grad is None


def test_intermediate_tensors_get_no_grad():
    a = leaf([1.0, 2.0])
    h = a * 3.0
    (h * h).sum().backward()
    assert h.grad is None
    np.testing.assert_array_equal(a.grad, 18.0 * np.array([1.0, 2.0]))


def test_backward_on_tensor_without_grad_raises():
    with pytest.raises(RuntimeError):
        leaf([1.0], requires_grad=False).sum().backward()


# ------------------------------------------------------------------------------- no_grad


def test_no_grad_records_nothing():
    a = leaf([1.0, 2.0])
    assert mp.is_grad_enabled()
    with no_grad():
        assert not mp.is_grad_enabled()
        y = (a * 2.0).exp().sum()
        assert not y.requires_grad and y._ctx is None
        with pytest.raises(RuntimeError):
            y.backward()
    assert mp.is_grad_enabled()
    z = a * 2.0
    assert z.requires_grad and z._ctx is not None


def test_no_grad_nested():
    a = leaf([1.0])
    with no_grad():
        with no_grad():
            assert not (a * 2).requires_grad
        assert not mp.is_grad_enabled()
        assert not (a * 2).requires_grad
    assert mp.is_grad_enabled()
    assert (a * 2).requires_grad


def test_no_grad_restores_after_exception():
    with pytest.raises(ZeroDivisionError):
        with no_grad():
            1 / 0
    assert mp.is_grad_enabled()
    with pytest.raises(KeyError):
        with no_grad():
            with no_grad():
                raise KeyError("x")
    assert mp.is_grad_enabled()
    assert (leaf([1.0]) * 2).requires_grad


# ------------------------------------------------------------------------------- detach


def test_detach():
    a = leaf([1.0, 2.0, 3.0])
    d = a.detach()
    assert not d.requires_grad and d._ctx is None
    assert np.shares_memory(d.data, a.data)
    # the gradient does not flow through the detached factor: d(a.detach() * a)/da = a, not 2a
    (d * a).sum().backward()
    np.testing.assert_array_equal(a.grad, [1.0, 2.0, 3.0])
    h = (a * 2).detach()
    assert h.is_leaf and not h.requires_grad


# ------------------------------------------------------------------------------- backward


def test_backward_non_scalar_needs_grad():
    a = leaf([[1.0, 2.0], [3.0, 4.0]])
    y = a * 3.0
    with pytest.raises(RuntimeError, match="scalar"):
        y.backward()
    y.backward(np.array([[1.0, 0.0], [0.0, 2.0]]))
    np.testing.assert_array_equal(a.grad, [[3.0, 0.0], [0.0, 6.0]])


def test_backward_with_tensor_grad():
    a = leaf([1.0, 2.0])
    (a * a).backward(Tensor(np.array([1.0, -1.0])))
    np.testing.assert_array_equal(a.grad, [2.0, -4.0])


def test_grad_accumulates_across_backward_calls():
    a = leaf([1.0, 2.0])
    (a * a).sum().backward()
    first = a.grad.copy()
    np.testing.assert_array_equal(first, [2.0, 4.0])
    (a * 3.0).sum().backward()
    np.testing.assert_array_equal(a.grad, first + 3.0)
    np.testing.assert_array_equal(first, [2.0, 4.0])  # accumulation did not write into the old array
    a.zero_grad()
    assert a.grad is None


def test_accumulation_does_not_alias_between_leaves():
    # Add's backward hands the same array to both inputs; accumulating into one must not change the other
    a, b = leaf([1.0, 1.0]), leaf([1.0, 1.0])
    (a + b).sum().backward()
    (a * 5.0).sum().backward()
    np.testing.assert_array_equal(a.grad, [6.0, 6.0])
    np.testing.assert_array_equal(b.grad, [1.0, 1.0])


def test_retain_graph_allows_second_backward():
    a = leaf([1.0, 2.0])
    loss = (a * a).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    np.testing.assert_array_equal(a.grad, [4.0, 8.0])


def test_graph_released_after_backward():
    a = leaf([1.0, 2.0])
    h = a * 2.0
    e = h.exp()
    loss = e.sum()
    for t in (h, e, loss):
        assert t._ctx is not None
    loss.backward()
    for t in (h, e, loss):
        assert t._ctx is not None and not hasattr(t._ctx, "saved")  # the saved arrays are gone
    np.testing.assert_allclose(a.grad, 2 * np.exp([2.0, 4.0]))
    # a second backward through the freed graph fails loudly (as in PyTorch) and leaves .grad alone
    with pytest.raises(RuntimeError, match="already freed"):
        loss.backward()
    np.testing.assert_allclose(a.grad, 2 * np.exp([2.0, 4.0]))


def test_saved_intermediates_are_freed_by_backward():
    a = leaf(np.linspace(0.1, 1.0, 10))
    h = a * 2.0
    tensor_ref, array_ref = weakref.ref(h), weakref.ref(h.data)
    loss = (h.exp() * a).sum()
    del h
    assert tensor_ref() is not None and array_ref() is not None  # kept alive only by the graph
    loss.backward()
    assert tensor_ref() is None and array_ref() is None


def test_retain_graph_keeps_intermediates():
    a = leaf([1.0, 2.0])
    h = a * 2.0
    ref = weakref.ref(h.data)
    loss = h.exp().sum()
    del h
    loss.backward(retain_graph=True)
    assert ref() is not None
    loss.backward()
    assert ref() is None


def test_training_loop_memory_is_flat():
    mp.manual_seed(0)
    r = np.random.default_rng(0)
    model = nn.MLP([16, 32, 4])
    opt = Adam(model.parameters(), lr=1e-3)
    x = Tensor(r.standard_normal((32, 16)).astype(np.float32))
    y = r.integers(0, 4, size=32)

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    step()  # compile / load the kernels before measuring
    tracemalloc.start()
    try:
        for i in range(200):
            step()
            if i == 19:
                after_20 = tracemalloc.get_traced_memory()[0]
        after_200 = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert after_200 - after_20 < 64 * 1024, f"memory grew by {after_200 - after_20} bytes over 180 steps"


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "op, sa, sb",
    [
        (lambda a, b: a + b, (2, 3), (4,)),
        (lambda a, b: a - b, (5, 2), (3, 2)),
        (lambda a, b: a * b, (2, 3), (3, 2)),
        (lambda a, b: a / b, (7,), (6,)),
        (lambda a, b: a @ b, (2, 3), (4, 5)),
        (lambda a, b: a @ b, (3,), (4,)),
    ],
)
def test_shape_errors_name_both_shapes(op, sa, sb):
    a, b = leaf(np.ones(sa)), leaf(np.ones(sb))
    with pytest.raises(ShapeError) as info:
        op(a, b)
    assert str(sa) in str(info.value) and str(sb) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_backend():
    with pytest.raises(BackendError) as info:
        get_backend("tpu")
    message = str(info.value)
    assert "tpu" in message and "numpy" in message and "cupy" in message
    with pytest.raises(BackendError):
        Tensor([1.0], backend="metal")


def test_cupy_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    monkeypatch.setattr(backend_module, "_cache", {})
    with pytest.raises(BackendError) as info:
        get_backend("cupy")
    message = str(info.value)
    assert "CuPy" in message and "install" in message


def test_numpy_backend():
    be = get_backend("numpy")
    assert be.xp is np and get_backend(be) is be and be.name == "numpy"
    assert leaf([1.0]).backend is be


# ------------------------------------------------------------------------------- dtypes


def test_default_dtype_float32():
    assert mp.get_default_dtype() is np.float32
    assert Tensor([1.0, 2.0]).dtype == np.float32
    assert Tensor([1, 2]).dtype == np.float32  # python numbers become the default float
    assert Tensor(3.5).dtype == np.float32
    assert mp.tensor([[1.0]]).dtype == np.float32
    assert Tensor(np.arange(3)).dtype == np.int64  # an integer array keeps its dtype
    assert Tensor(np.ones(2)).dtype == np.float64  # a float array keeps its dtype
    assert Tensor([1.0], dtype=np.float64).dtype == np.float64


def test_set_default_dtype():
    try:
        mp.set_default_dtype(np.float64)
        assert Tensor([1.0]).dtype == np.float64
        assert nn.Linear(3, 2).weight.dtype == np.float64
    finally:
        mp.set_default_dtype(np.float32)
    assert Tensor([1.0]).dtype == np.float32


def test_layers_float32_default_float64_on_request():
    layer = nn.Linear(3, 2)
    assert layer.weight.dtype == np.float32 and layer.bias.dtype == np.float32
    layer64 = nn.Linear(3, 2, dtype=np.float64)
    assert layer64.weight.dtype == np.float64 and layer64.bias.dtype == np.float64
    x = Tensor(np.ones((4, 3)), requires_grad=True)
    out = layer64(x)
    assert out.dtype == np.float64
    out.sum().backward()
    assert layer64.weight.grad.dtype == np.float64 and x.grad.dtype == np.float64
    mlp = nn.MLP([3, 4, 2], dtype=np.float64)
    assert all(p.dtype == np.float64 for p in mlp.parameters())


def test_float32_graph_stays_float32():
    x = Tensor(np.ones((2, 3), dtype=np.float32), requires_grad=True)
    y = ((x * 2.0 + 1.0) / 3.0).exp().log().relu().mean(axis=0).sum()
    assert y.dtype == np.float32
    y.backward()
    assert x.grad.dtype == np.float32
