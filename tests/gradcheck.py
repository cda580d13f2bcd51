"""Float64 central finite-difference gradient checker for the autograd engine (a test helper).

``gradcheck(fn, *inputs)`` runs ``fn`` on the inputs with the graph recorded, back-propagates a fixed
random projection of the output (or the output itself when it is a single number), and compares the
gradient that autograd left on every input that requires one with central differences

    df/dx_i ~ (f(x + eps e_i) - f(x - eps e_i)) / (2 eps),   f = sum(projection * fn(...))

computed by perturbing the input arrays in place, one element at a time, under ``no_grad``.
Inputs that do not require a gradient must come back with ``.grad`` None.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from minitorch_peft import Tensor, no_grad

__all__ = ["gradcheck", "numerical_grad", "as_leaf"]


def as_leaf(x: Any, requires_grad: bool = True) -> Tensor:
    """A float64 leaf tensor holding its own copy of ``x``."""
    return Tensor(np.array(x, dtype=np.float64), requires_grad=requires_grad)


def _scalar(out: Tensor, projection: np.ndarray | None) -> float:
    values = np.asarray(out.numpy(), dtype=np.float64)
    if projection is None:
        return float(values.reshape(()))
    return float(np.sum(values * projection))


def numerical_grad(
    fn: Callable[..., Tensor],
    tensors: list[Tensor],
    index: int,
    projection: np.ndarray | None,
    eps: float = 1e-6,
) -> np.ndarray:
    """Central differences of sum(projection * fn(*tensors)) with respect to ``tensors[index]``."""
    data = tensors[index].data
    grad = np.zeros(data.shape, dtype=np.float64)
    with no_grad():
        for i in np.ndindex(*data.shape):
            original = data[i]
            data[i] = original + eps
            plus = _scalar(fn(*tensors), projection)
            data[i] = original - eps
            minus = _scalar(fn(*tensors), projection)
            data[i] = original
            grad[i] = (plus - minus) / (2.0 * eps)
    return grad


def gradcheck(
    fn: Callable[..., Tensor],
    *inputs: Any,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-7,
    seed: int = 0,
) -> list[np.ndarray | None]:
    """Check autograd's gradient of every input of ``fn`` against central differences.

    ``inputs`` are arrays / nested lists (each becomes a float64 leaf that requires grad) or Tensors
    (used as given: a module's Parameters, say, or a tensor with requires_grad=False). Tensors that
    require grad must be float64. Returns the analytic gradients, one per input (None where none).
    """
    tensors = [x if isinstance(x, Tensor) else as_leaf(x) for x in inputs]
    for t in tensors:
        if t.requires_grad:
            assert t.dtype == np.float64, f"gradcheck needs float64 inputs, got {t.dtype}"
            assert t.is_leaf, "gradcheck inputs must be leaves"
        t.grad = None

    out = fn(*tensors)
    assert isinstance(out, Tensor), f"fn must return a Tensor, got {type(out).__name__}"
    assert out.requires_grad, "fn's output does not require grad: no graph was recorded"
    if out.size == 1:
        projection = None
        out.backward()
    else:
        projection = np.random.default_rng(seed).standard_normal(out.shape)
        out.backward(projection)

    analytic: list[np.ndarray | None] = []
    for k, t in enumerate(tensors):
        if not t.requires_grad:
            assert t.grad is None, f"input {k} does not require grad but received one"
            analytic.append(None)
            continue
        assert t.grad is not None, f"input {k} requires grad but received none"
        g = np.asarray(t.grad)
        assert g.shape == t.shape, f"input {k}: gradient shape {g.shape} != input shape {t.shape}"
        assert g.dtype == np.float64, f"input {k}: gradient dtype {g.dtype} != float64"
        numeric = numerical_grad(fn, tensors, k, projection, eps)
        np.testing.assert_allclose(g, numeric, rtol=rtol, atol=atol, err_msg=f"gradient of input {k}")
        analytic.append(g.copy())
    return analytic
