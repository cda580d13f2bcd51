"""Gradient checking: autograd's gradients against float64 central differences (``torch.autograd.gradcheck``).

For a function ``f`` of tensors whose output ``y`` is not a single number, both sides are taken of the
scalar ``L = sum(p * y)`` with a fixed random projection ``p`` (seeded), so one backward pass gives
``J^T p`` for every input at once. Autograd's side is what ``L.backward()`` leaves in each input's
``.grad``; the numeric side perturbs one element of one input at a time, in place, under ``no_grad``:

    dL/dx_i ~ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)        (error O(eps^2) for smooth f)

An element passes when ``|analytic - numeric| <= atol + rtol * |numeric|`` (NumPy's ``allclose``); the
check fails on the worst element and names it. Inputs that require grad must be float64 leaves: in float32
the rounding of ``L(x +- eps e_i)`` swamps the difference. A function that draws random numbers (dropout)
must draw the same ones on every call: pass the mask in instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import MinitorchPeftError
from .tensor import Tensor, no_grad

__all__ = [
    "GradcheckError", "GradcheckReport", "Worst", "as_leaf", "central_difference", "gradcheck", "gradcheck_report",
]


class GradcheckError(MinitorchPeftError, AssertionError):
    """Autograd's gradient disagrees with central differences (or the function cannot be checked)."""


def as_leaf(x: Any, requires_grad: bool = True) -> Tensor:
    """A float64 leaf tensor holding its own copy of ``x``."""
    return Tensor(np.array(x, dtype=np.float64), requires_grad=requires_grad)


def _scalar(out: Tensor, projection: np.ndarray | None) -> float:
    values = np.asarray(out.numpy(), dtype=np.float64)
    if projection is None:
        return float(values.reshape(()))
    return float(np.sum(values * projection))


def central_difference(
    fn: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    index: int,
    eps: float = 1e-6,
    projection: np.ndarray | None = None,
) -> np.ndarray:
    """d sum(projection * fn(*inputs)) / d inputs[index] by central differences (float64, host array).

    Without ``projection`` the output of ``fn`` must be a single number. ``inputs[index]`` is perturbed in
    place, one element at a time, and restored exactly.
    """
    data = inputs[index].data
    grad = np.zeros(tuple(data.shape), dtype=np.float64)
    with no_grad():
        for i in np.ndindex(*grad.shape):
            original = data[i]
            data[i] = original + eps
            plus = _scalar(fn(*inputs), projection)
            data[i] = original - eps
            minus = _scalar(fn(*inputs), projection)
            data[i] = original
            grad[i] = (plus - minus) / (2.0 * eps)
    return grad


@dataclass
class Worst:
    """The element that came closest to (or furthest past) the tolerance."""

    input: int
    index: tuple[int, ...]
    analytic: float
    numeric: float

    @property
    def abs_error(self) -> float:
        return abs(self.analytic - self.numeric)

    @property
    def rel_error(self) -> float:
        return self.abs_error / abs(self.numeric) if self.numeric != 0 else (0.0 if self.analytic == 0 else float("inf"))


@dataclass
class GradcheckReport:
    """Both gradients of every input, the tolerances, and the worst element.

    ``analytic[k]`` / ``numeric[k]`` are None for an input that does not require grad. ``max_rel_error``
    is the largest ``|a - n| / max(|n|, atol)`` over all checked elements (the floor ``atol`` keeps a
    gradient that is zero on both sides, or nearly so, from reading as a huge relative error).
    """

    analytic: list[np.ndarray | None]
    numeric: list[np.ndarray | None]
    atol: float
    rtol: float
    worst: Worst | None = None
    max_rel_error: float = 0.0
    max_abs_error: float = 0.0
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        if self.problems:
            return False
        w = self.worst
        return w is None or w.abs_error <= self.atol + self.rtol * abs(w.numeric)

    def message(self) -> str:
        if self.problems:
            return "; ".join(self.problems)
        w = self.worst
        if w is None:
            return "no input requires grad: nothing to check"
        verdict = "ok" if self.passed else "MISMATCH"
        return (
            f"{verdict}: gradient of input {w.input}, element {list(w.index)}: analytic {w.analytic:.10g}, "
            f"numeric {w.numeric:.10g}, abs error {w.abs_error:.3g}, rel error {w.rel_error:.3g} "
            f"(allowed: abs error <= atol {self.atol:g} + rtol {self.rtol:g} * |numeric|)"
        )

    def raise_if_failed(self) -> None:
        if not self.passed:
            raise GradcheckError(self.message())


def _as_inputs(inputs: Any) -> list[Tensor]:
    if isinstance(inputs, Tensor):
        inputs = (inputs,)
    return [x if isinstance(x, Tensor) else as_leaf(x) for x in inputs]


def gradcheck_report(
    fn: Callable[..., Tensor],
    inputs: Any,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    seed: int = 0,
) -> GradcheckReport:
    """Run the check and return everything it found (see ``gradcheck``); raises only if ``fn`` cannot be checked."""
    tensors = _as_inputs(inputs)
    for k, t in enumerate(tensors):
        if t.requires_grad:
            if np.dtype(t.dtype) != np.float64:
                raise GradcheckError(f"input {k} requires grad but is {t.dtype}: gradcheck needs float64 inputs")
            if not t.is_leaf:
                raise GradcheckError(f"input {k} is not a leaf: pass the tensors the graph starts from")
        t.grad = None

    out = fn(*tensors)
    if not isinstance(out, Tensor):
        raise GradcheckError(f"fn must return a Tensor, got {type(out).__name__}")
    if not out.requires_grad:
        raise GradcheckError("fn's output does not require grad: no graph was recorded")
    if out.size == 1:
        projection = None
        out.backward()
    else:
        projection = np.random.default_rng(seed).standard_normal(out.shape)
        out.backward(out.backend.asarray(projection, dtype=out.dtype))

    report = GradcheckReport([], [], atol, rtol)
    worst_ratio = -1.0
    for k, t in enumerate(tensors):
        if not t.requires_grad:
            if t.grad is not None:
                report.problems.append(f"input {k} does not require grad but received one")
            report.analytic.append(None)
            report.numeric.append(None)
            continue
        if t.grad is None:
            report.problems.append(f"gradient of input {k}: it requires grad but received none")
            report.analytic.append(None)
            report.numeric.append(None)
            continue
        g = np.asarray(t.backend.to_numpy(t.grad))
        if g.shape != t.shape or g.dtype != np.float64:
            report.problems.append(f"gradient of input {k}: shape {g.shape} / dtype {g.dtype}, "
                                   f"expected {t.shape} / float64")
        numeric = central_difference(fn, tensors, k, eps, projection)
        report.analytic.append(g.copy())
        report.numeric.append(numeric)
        if g.shape != numeric.shape:
            continue
        err = np.abs(g - numeric)
        report.checked += err.size
        if err.size == 0:
            continue
        report.max_abs_error = max(report.max_abs_error, float(err.max()))
        report.max_rel_error = max(report.max_rel_error, float((err / np.maximum(np.abs(numeric), atol)).max()))
        ratio = err / (atol + rtol * np.abs(numeric))
        ratio = np.where(np.isnan(ratio), np.inf, ratio)  # a NaN gradient is the worst of all
        i = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
        if float(ratio[i]) > worst_ratio:
            worst_ratio = float(ratio[i])
            report.worst = Worst(k, tuple(int(j) for j in i), float(g[i]), float(numeric[i]))
    return report


def gradcheck(
    fn: Callable[..., Tensor],
    inputs: Any,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    raise_exception: bool = True,
    seed: int = 0,
) -> bool:
    """True if autograd's gradient of ``fn`` matches float64 central differences for every input.

    ``inputs``: a Tensor or a sequence of them (arrays and nested lists become float64 leaves that require
    grad); only those that require grad are checked, and those that do not must receive no gradient.
    ``fn(*inputs)`` must return a Tensor. On a mismatch this raises ``GradcheckError`` naming the worst
    element (input index, element index, analytic and numeric values, absolute and relative error), or
    returns False when ``raise_exception=False``. The defaults are PyTorch's tolerances.
    """
    try:
        report = gradcheck_report(fn, inputs, eps=eps, atol=atol, rtol=rtol, seed=seed)
        report.raise_if_failed()
    except GradcheckError:
        if raise_exception:
            raise
        return False
    return True
