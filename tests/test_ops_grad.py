"""Every differentiable op: forward against NumPy, gradient against float64 central differences."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gradcheck import as_leaf, gradcheck  # noqa: E402

import minitorch_peft.kernels.cpu as cpu_kernels  # noqa: E402
import minitorch_peft as mp  # noqa: E402
from minitorch_peft import Tensor, nn  # noqa: E402
from minitorch_peft import functional as F  # noqa: E402

FAST = settings(max_examples=25, deadline=None)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def away_from_zero(r: np.random.Generator, shape: tuple[int, ...], low: float = 0.5, high: float = 2.0) -> np.ndarray:
    return r.choice([-1.0, 1.0], size=shape) * r.uniform(low, high, size=shape)


# ------------------------------------------------------------------------------- element-wise binary

BINARY = {
    "add": (lambda a, b: a + b, np.add),
    "sub": (lambda a, b: a - b, np.subtract),
    "mul": (lambda a, b: a * b, np.multiply),
    "div": (lambda a, b: a / b, np.divide),
}


@pytest.mark.parametrize("name", sorted(BINARY))
@FAST
@given(
    shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, min_side=1, max_side=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_binary_broadcast(name, shapes, seed):
    op, np_op = BINARY[name]
    sa, sb = shapes.input_shapes
    r = rng(seed)
    a = r.standard_normal(sa)
    b = away_from_zero(r, sb)  # keeps div well conditioned
    out = op(as_leaf(a), as_leaf(b))
    assert out.shape == shapes.result_shape
    np.testing.assert_allclose(out.numpy(), np_op(a, b), rtol=1e-12)
    ga, gb = gradcheck(op, a, b, seed=seed)
    assert ga.shape == sa and gb.shape == sb


@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_broadcast_gradient_is_summed(name):
    # (3, 1) against (4,): the gradient of sum(out) for a is summed over the 4 columns, for b over 3 rows
    op, _ = BINARY[name]
    a = as_leaf(np.full((3, 1), 2.0))
    b = as_leaf(np.full((4,), 4.0))
    op(a, b).sum().backward()
    expected_a = {"add": 4.0, "sub": 4.0, "mul": 4 * 4.0, "div": 4 / 4.0}[name]
    expected_b = {"add": 3.0, "sub": -3.0, "mul": 3 * 2.0, "div": -3 * 2.0 / 16.0}[name]
    np.testing.assert_allclose(a.grad, np.full((3, 1), expected_a))
    np.testing.assert_allclose(b.grad, np.full((4,), expected_b))


@pytest.mark.parametrize(
    "fn, np_fn",
    [
        (lambda x: x + 2.5, lambda x: x + 2.5),
        (lambda x: 2.5 + x, lambda x: 2.5 + x),
        (lambda x: x - 1.5, lambda x: x - 1.5),
        (lambda x: 1.5 - x, lambda x: 1.5 - x),
        (lambda x: x * -3.0, lambda x: x * -3.0),
        (lambda x: -3.0 * x, lambda x: -3.0 * x),
        (lambda x: x / 4.0, lambda x: x / 4.0),
        (lambda x: 4.0 / x, lambda x: 4.0 / x),
        (lambda x: -x, lambda x: -x),
    ],
)
def test_ops_with_python_scalars(fn, np_fn):
    x = away_from_zero(rng(1), (3, 4))
    np.testing.assert_allclose(fn(as_leaf(x)).numpy(), np_fn(x), rtol=1e-12)
    gradcheck(fn, x)


def test_scalar_constants_keep_dtype():
    x = Tensor(np.ones(3, dtype=np.float32), requires_grad=True)
    y = (2.5 * x + 1) / 3.0 - 0.5
    assert y.dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad, np.full(3, 2.5 / 3.0, dtype=np.float32), rtol=1e-6)


# ------------------------------------------------------------------------------- pow


@pytest.mark.parametrize("exponent", [2, 3.0, -1.0, 0.5, -1.5, 2.7])
def test_pow_scalar_exponent(exponent):
    r = rng(2)
    x = r.uniform(0.5, 2.0, size=(3, 4))  # positive base: fractional exponents are defined
    np.testing.assert_allclose((as_leaf(x) ** exponent).numpy(), x**exponent, rtol=1e-12)
    (g,) = gradcheck(lambda t: t**exponent, x)
    np.testing.assert_allclose(g, _proj_grad((3, 4), exponent * x ** (exponent - 1)), rtol=1e-10)


def _proj_grad(shape, local):
    """Gradient gradcheck back-propagates for an elementwise op: its projection times the local derivative."""
    return np.random.default_rng(0).standard_normal(shape) * local


def test_pow_integer_exponent_negative_base():
    x = away_from_zero(rng(3), (5,))
    gradcheck(lambda t: t**3, x)
    gradcheck(lambda t: t**2, x)


def test_pow_tensor_exponent_positive_base():
    r = rng(4)
    a = r.uniform(0.5, 2.0, size=(2, 3))
    b = r.standard_normal((3,))
    np.testing.assert_allclose((as_leaf(a) ** as_leaf(b)).numpy(), a**b, rtol=1e-12)
    gradcheck(lambda x, y: x**y, a, b)
    gradcheck(lambda y: 2.0**y, b)  # python base, tensor exponent (__rpow__)


def test_sqrt():
    x = rng(5).uniform(0.5, 3.0, size=(4,))
    np.testing.assert_allclose(as_leaf(x).sqrt().numpy(), np.sqrt(x), rtol=1e-12)
    gradcheck(lambda t: t.sqrt(), x)


# ------------------------------------------------------------------------------- matmul

MATMUL_SHAPES = [
    ((3, 4), (4, 5)),
    ((2, 3, 4), (4, 5)),
    ((3, 4), (2, 4, 5)),
    ((2, 3, 4), (2, 4, 5)),
    ((2, 1, 3, 4), (3, 4, 2)),
    ((4,), (4, 5)),
    ((3, 4), (4,)),
    ((4,), (4,)),
    ((2, 3, 4), (4,)),
    ((4,), (2, 4, 5)),
]


@pytest.mark.parametrize("sa, sb", MATMUL_SHAPES)
def test_matmul(sa, sb):
    r = rng(6)
    a, b = r.standard_normal(sa), r.standard_normal(sb)
    out = as_leaf(a) @ as_leaf(b)
    np.testing.assert_allclose(out.numpy(), np.matmul(a, b), rtol=1e-12)
    gradcheck(lambda x, y: x @ y, a, b)


def test_matmul_with_numpy_operand():
    r = rng(7)
    a, w = r.standard_normal((3, 4)), r.standard_normal((4, 2))
    (gw,) = gradcheck(lambda t: a @ t, w)  # numpy @ Tensor defers to Tensor.__rmatmul__
    assert gw.shape == (4, 2)


# ------------------------------------------------------------------------------- unary


def test_exp():
    x = rng(8).standard_normal((3, 4))
    np.testing.assert_allclose(as_leaf(x).exp().numpy(), np.exp(x), rtol=1e-12)
    gradcheck(lambda t: t.exp(), x)


def test_log():
    x = rng(9).uniform(0.5, 3.0, size=(3, 4))
    np.testing.assert_allclose(as_leaf(x).log().numpy(), np.log(x), rtol=1e-12)
    gradcheck(lambda t: t.log(), x)


def test_relu():
    x = away_from_zero(rng(10), (4, 5), low=0.1, high=2.0)  # no element within eps of the kink
    np.testing.assert_array_equal(as_leaf(x).relu().numpy(), np.maximum(x, 0))
    np.testing.assert_array_equal(F.relu(as_leaf(x)).numpy(), np.maximum(x, 0))
    gradcheck(lambda t: t.relu(), x)
    t = as_leaf(x)
    F.relu(t).sum().backward()
    np.testing.assert_array_equal(t.grad, (x > 0).astype(np.float64))


# ------------------------------------------------------------------------------- reductions

AXES = [None, 0, 1, -1, (0, 2), (1,), (-1, 0)]


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("name", ["sum", "mean"])
def test_sum_mean(name, axis, keepdims):
    x = rng(11).standard_normal((2, 3, 4))
    fn = lambda t: getattr(t, name)(axis=axis, keepdims=keepdims)  # noqa: E731
    out = fn(as_leaf(x))
    expected = getattr(np, name)(x, axis=axis, keepdims=keepdims)
    assert out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)
    gradcheck(fn, x)


def test_mean_gradient_value():
    t = as_leaf(np.ones((2, 3, 4)))
    t.mean(axis=(0, 2)).sum().backward()
    np.testing.assert_allclose(t.grad, np.full((2, 3, 4), 1 / 8))


@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axis", AXES)
def test_max(axis, keepdims):
    r = rng(12)
    x = r.permutation(24).reshape(2, 3, 4) * 0.37 - 4.0  # distinct values: no ties
    fn = lambda t: t.max(axis=axis, keepdims=keepdims)  # noqa: E731
    out = fn(as_leaf(x))
    expected = np.max(x, axis=axis, keepdims=keepdims)
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out.numpy(), expected)
    gradcheck(fn, x)


def test_max_gradient_goes_to_argmax_only():
    x = as_leaf([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]])
    x.max(axis=1).sum().backward()
    np.testing.assert_array_equal(x.grad, [[0, 1, 0], [1, 0, 0]])


def test_max_ties_share_gradient():
    x = as_leaf([1.0, 3.0, 3.0])
    x.max().backward()
    np.testing.assert_allclose(x.grad, [0.0, 0.5, 0.5])


def test_max_float32_gradient_dtype():
    x = Tensor(np.array([[1.0, 2.0], [4.0, 3.0]], dtype=np.float32), requires_grad=True)
    x.max(axis=0).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_array_equal(x.grad, [[0, 0], [1, 1]])


# ------------------------------------------------------------------------------- shape ops


@pytest.mark.parametrize("shape", [(6, 4), (-1,), (4, 3, 2), (2, -1, 3), (24, 1)])
def test_reshape(shape):
    x = rng(13).standard_normal((2, 3, 4))
    out = as_leaf(x).reshape(shape)
    np.testing.assert_array_equal(out.numpy(), x.reshape(shape))
    gradcheck(lambda t: t.reshape(shape), x)
    gradcheck(lambda t: t.reshape(*shape), x)


@pytest.mark.parametrize("axes", [None, (1, 0, 2), (2, 0, 1), (0, 2, 1), (-1, 0, 1), (1, -1, -3)])
def test_transpose(axes):
    x = rng(14).standard_normal((2, 3, 4))
    fn = (lambda t: t.transpose()) if axes is None else (lambda t: t.transpose(*axes))
    out = fn(as_leaf(x))
    np.testing.assert_array_equal(out.numpy(), np.transpose(x, axes))
    gradcheck(fn, x)


def test_transpose_T_2d():
    x = rng(15).standard_normal((3, 5))
    np.testing.assert_array_equal(as_leaf(x).T.numpy(), x.T)
    gradcheck(lambda t: t.T, x)


INDICES = [
    (slice(1, None), slice(None, None, 2)),
    (slice(None), 1),
    (Ellipsis, 0),
    (1, slice(None, -1)),
    2,
    np.array([0, 2, 2, 0, 3]),
    (np.array([0, 0, 1, 3]), np.array([1, 1, 2, 0])),
    (slice(None), [4, 4, 0]),
    (np.array([[True, False, True, False, True]] * 4)),
]


@pytest.mark.parametrize("index", INDICES, ids=lambda i: repr(i).replace("\n", "")[:40])
def test_getitem(index):
    x = rng(16).standard_normal((4, 5))
    out = as_leaf(x)[index]
    np.testing.assert_array_equal(out.numpy(), x[index])
    gradcheck(lambda t: t[index], x)


def test_getitem_repeated_indices_accumulate():
    x = as_leaf(np.arange(4.0))
    x[np.array([0, 2, 2, 2, 3, 0])].sum().backward()
    np.testing.assert_array_equal(x.grad, [2.0, 0.0, 3.0, 1.0])
    y = as_leaf(np.zeros((3, 2)))
    (y[[1, 1]] * as_leaf([[1.0, 2.0], [10.0, 20.0]])).sum().backward()
    np.testing.assert_array_equal(y.grad, [[0, 0], [11, 22], [0, 0]])


# ------------------------------------------------------------------------------- softmax / losses


def _np_log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_log_softmax(axis):
    x = rng(17).standard_normal((3, 4, 2)) * 3
    np.testing.assert_allclose(as_leaf(x).log_softmax(axis=axis).numpy(), _np_log_softmax(x, axis), rtol=1e-12)
    np.testing.assert_allclose(np.exp(F.log_softmax(as_leaf(x), axis).numpy()).sum(axis=axis), 1.0, rtol=1e-12)
    gradcheck(lambda t: t.log_softmax(axis=axis), x)
    gradcheck(lambda t: F.log_softmax(t, axis=axis), x)


def test_log_softmax_large_values_are_finite():
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1002.0, -1001.0]])
    out = as_leaf(x).log_softmax()
    assert np.all(np.isfinite(out.numpy()))
    np.testing.assert_allclose(out.numpy(), _np_log_softmax(x - x.max(axis=1, keepdims=True), -1), rtol=1e-12)


def _np_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    m = logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(logits - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(lse - logits[np.arange(len(labels)), labels]))


@FAST
@given(n=st.integers(1, 6), c=st.integers(2, 5), seed=st.integers(0, 2**31 - 1))
@example(n=1, c=2, seed=14174)  # loss 5.6e-5: the two sums differ by 4.3e-16, 7.6e-12 of the loss
def test_cross_entropy(n, c, seed):
    r = rng(seed)
    logits = r.standard_normal((n, c)) * 2
    labels = r.integers(0, c, size=n)
    loss = F.cross_entropy(as_leaf(logits), labels)
    assert loss.shape == ()
    # loss = logsumexp - logit[label] subtracts terms as large as the logits, so two correct float64 sums
    # can differ by a few ulps of that scale, which is a large part of a tiny loss (the label's logit far
    # ahead, one row): allow 4 ulps of the scale besides the relative 1e-12.
    scale = np.abs(logits).max() + np.log(c)
    np.testing.assert_allclose(loss.item(), _np_cross_entropy(logits, labels), rtol=1e-12,
                               atol=4 * np.finfo(np.float64).eps * scale)
    (g,) = gradcheck(lambda t: F.cross_entropy(t, labels), logits)
    # closed form: (softmax - onehot) / N
    p = np.exp(_np_log_softmax(logits, 1))
    p[np.arange(n), labels] -= 1
    np.testing.assert_allclose(g, p / n, rtol=1e-10, atol=1e-14)


def test_cross_entropy_labels_as_tensor_and_composite_agree():
    r = rng(18)
    logits = r.standard_normal((5, 3))
    labels = np.array([0, 2, 1, 1, 0])
    fused = F.cross_entropy(as_leaf(logits), Tensor(labels))
    composite = -as_leaf(logits).log_softmax(axis=1)[np.arange(5), labels].mean()
    np.testing.assert_allclose(fused.item(), composite.item(), rtol=1e-12)
    gradcheck(lambda t: -t.log_softmax(axis=1)[np.arange(5), labels].mean(), logits)


def test_cross_entropy_large_logits_stable():
    logits = np.array([[1000.0, 0.0, -1000.0], [0.0, 500.0, 500.0]])
    labels = np.array([0, 1])
    loss = F.cross_entropy(as_leaf(logits), labels)
    np.testing.assert_allclose(loss.item(), np.log(2) / 2, rtol=1e-12)


def test_cross_entropy_float32_keeps_dtype():
    logits = Tensor(rng(19).standard_normal((4, 3)).astype(np.float32), requires_grad=True)
    loss = F.cross_entropy(logits, [0, 1, 2, 0])
    assert loss.dtype == np.float32
    loss.backward()
    assert logits.grad.dtype == np.float32


def test_cross_entropy_bad_shapes_raise():
    with pytest.raises(mp.ShapeError):
        F.cross_entropy(as_leaf(np.zeros((3, 4))), [0, 1])
    with pytest.raises(mp.ShapeError):
        F.cross_entropy(as_leaf(np.zeros((4,))), [0, 1, 2, 3])


# ------------------------------------------------------------------------------- fused linear


@pytest.mark.parametrize("x_shape", [(5, 4), (2, 3, 4), (4,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_op(x_shape, bias):
    r = rng(20)
    x, w, b = r.standard_normal(x_shape), r.standard_normal((3, 4)), r.standard_normal(3)
    expected = x @ w.T + (b if bias else 0)
    if bias:
        out = F.linear(as_leaf(x), as_leaf(w), as_leaf(b))
        gradcheck(lambda xt, wt, bt: F.linear(xt, wt, bt), x, w, b)
    else:
        out = F.linear(as_leaf(x), as_leaf(w))
        gradcheck(lambda xt, wt: F.linear(xt, wt), x, w)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12)


def test_linear_forward_does_not_modify_inputs():
    r = rng(21)
    x, w, b = r.standard_normal((2, 4)), r.standard_normal((3, 4)), r.standard_normal(3)
    copies = [a.copy() for a in (x, w, b)]
    F.linear(as_leaf(x), as_leaf(w), as_leaf(b))
    xt, wt, bt = as_leaf(x), as_leaf(w), as_leaf(b)
    F.linear(xt, wt, bt)
    for before, t in zip(copies, (xt, wt, bt)):
        np.testing.assert_array_equal(t.data, before)


@pytest.fixture
def linear_backward_spy(monkeypatch):
    calls = []
    real = cpu_kernels.linear_backward

    def spy(g, x, w, need_x, need_w, need_b):
        calls.append((need_x, need_w, need_b))
        return real(g, x, w, need_x, need_w, need_b)

    monkeypatch.setattr(cpu_kernels, "linear_backward", spy)
    return calls


def test_linear_frozen_weight_computes_no_weight_grad(linear_backward_spy):
    r = rng(22)
    x, w, b = r.standard_normal((5, 4)), r.standard_normal((3, 4)), r.standard_normal(3)
    wt = as_leaf(w, requires_grad=False)
    gx, gw, gb = gradcheck(lambda xt, wt_, bt: F.linear(xt, wt_, bt), x, wt, b)
    assert gw is None and wt.grad is None
    assert gx is not None and gb is not None
    assert linear_backward_spy and all(call == (True, False, True) for call in linear_backward_spy)


def test_linear_input_without_grad(linear_backward_spy):
    r = rng(23)
    xt = as_leaf(r.standard_normal((5, 4)), requires_grad=False)
    w, b = r.standard_normal((3, 4)), r.standard_normal(3)
    gx, gw, gb = gradcheck(lambda x_, wt, bt: F.linear(x_, wt, bt), xt, w, b)
    assert gx is None and xt.grad is None
    np.testing.assert_allclose(gb, np.random.default_rng(0).standard_normal((5, 3)).sum(axis=0), rtol=1e-12)
    assert linear_backward_spy and all(call == (False, True, True) for call in linear_backward_spy)


def test_linear_only_bias_trainable(linear_backward_spy):
    xt = as_leaf(np.ones((2, 4)), requires_grad=False)
    wt = as_leaf(np.ones((3, 4)), requires_grad=False)
    bt = as_leaf(np.zeros(3))
    F.linear(xt, wt, bt).sum().backward()
    np.testing.assert_array_equal(bt.grad, [2.0, 2.0, 2.0])
    assert wt.grad is None and xt.grad is None
    assert linear_backward_spy == [(False, False, True)]


def test_linear_kernel_computes_only_requested_gradients():
    r = rng(32)
    g, x, w = r.standard_normal((2, 5, 3)), r.standard_normal((2, 5, 4)), r.standard_normal((3, 4))
    gx, gw, gb = cpu_kernels.linear_backward(g, x, w, False, False, True)
    assert gx is None and gw is None
    np.testing.assert_allclose(gb, g.sum(axis=(0, 1)), rtol=1e-12)
    gx, gw, gb = cpu_kernels.linear_backward(g, x, w, True, True, False)
    assert gb is None
    np.testing.assert_allclose(gx, g @ w, rtol=1e-12)
    np.testing.assert_allclose(gw, np.einsum("bto,bti->oi", g, x), rtol=1e-12)
    assert cpu_kernels.linear_backward(g, x, w, False, False, False) == (None, None, None)


def test_linear_shape_mismatch_raises():
    with pytest.raises(mp.ShapeError):
        F.linear(as_leaf(np.zeros((2, 5))), as_leaf(np.zeros((3, 4))))


# ------------------------------------------------------------------------------- dropout


def test_dropout_gradient_is_mask():
    x = rng(24).uniform(0.5, 1.5, size=(50, 40))
    p = 0.3
    mp.manual_seed(123)
    xt = as_leaf(x)
    out = F.dropout(xt, p)
    out.sum().backward()
    mask = out.numpy() / x
    scale = 1 / (1 - p)
    assert set(np.unique(np.round(mask, 12))) == {0.0, round(scale, 12)}
    np.testing.assert_allclose(xt.grad, mask, rtol=1e-12)
    assert 0.25 < np.mean(mask == 0) < 0.35
    # same seed, same mask
    mp.manual_seed(123)
    np.testing.assert_array_equal(F.dropout(as_leaf(x), p).numpy(), out.numpy())
    # a different seed gives a different mask
    mp.manual_seed(124)
    assert not np.array_equal(F.dropout(as_leaf(x), p).numpy(), out.numpy())


def test_dropout_gradcheck_with_fixed_mask():
    x = rng(25).standard_normal((4, 6))

    def fn(t):
        mp.manual_seed(7)  # every evaluation draws the same mask
        return F.dropout(t, 0.5) * t

    gradcheck(fn, x)


def test_dropout_identity_cases_and_bad_p():
    x = as_leaf(np.ones((3, 3)))
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError):
            F.dropout(x, p)


# ------------------------------------------------------------------------------- cast


def test_cast_gradient_dtype_and_values():
    x = Tensor(np.array([1.5, -2.0, 3.25], dtype=np.float32), requires_grad=True)
    y = x.double()
    assert y.dtype == np.float64
    w = np.array([0.1, 0.2, 0.3])
    (y * Tensor(w)).sum().backward()
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(x.grad, w.astype(np.float32))

    z = Tensor(np.array([1.0, 2.0]), requires_grad=True)
    h = z.float()
    assert h.dtype == np.float32
    (h * 3).sum().backward()
    assert z.grad.dtype == np.float64
    np.testing.assert_array_equal(z.grad, [3.0, 3.0])


def test_cast_gradcheck():
    x = rng(26).standard_normal((3, 2))
    gradcheck(lambda t: t.astype(np.float64) * t, x)
    np.testing.assert_array_equal(as_leaf(x).astype(np.float32).numpy(), x.astype(np.float32))


# ------------------------------------------------------------------------------- graphs


def test_tensor_used_twice():
    x = rng(27).standard_normal((3, 4))
    (g,) = gradcheck(lambda t: t * t + t, x)
    np.testing.assert_allclose(g, np.random.default_rng(0).standard_normal((3, 4)) * (2 * x + 1), rtol=1e-12)
    t = as_leaf(x)
    (t * t + t).sum().backward()
    np.testing.assert_allclose(t.grad, 2 * x + 1, rtol=1e-12)


def test_diamond_graph():
    x = rng(28).uniform(0.5, 1.5, size=(2, 3))

    def fn(t):
        a = t.exp()
        b = a * 2.0
        c = (a + 1.0).log()
        return (b * c + a).sum(axis=1)

    gradcheck(fn, x)
    t = as_leaf(x)
    fn(t).sum().backward()
    e = np.exp(x)
    np.testing.assert_allclose(t.grad, 2 * e * np.log(e + 1) + 2 * e * e / (e + 1) + e, rtol=1e-12)


def test_deep_chain_does_not_hit_recursion_limit():
    x = as_leaf([1.0])
    y = x
    for _ in range(3000):
        y = y * 1.0 + 0.0
    y.sum().backward()
    np.testing.assert_array_equal(x.grad, [1.0])


# ------------------------------------------------------------------------------- layers


def _params64(module):
    return list(module.parameters())


def test_linear_layer_gradcheck():
    mp.manual_seed(0)
    layer = nn.Linear(4, 3, dtype=np.float64)
    x = rng(29).standard_normal((5, 4))
    np.testing.assert_allclose(
        layer(as_leaf(x)).numpy(), x @ layer.weight.data.T + layer.bias.data, rtol=1e-12
    )
    gradcheck(lambda xt, *_: layer(xt), x, *_params64(layer))


def test_mlp_gradcheck():
    mp.manual_seed(1)
    model = nn.MLP([4, 6, 5, 3], dtype=np.float64)
    x = rng(30).standard_normal((4, 4))
    h = x
    for name in ("fc1", "fc2"):
        layer = getattr(model, name)
        h = np.maximum(h @ layer.weight.data.T + layer.bias.data, 0)
    expected = h @ model.fc3.weight.data.T + model.fc3.bias.data
    np.testing.assert_allclose(model(as_leaf(x)).numpy(), expected, rtol=1e-12)
    gradcheck(lambda xt, *_: model(xt), x, *_params64(model))


def test_mlp_cross_entropy_composite_gradcheck():
    mp.manual_seed(2)
    model = nn.MLP([3, 5, 4], dtype=np.float64)
    x = as_leaf(rng(31).standard_normal((6, 3)), requires_grad=False)
    labels = np.array([0, 3, 1, 2, 2, 0])
    grads = gradcheck(lambda xt, *_: F.cross_entropy(model(xt), labels), x, *_params64(model))
    assert grads[0] is None
    assert all(g is not None for g in grads[1:])
