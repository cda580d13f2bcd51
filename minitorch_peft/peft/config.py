"""LoraConfig: the settings of one adapter, validated where they are made (Hugging Face PEFT's names)."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..errors import MinitorchPeftError, MinitorchPeftWarning

INITS = ("kaiming", "gaussian")


class AdapterError(MinitorchPeftError, ValueError):
    """An adapter setting, target or file that cannot work; the message names the problem."""


class RankWarning(MinitorchPeftWarning):
    """An adapter's rank exceeds a layer's min(in, out): allowed (as PEFT allows it), but worth one line."""


def warn_wide_ranks(notes: list[str | None]) -> None:
    """One warning for every layer whose rank exceeds its width (``check_fits`` notes; None = fits)."""
    notes = [n for n in notes if n]
    if notes:
        warnings.warn(notes[0] if len(notes) == 1 else "; ".join(notes), RankWarning, stacklevel=3)


@dataclass
class LoraConfig:
    """One adapter: rank ``r``, ``lora_alpha``, dropout, rsLoRA/DoRA switches and the modules it targets."""

    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: str = "kaiming"
    target_modules: list[str] | str = field(default_factory=lambda: ["fc1", "fc2", "fc3"])
    dora_norm_grad: bool = False  # DoRA: let the gradient flow through ||W0 + s B A|| (the paper detaches it)
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module name (or suffix) -> its own r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module name (or suffix) -> its own alpha

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise AdapterError(f"rank r must be an integer >= 1, got {self.r!r}")
        if not (isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise AdapterError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.init_lora_weights not in INITS:
            raise AdapterError(f"init_lora_weights must be one of {', '.join(INITS)}, got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = list(self.target_modules)
            if not self.target_modules:
                raise AdapterError("target_modules is empty")
        elif self.target_modules != "all-linear":
            raise AdapterError(f"target_modules must be a list of names or 'all-linear', got {self.target_modules!r}")
        self.lora_alpha = float(self.lora_alpha)
        for label, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict):
                raise AdapterError(f"{label} must map module names to values, got {pattern!r}")
        for module, r in self.rank_pattern.items():
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise AdapterError(f"rank_pattern[{module!r}] must be an integer >= 1, got {r!r}")
        for module, alpha in self.alpha_pattern.items():
            if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
                raise AdapterError(f"alpha_pattern[{module!r}] must be > 0, got {alpha!r}")

    def for_module(self, name: str) -> "LoraConfig":
        """This config as module ``name`` uses it: r and alpha from the patterns where a key names it.

        A key matches a module by its full name or a dotted suffix, as targets do. The result has empty
        patterns, so every layer holds its own effective r and alpha.
        """
        def lookup(pattern: dict[str, Any], default: Any) -> Any:
            for key, value in pattern.items():
                if name == key or name.endswith("." + key):
                    return value
            return default

        if not self.rank_pattern and not self.alpha_pattern:
            return self
        return replace(self, r=lookup(self.rank_pattern, self.r), lora_alpha=lookup(self.alpha_pattern, self.lora_alpha),
                       rank_pattern={}, alpha_pattern={})

    @property
    def scaling(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (which keeps the update's scale stable as r grows)."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def check_fits(self, name: str, in_features: int, out_features: int) -> str | None:
        """Any rank >= 1 fits any layer, as in PEFT; above min(in, out) returns the one-line note to show.

        B A has rank at most min(in, out), so a larger r adds parameters but no expressive power; the
        math (forward, gradients, merge) is the same, so it is accepted and said once, never refused.
        """
        width = min(in_features, out_features)
        if self.r > width:
            return f"rank r={self.r} exceeds min(in, out) = {width} of module {name!r} (allowed, as in PEFT; the extra rank adds parameters, not expressive power)"
        return None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        try:
            return cls(**known)
        except TypeError as e:
            raise AdapterError(f"bad adapter config: {e}") from None
