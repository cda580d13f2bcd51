"""Dict-like containers whose entries register as submodules / parameters under their keys."""

from __future__ import annotations

from typing import Iterator

from .module import Module, Parameter


class ParameterDict(Module):
    """name -> Parameter; state-dict keys are ``<prefix>.<name>`` (e.g. ``fc1.lora_A.default``)."""

    def __getitem__(self, key: str) -> Parameter:
        return self._parameters[key]

    def __setitem__(self, key: str, value: Parameter) -> None:
        setattr(self, key, value)

    def __delitem__(self, key: str) -> None:
        delattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self._parameters

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._parameters))

    def __len__(self) -> int:
        return len(self._parameters)

    def keys(self) -> list[str]:
        return list(self._parameters)

    def items(self) -> list[tuple[str, Parameter]]:
        return list(self._parameters.items())

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {tuple(p.shape)}" for k, p in self._parameters.items())


class ModuleDict(Module):
    """name -> Module, registered as children under their keys."""

    def __getitem__(self, key: str) -> Module:
        return self._modules[key]

    def __setitem__(self, key: str, value: Module) -> None:
        setattr(self, key, value)

    def __delitem__(self, key: str) -> None:
        delattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self._modules

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._modules))

    def __len__(self) -> int:
        return len(self._modules)

    def keys(self) -> list[str]:
        return list(self._modules)

    def items(self) -> list[tuple[str, Module]]:
        return list(self._modules.items())
