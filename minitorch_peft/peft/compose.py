"""Combine named adapters into a new LoRA adapter: concatenation, or merging of their weight updates.

For adapters i with weights w_i and per-layer updates dW_i = s_i B_i A_i (for DoRA: the merged weight
minus W0), each combination gives a new update per layer:

- ``cat``: A = [A_1; A_2; ...], B = [c_1 B_1, c_2 B_2, ...] with c_i = w_i s_i / s_new: the new adapter's
  output is exactly sum_i w_i (adapter i's output). Its rank is the sum of the ranks.
- ``linear`` / ``svd``: dW = sum_i w_i dW_i, re-factored by truncated SVD. (Hugging Face PEFT's
  ``linear`` mixes the A's and the B's separately, which adds cross terms B_i A_j; here both names work
  on the updates themselves, so there are none.)
- ``ties``: each dW_i trimmed to its top ``density`` share by magnitude, a sign elected per entry from
  the sum of the trimmed updates, then the mean over the entries that agree with it of w_i dW_i.
- ``dare_linear``: each dW_i randomly dropped with probability 1 - density and rescaled by 1/density
  (seeded), then sum_i w_i dW_i.
- ``dare_ties``: DARE dropping, then the TIES sign election and disjoint mean.

All but ``cat`` end in a truncated SVD, dW ~ U_r S_r V_r^T, stored as B = U_r S_r / s_new, A = V_r^T,
to a rank (default: the largest input rank; for ``cat`` the sum). A layer where the default rank exceeds
min(in, out) gets rank min(in, out) there, which loses nothing (``cat`` then uses the SVD, still exact);
an explicit rank that large is refused.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..nn.module import Module
from ..schema import check_adapter_name
from ..serialize import CheckpointError
from .config import AdapterError, LoraConfig
from .lora import LoRALinear
from .model import add_adapter, list_adapters, lora_layers

COMBINATIONS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties")
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties")


# ----------------------------------------------------------------------------------- the definitions


def magnitude_prune(delta: np.ndarray, density: float) -> np.ndarray:
    """TIES trim: keep the int(density * size) entries of largest magnitude, zero the rest."""
    k = int(density * delta.size)
    out = np.zeros_like(delta)
    if k <= 0:
        return out
    flat = np.abs(delta).ravel()
    keep = np.argpartition(flat, flat.size - k)[flat.size - k:]
    out.ravel()[keep] = delta.ravel()[keep]
    return out


def dare_prune(delta: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE: drop each entry with probability 1 - density, rescale the survivors by 1 / density."""
    keep = rng.random(delta.shape) < density
    return np.where(keep, delta / density, 0.0)


def ties_merge(deltas: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """Elect a sign per entry from the sum of the (pruned) deltas (ties go to +), then the disjoint mean:
    the sum of w_i delta_i over the deltas whose sign agrees, divided by how many agree (at least 1)."""
    stacked = np.stack(deltas)
    elected = np.where(stacked.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(stacked) == elected  # zeros never agree: a pruned entry does not count
    weighted = stacked * np.asarray(weights, dtype=stacked.dtype).reshape(-1, *([1] * (stacked.ndim - 1)))
    return (weighted * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)


def combine_deltas(
    deltas: Sequence[np.ndarray], weights: Sequence[float], combination: str,
    density: float = 1.0, rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The combined update of one layer for every combination except ``cat``."""
    if combination in ("linear", "svd"):
        return sum(w * d for w, d in zip(weights, deltas))
    if combination == "ties":
        return ties_merge([magnitude_prune(d, density) for d in deltas], weights)
    rng = rng if rng is not None else np.random.default_rng(0)
    dropped = [dare_prune(d, density, rng) for d in deltas]
    if combination == "dare_linear":
        return sum(w * d for w, d in zip(weights, dropped))
    if combination == "dare_ties":
        return ties_merge(dropped, weights)
    raise AdapterError(f"unknown combination {combination!r}; valid: {', '.join(COMBINATIONS)}")


def svd_factor(delta: np.ndarray, rank: int, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with scaling * B @ A the best rank-``rank`` approximation of ``delta`` (Eckart-Young)."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    return vt[:rank].copy(), (u[:, :rank] * s[:rank]) / scaling


# ----------------------------------------------------------------------------------- on a model


def _delta(layer: LoRALinear, name: str) -> np.ndarray:
    """Adapter ``name``'s update of ``layer``'s weight, in float64 on the host."""
    be = layer.weight.backend
    d = layer.updates[name].weight_change(layer, layer.base_weight())
    return np.asarray(be.to_numpy(d), dtype=np.float64)


def _check(model: Module, names: Sequence[str], weights: Sequence[float], new_name: str, combination: str,
           rank: int | None, density: float | None) -> list[tuple[str, LoRALinear]]:
    if combination not in COMBINATIONS:
        raise AdapterError(f"unknown combination {combination!r}; valid: {', '.join(COMBINATIONS)}")
    names = list(names)
    if not names:
        raise AdapterError("no adapters to combine")
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter names repeat: {', '.join(names)}")
    if len(weights) != len(names):
        raise AdapterError(f"{len(weights)} weight(s) for {len(names)} adapter(s): give one weight per adapter")
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in weights):
        raise AdapterError(f"weights must be finite numbers, got {list(weights)}")
    known = list_adapters(model)
    for n in names:
        if n not in known:
            raise AdapterError(f"unknown adapter {n!r}; the model has: {', '.join(known) or 'none'}")
    if not new_name or new_name in known:
        raise AdapterError(f"new adapter name {new_name!r} is empty or already taken")
    try:  # it becomes part of the saved array keys (fc1.lora_A.<name>): a name a model folder cannot hold is refused
        check_adapter_name(new_name, "new adapter name")
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise AdapterError(f"rank must be an integer >= 1, got {rank!r}")
    if combination in _NEEDS_DENSITY:
        if density is None:
            raise AdapterError(f"combination {combination!r} needs a density in (0, 1]")
        if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
            raise AdapterError(f"density must be in (0, 1], got {density!r}")
    layers = list(lora_layers(model))
    targets = {n: [ln for ln, l in layers if n in l.configs] for n in names}
    first = names[0]
    for n in names[1:]:
        if targets[n] != targets[first]:
            raise AdapterError(
                f"adapters {first!r} and {n!r} target different modules "
                f"({first}: {', '.join(targets[first])}; {n}: {', '.join(targets[n])}); only adapters on the same modules combine"
            )
    chosen = [(ln, l) for ln, l in layers if first in l.configs]
    if any(l.merged for _, l in chosen):
        raise AdapterError("a layer is merged: unmerge the adapters before combining them")
    if combination == "cat":
        dora = [n for n in names if any(l.configs[n].use_dora for _, l in chosen)]
        if dora:
            raise AdapterError(f"'cat' cannot express DoRA adapter(s) {', '.join(dora)} exactly; use svd, linear, ties or dare")
        total = sum(chosen[0][1].configs[n].r for n in names)
        if rank is not None and rank != total:
            raise AdapterError(f"'cat' gives rank {total} (the sum of the ranks); use 'svd' to choose rank {rank}")
    if rank is not None:
        for ln, l in chosen:
            if rank > min(l.in_features, l.out_features):
                raise AdapterError(
                    f"rank {rank} is larger than min(in, out) = {min(l.in_features, l.out_features)} of module {ln!r}"
                )
    return chosen


def _check_fits(module: str, values: np.ndarray, dtype: Any, names: Sequence[str], weights: Sequence[float]) -> None:
    """Refuse a combination whose values are not finite in ``dtype`` (the adapter's): it would save as inf or NaN."""
    limit = float(np.finfo(dtype).max)
    if values.size and not (np.isfinite(values).all() and float(np.abs(values).max()) <= limit):
        raise AdapterError(f"combining {', '.join(names)} with weights {', '.join(f'{w:g}' for w in weights)} overflows "
                           f"in module {module!r} (values beyond {np.dtype(dtype).name}): use smaller weights")


def combine_adapters(
    model: Module,
    names: Sequence[str],
    weights: Sequence[float],
    new_name: str,
    combination: str = "svd",
    rank: int | None = None,
    density: float | None = None,
    seed: int = 0,
) -> LoraConfig:
    """Add adapter ``new_name``, the combination of adapters ``names`` with ``weights`` (see the module doc).

    The new adapter is a plain LoRA adapter on the same modules, added inactive (``set_adapter`` to use
    it). ``density`` is required by ties / dare_linear / dare_ties; ``seed`` makes DARE's drops repeatable.
    Returns the new adapter's config.
    """
    names, weights = list(names), list(weights)
    chosen = _check(model, names, weights, new_name, combination, rank, density)
    weights = [float(w) for w in weights]
    rng = np.random.default_rng(seed)
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    ranks: dict[str, int] = {}
    for ln, layer in chosen:
        cfgs = [layer.configs[n] for n in names]
        limit = min(layer.in_features, layer.out_features)
        wanted = rank if rank is not None else (sum(c.r for c in cfgs) if combination == "cat" else max(c.r for c in cfgs))
        ranks[ln] = min(wanted, limit)
    nominal = max(ranks.values())
    config = LoraConfig(
        r=nominal, lora_alpha=float(nominal), lora_dropout=chosen[0][1].configs[names[0]].lora_dropout,
        target_modules=[ln for ln, _ in chosen],
        rank_pattern={ln: r for ln, r in ranks.items() if r != nominal},
    )
    for ln, layer in chosen:
        s_new = config.for_module(ln).scaling
        be = layer.weight.backend
        # huge weights may overflow on the way: no RuntimeWarning, the result is checked below and refused by name
        with np.errstate(over="ignore", invalid="ignore"):
            if combination == "cat" and ranks[ln] == sum(layer.configs[n].r for n in names):
                a = np.concatenate([np.asarray(be.to_numpy(layer.lora_A[n].data), dtype=np.float64) for n in names])
                b = np.concatenate([
                    np.asarray(be.to_numpy(layer.lora_B[n].data), dtype=np.float64) * (w * layer.configs[n].scaling / s_new)
                    for n, w in zip(names, weights)
                ], axis=1)
            else:
                deltas = [_delta(layer, n) for n in names]
                if combination == "cat":  # the concatenation would exceed min(in, out): the exact sum, re-factored
                    delta = combine_deltas(deltas, weights, "linear")
                else:
                    delta = combine_deltas(deltas, weights, combination, density if density is not None else 1.0, rng)
                _check_fits(ln, delta, np.float64, names, weights)  # the SVD of a non-finite matrix fails obscurely
                a, b = svd_factor(delta, ranks[ln], s_new)
        for factor in (a, b):
            _check_fits(ln, factor, layer.weight.dtype, names, weights)
        factors[ln] = (a, b)
    add_adapter(model, new_name, config)
    for ln, layer in chosen:
        a, b = factors[ln]
        xp, dtype = layer.weight.backend.xp, layer.weight.dtype
        layer.lora_A[new_name].data[...] = xp.asarray(a.astype(dtype))
        layer.lora_B[new_name].data[...] = xp.asarray(b.astype(dtype))
    return config
