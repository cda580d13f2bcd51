"""Neural-network building blocks."""

from .layers import MLP, Dropout, Linear, ReLU, Sequential, kaiming_uniform
from .module import Module, Parameter, StateDictError

__all__ = ["MLP", "Dropout", "Linear", "Module", "Parameter", "ReLU", "Sequential", "StateDictError", "kaiming_uniform"]
