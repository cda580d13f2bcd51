"""minitorch_peft.testing.gradcheck itself: it passes correct gradients and catches wrong ones."""

from __future__ import annotations

import numpy as np
import pytest

from minitorch_peft import Function, Tensor, tensor
from minitorch_peft.errors import MinitorchPeftError
from minitorch_peft.testing import GradcheckError, as_leaf, central_difference, gradcheck, gradcheck_report


class Square(Function):
    """z = a^2;  da = 2 a g."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * a

    @staticmethod
    def backward(ctx, g):
        return (2.0 * ctx.saved[0] * g,)


class WrongSquare(Square):
    """The classic slip: forgets the factor 2 on one element only, so the check must find that element."""

    @staticmethod
    def backward(ctx, g):
        grad = 2.0 * ctx.saved[0] * g
        grad[1, 2] /= 2.0
        return (grad,)


def x23() -> Tensor:
    return as_leaf(np.random.default_rng(0).standard_normal((2, 3)) + 3.0)


def test_a_correct_backward_passes() -> None:
    assert gradcheck(lambda a: Square.apply(a), [x23()]) is True
    assert gradcheck(lambda a, b: (a * b).sum(), (x23(), x23())) is True
    assert gradcheck(Square.apply, x23())  # a single tensor is accepted as the inputs


def test_a_wrong_backward_raises_naming_the_worst_element() -> None:
    with pytest.raises(GradcheckError) as info:
        gradcheck(lambda a: WrongSquare.apply(a), [x23()])
    message = str(info.value)
    assert "input 0" in message and "element [1, 2]" in message
    assert "analytic" in message and "numeric" in message and "rel error" in message
    assert isinstance(info.value, MinitorchPeftError) and isinstance(info.value, AssertionError)


def test_raise_exception_false_returns_false() -> None:
    assert gradcheck(lambda a: WrongSquare.apply(a), [x23()], raise_exception=False) is False
    assert gradcheck(lambda a: Square.apply(a), [x23()], raise_exception=False) is True


def test_report_names_input_index_and_both_values() -> None:
    a, b = x23(), x23()
    report = gradcheck_report(lambda a, b: a + WrongSquare.apply(b), [a, b])
    assert not report.passed
    w = report.worst
    assert (w.input, w.index) == (1, (1, 2))
    np.testing.assert_allclose(w.analytic * 2.0, w.numeric, rtol=1e-6)
    assert w.rel_error == pytest.approx(0.5, rel=1e-6)
    assert report.analytic[0] is not None and report.numeric[0] is not None


def test_only_inputs_that_require_grad_are_checked() -> None:
    a, c = x23(), as_leaf(np.ones((2, 3)), requires_grad=False)
    report = gradcheck_report(lambda a, c: a * c, [a, c])
    assert report.passed and report.analytic[1] is None and report.checked == 6


def test_float32_inputs_and_no_graph_are_refused() -> None:
    with pytest.raises(GradcheckError, match="float64"):
        gradcheck(lambda a: a * 2.0, [tensor(np.ones(3, dtype=np.float32), requires_grad=True)])
    with pytest.raises(GradcheckError, match="does not require grad"):
        gradcheck(lambda a: a * 2.0, [as_leaf(np.ones(3), requires_grad=False)])


def test_a_missing_gradient_is_a_failure() -> None:
    class Detaching(Function):
        @staticmethod
        def forward(ctx, a, b):
            return a + b

        @staticmethod
        def backward(ctx, g):
            return g, None  # forgets b's gradient

    with pytest.raises(GradcheckError, match="input 1 .*received none|gradient of input 1"):
        gradcheck(lambda a, b: Detaching.apply(a, b), [x23(), x23()])


def test_central_difference_matches_a_known_derivative() -> None:
    x = as_leaf([0.3, -1.2, 2.0])
    d = central_difference(lambda t: (t * t * t).sum(), [x], 0)
    np.testing.assert_allclose(d, 3 * np.array([0.3, -1.2, 2.0]) ** 2, rtol=1e-8)
    np.testing.assert_array_equal(x.numpy(), [0.3, -1.2, 2.0])  # restored exactly
