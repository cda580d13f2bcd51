"""Optimizers that leave frozen tensors alone: no state, no work."""

from .adam import Adam, AdamW
from .optimizer import Optimizer, OptimizerStateError
from .sgd import SGD

__all__ = ["Adam", "AdamW", "Optimizer", "OptimizerStateError", "SGD"]
