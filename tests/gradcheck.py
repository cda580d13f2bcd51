"""The tests' gradient checker: ``minitorch_peft.testing`` with the tests' stricter defaults.

``gradcheck(fn, *inputs)`` checks every input that requires grad against float64 central differences
(``|analytic - numeric| <= atol + rtol |numeric|`` with rtol 1e-5, atol 1e-7) and returns the analytic
gradients, one per input (None where the input does not require grad). See minitorch_peft/testing.py.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from minitorch_peft import Tensor
from minitorch_peft.testing import GradcheckError, as_leaf, central_difference, gradcheck_report

__all__ = ["GradcheckError", "as_leaf", "gradcheck", "numerical_grad"]


def numerical_grad(fn: Callable[..., Tensor], tensors: list[Tensor], index: int, projection: np.ndarray | None,
                   eps: float = 1e-6) -> np.ndarray:
    """Central differences of sum(projection * fn(*tensors)) with respect to ``tensors[index]``."""
    return central_difference(fn, tensors, index, eps=eps, projection=projection)


def gradcheck(fn: Callable[..., Tensor], *inputs: Any, eps: float = 1e-6, rtol: float = 1e-5, atol: float = 1e-7,
              seed: int = 0) -> list[np.ndarray | None]:
    report = gradcheck_report(fn, inputs, eps=eps, atol=atol, rtol=rtol, seed=seed)
    report.raise_if_failed()
    return report.analytic
