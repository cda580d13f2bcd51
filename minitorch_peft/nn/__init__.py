"""Neural-network building blocks."""

from .containers import ModuleDict, ParameterDict
from .layers import MLP, Dropout, Linear, ReLU, Sequential, kaiming_uniform
from .module import Module, Parameter, StateDictError

__all__ = ["MLP", "Dropout", "Linear", "Module", "ModuleDict", "Parameter", "ParameterDict", "ReLU", "Sequential", "StateDictError", "kaiming_uniform"]
