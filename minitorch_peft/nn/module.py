"""Module and Parameter: named, nestable containers of trainable and frozen tensors."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator

import numpy as np

from ..errors import MinitorchPeftError
from ..backend import Backend, backend_of, get_backend
from ..tensor import Tensor


class Parameter(Tensor):
    """A tensor that a Module owns and an optimizer may train (``requires_grad=True`` unless frozen)."""

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True, backend: str | Backend | None = None) -> None:
        super().__init__(data, requires_grad=requires_grad, backend=backend)


class StateDictError(MinitorchPeftError, ValueError):
    """A state dict that does not fit the module: missing or unexpected keys, wrong shape or dtype."""


class Module:
    """Base class: assigning a Parameter or Module attribute registers it under that name."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"{type(self).__name__}.__init__ must call super().__init__() first")
        for registry in (self._parameters, self._buffers, self._modules):
            registry.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        for registry in (self._parameters, self._buffers, self._modules):
            registry.pop(name, None)
        object.__delattr__(self, name)

    def register_buffer(self, name: str, array: Any) -> None:
        """Keep ``array`` as non-trainable state that is saved in the state dict (e.g. packed 4-bit codes)."""
        self._buffers[name] = array
        object.__setattr__(self, name, array)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------------------ traversal

    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        yield from self._modules.items()

    def children(self) -> Iterator["Module"]:
        for _, m in self.named_children():
            yield m

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Parameter]]:
        modules = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for mod_prefix, module in modules:
            for name, p in module._parameters.items():
                yield (f"{mod_prefix}.{name}" if mod_prefix else name), p

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix: str = "") -> Iterator[tuple[str, Any]]:
        for mod_prefix, module in self.named_modules(prefix):
            for name, b in module._buffers.items():
                yield (f"{mod_prefix}.{name}" if mod_prefix else name), b

    def get_submodule(self, target: str) -> "Module":
        module: Module = self
        for part in target.split(".") if target else []:
            if part not in module._modules:
                raise AttributeError(f"{type(module).__name__} has no submodule {part!r} (in {target!r})")
            module = module._modules[part]
        return module

    def set_submodule(self, target: str, new: "Module") -> None:
        parent_name, _, child = target.rpartition(".")
        setattr(self.get_submodule(parent_name), child, new)

    # ------------------------------------------------------------------------------ modes

    def train(self, mode: bool = True) -> "Module":
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    def freeze(self) -> "Module":
        """requires_grad=False for every parameter: no gradient, no optimizer state, no update."""
        for p in self.parameters():
            p.requires_grad = False
        return self

    def unfreeze(self) -> "Module":
        for p in self.parameters():
            p.requires_grad = True
        return self

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Element count of the live parameter arrays (optionally only those that require grad)."""
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    def nbytes(self) -> int:
        """Bytes held by the live parameter and buffer arrays."""
        return sum(p.nbytes for p in self.parameters()) + sum(int(b.nbytes) for _, b in self.named_buffers())

    @property
    def backend(self) -> Backend:
        for p in self.parameters():
            return p.backend
        return get_backend("numpy")

    def to(self, backend: str | Backend) -> "Module":
        """Move every parameter and buffer to ``backend`` (in place; returns self)."""
        be = get_backend(backend)
        for module in self.modules():
            for name, p in list(module._parameters.items()):
                if p.backend is not be:
                    p.data = be.asarray(p.backend.to_numpy(p.data))
                    p.backend, p.grad = be, None
            for name, b in list(module._buffers.items()):
                module.register_buffer(name, be.asarray(backend_of(b).to_numpy(b)))
        return self

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> "OrderedDict[str, Any]":
        """Name -> live array for every parameter and buffer (shared, not copied)."""
        state: OrderedDict[str, Any] = OrderedDict((n, p.data) for n, p in self.named_parameters())
        state.update(self.named_buffers())
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, source: str = "state dict") -> None:
        """Copy arrays into the live parameters/buffers, checking keys, shapes and dtypes first.

        Nothing is written unless every check passes, so a bad file never leaves a half-loaded model.
        """
        own = self.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing key(s) {', '.join(missing)}")
            if unexpected:
                parts.append(f"unexpected key(s) {', '.join(unexpected)}")
            raise StateDictError(f"{source}: {'; '.join(parts)}")
        for key, value in state.items():
            if key not in own:
                continue
            target = own[key]
            if tuple(value.shape) != tuple(target.shape):
                raise StateDictError(
                    f"{source}: key {key!r} has shape {tuple(value.shape)}, the model expects {tuple(target.shape)}"
                )
            if np.dtype(value.dtype) != np.dtype(target.dtype):
                raise StateDictError(f"{source}: key {key!r} has dtype {value.dtype}, the model expects {target.dtype}")
        for prefix, module in self.named_modules():  # checks beyond shape/dtype (e.g. a 4-bit layer's quant state)
            check = getattr(module, "check_loaded_state", None)
            if check is not None:
                check(state, prefix, source)  # raises StateDictError
        for key, value in state.items():
            if key in own:
                target = own[key]
                be = backend_of(target)
                target[...] = be.asarray(backend_of(value).to_numpy(value)) if not be.owns(value) else value

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + ("\n)" if self._modules else ")")
