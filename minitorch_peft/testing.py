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


# ------------------------------------------------------------------------------------------- the suite


@dataclass
class Check:
    """One named gradient check: ``fn(*inputs)`` with central-difference step ``eps``; ``covers``: op classes."""

    name: str
    fn: Callable[..., Tensor]
    inputs: list[Tensor]
    eps: float = 1e-6
    covers: tuple[str, ...] = ()


def standard_checks() -> list[Check]:
    """A float64 check of every op in ``ops.py`` and of the Linear, LoRA, DoRA and 4-bit layers.

    Shapes are small and fixed (seeded), so the whole list runs in seconds. DoRA's default backward treats
    the norm as a constant, which is not the derivative of its forward: there x and m (which do not enter
    the norm) are checked numerically; the full derivative is checked with ``dora_norm_grad=True``.
    """
    from . import functional as F
    from . import ops
    from .nn.layers import Linear
    from .peft import LoraConfig, LoRALinear, QLoRALinear
    from .random import manual_seed

    rng = np.random.default_rng(0)

    def r(*shape: int, positive: bool = False) -> Tensor:
        a = rng.standard_normal(shape)
        return as_leaf(np.abs(a) + 0.5 if positive else a)

    mask = (rng.random((4, 5)) >= 0.5) * 2.0
    labels = np.array([0, 2, 1, 2])
    checks = [
        Check("add (broadcast)", lambda a, b: a + b, [r(2, 3), r(3)], covers=("Add",)),
        Check("sub (broadcast)", lambda a, b: a - b, [r(2, 1, 3), r(4, 3)], covers=("Sub",)),
        Check("mul (broadcast)", lambda a, b: a * b, [r(3), r(2, 3)], covers=("Mul",)),
        Check("div", lambda a, b: a / b, [r(2, 3), r(2, 1, positive=True)], covers=("Div",)),
        Check("neg", lambda a: -a, [r(2, 2)], covers=("Neg",)),
        Check("pow (tensor ** tensor)", lambda a, b: a ** b, [r(2, 3, positive=True), r(3)], covers=("Pow",)),
        Check("sqrt", lambda a: a.sqrt(), [r(5, positive=True)], covers=("Pow",)),
        Check("exp", lambda a: a.exp(), [r(2, 3)], covers=("Exp",)),
        Check("log", lambda a: a.log(), [r(2, 3, positive=True)], covers=("Log",)),
        Check("relu", lambda a: a.relu(), [as_leaf(np.array([[-1.3, 0.4, 2.0], [0.7, -0.2, -3.1]]))], covers=("ReLU",)),
        # float32 in the middle rounds x +- eps: a larger step keeps that rounding far below the tolerance
        Check("cast (float64 -> float32 -> float64)", lambda a: a.float().double() * 3.0, [r(3)], eps=1e-2,
              covers=("Cast",)),
        Check("matmul (batched, broadcast)", lambda a, b: a @ b, [r(2, 2, 3), r(3, 4)], covers=("MatMul",)),
        Check("matmul (vector @ matrix)", lambda a, b: a @ b, [r(3), r(3, 4)], covers=("MatMul",)),
        Check("linear", lambda x, w, b: F.linear(x, w, b), [r(4, 3), r(2, 3), r(2)], covers=("Linear",)),
        Check("sum (axes, keepdims)", lambda a: a.sum(axis=(0, 2), keepdims=True), [r(2, 3, 4)], covers=("Sum",)),
        Check("mean (axis)", lambda a: a.mean(axis=-1), [r(2, 3)], covers=("Mean",)),
        Check("max (axis)", lambda a: a.max(axis=1), [r(3, 4)], covers=("Max",)),
        Check("reshape", lambda a: a.reshape(3, 2), [r(2, 3)], covers=("Reshape",)),
        Check("transpose (axes)", lambda a: a.transpose(1, 0, 2), [r(2, 3, 4)], covers=("Transpose",)),
        Check("getitem (slice, fancy)", lambda a: a[np.array([0, 2, 0]), 1:], [r(3, 4)], covers=("GetItem",)),
        Check("log_softmax", lambda a: a.log_softmax(axis=1), [r(4, 3)], covers=("LogSoftmax",)),
        Check("cross_entropy", lambda a: F.cross_entropy(a, labels), [r(4, 3)], covers=("CrossEntropy",)),
        Check("dropout (fixed mask)", lambda a: ops.Dropout.apply(a, Tensor(mask)), [r(4, 5)], covers=("Dropout",)),
    ]

    def lora_layer(use_dora: bool = False, norm_grad: bool = False) -> LoRALinear:
        manual_seed(0)
        layer = LoRALinear.from_linear(Linear(9, 5, dtype=np.float64),
                                       config=LoraConfig(r=2, lora_alpha=3, use_dora=use_dora, dora_norm_grad=norm_grad))
        layer.lora_B["default"].data[...] = rng.standard_normal((5, 2))  # B = 0 at init would hide the A path
        return layer

    def qlora_layer(use_dora: bool = False, norm_grad: bool = False) -> QLoRALinear:
        manual_seed(0)
        layer = QLoRALinear.from_linear(Linear(70, 6, dtype=np.float64), quant_type="nf4", double_quant=True,
                                        config=LoraConfig(r=3, lora_alpha=5, use_dora=use_dora, dora_norm_grad=norm_grad))
        layer.lora_B["default"].data[...] = rng.standard_normal((6, 3))
        return layer

    def adapter(layer: LoRALinear, with_m: bool = True) -> list[Tensor]:
        ts = [layer.lora_A["default"], layer.lora_B["default"]]
        if with_m and "default" in layer.lora_magnitude_vector:
            ts.append(layer.lora_magnitude_vector["default"])
        return ts

    manual_seed(0)
    lin = Linear(9, 5, dtype=np.float64)
    checks.append(Check("nn.Linear (x, weight, bias)", lambda x, w, b: lin(x), [r(4, 9), lin.weight, lin.bias]))
    lo = lora_layer()
    checks.append(Check("LoRALinear (x, A, B; base frozen)", lambda x, a, b: lo(x), [r(4, 9), *adapter(lo)]))
    d0 = lora_layer(use_dora=True)
    checks.append(Check("DoRA, detached norm (x, m)", lambda x, m: d0(x),
                        [r(4, 9), d0.lora_magnitude_vector["default"]]))
    d1 = lora_layer(use_dora=True, norm_grad=True)
    checks.append(Check("DoRA, dora_norm_grad (x, A, B, m)", lambda x, a, b, m: d1(x), [r(4, 9), *adapter(d1)]))
    q = qlora_layer()
    checks.append(Check("QLoRALinear 4-bit NF4 (x, A, B)", lambda x, a, b: q(x), [r(5, 70), *adapter(q)]))
    qd = qlora_layer(use_dora=True, norm_grad=True)
    checks.append(Check("QDoRA 4-bit, dora_norm_grad (x, A, B, m)", lambda x, a, b, m: qd(x), [r(5, 70), *adapter(qd)]))
    return checks


def covered_ops() -> set[str]:
    """Names of the ops.py Function classes that ``standard_checks`` covers."""
    return {name for c in standard_checks() for name in c.covers}
