"""Combining adapters: cat is exact, svd reproduces the update, ties / dare follow their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from minitorch_peft import Tensor, manual_seed, no_grad
from minitorch_peft.checkpoint import load_model, save_model
from minitorch_peft.nn import MLP
from minitorch_peft.peft import (
    AdapterError, LoraConfig, add_adapter, combine_adapters, disable_adapters, inject_adapters, list_adapters,
    merge_adapters, set_adapter,
)
from minitorch_peft.peft.compose import combine_deltas, dare_prune, magnitude_prune, svd_factor, ties_merge


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def two_adapters(dora_b: bool = False, dtype: type = np.float64) -> MLP:
    """fc1 (12 -> 9) and fc2 (9 -> 5) with adapter "a" (r=3, alpha 5) and "b" (r=4, rsLoRA, alpha 3)."""
    manual_seed(0)
    model = MLP([12, 9, 5], dtype=dtype)
    inject_adapters(model, r=3, lora_alpha=5, adapter_name="a", target_modules=["fc1", "fc2"])
    add_adapter(model, "b", LoraConfig(r=4, lora_alpha=3, use_rslora=True, use_dora=dora_b, target_modules=["fc1", "fc2"]))
    g = rng(1)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data[...] = g.standard_normal(p.shape).astype(dtype)
        if ".lora_magnitude_vector." in name:
            p.data[...] *= g.uniform(0.5, 1.5, p.shape)
    return model


X = rng(7).standard_normal((6, 12))


def layer_out(model: MLP, adapter: str | None, layer: str = "fc1") -> np.ndarray:
    module = getattr(model, layer)
    with no_grad():
        if adapter is None:
            with disable_adapters(model):
                return module(Tensor(X[:, : module.in_features])).numpy()
        set_adapter(model, adapter)
        return module(Tensor(X[:, : module.in_features])).numpy()


def delta(model: MLP, layer: str, name: str) -> np.ndarray:
    lay = getattr(model, layer)
    return lay.merged_weight(name) - lay.base_weight()


# ------------------------------------------------------------------------------ cat, linear, svd


def test_cat_output_is_exactly_the_weighted_sum_of_the_adapters_outputs() -> None:
    model = two_adapters()
    weights = [0.7, -0.4]
    config = combine_adapters(model, ["a", "b"], weights, "c", "cat")
    assert list_adapters(model) == ["a", "b", "c"]
    assert model.fc1.active_adapter == "a"  # added inactive, as PEFT does
    assert model.fc1.lora_A["c"].shape == (7, 12)  # ranks concatenated
    # fc2 is 9 -> 5: rank 7 does not fit, so fc2 gets rank 5 there (an exact SVD of the same sum)
    assert config.rank_pattern == {"fc2": 5} and model.fc2.lora_A["c"].shape == (5, 9)
    for layer in ("fc1", "fc2"):
        base = layer_out(model, None, layer)
        expected = base + sum(w * (layer_out(model, n, layer) - base) for n, w in zip(["a", "b"], weights))
        np.testing.assert_allclose(layer_out(model, "c", layer), expected, rtol=1e-10, atol=1e-10)


def test_cat_with_per_module_ranks_scales_each_block_for_its_layer() -> None:
    """fc2's ranks (1 + 2 = 3) differ from fc1's (3 + 4 = 7): fc2's new scaling is 7/3, not 1."""
    manual_seed(0)
    model = MLP([12, 9, 5], dtype=np.float64)
    inject_adapters(model, r=3, lora_alpha=5, adapter_name="a", target_modules=["fc1", "fc2"], rank_pattern={"fc2": 1})
    add_adapter(model, "b", LoraConfig(r=4, lora_alpha=3, target_modules=["fc1", "fc2"], rank_pattern={"fc2": 2}))
    g = rng(2)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            p.data[...] = g.standard_normal(p.shape)
    config = combine_adapters(model, ["a", "b"], [0.3, 1.2], "c", "cat")
    assert config.rank_pattern == {"fc2": 3} and model.fc2.scaling("c") == pytest.approx(7 / 3)
    base = layer_out(model, None, "fc2")
    expected = base + 0.3 * (layer_out(model, "a", "fc2") - base) + 1.2 * (layer_out(model, "b", "fc2") - base)
    np.testing.assert_allclose(layer_out(model, "c", "fc2"), expected, rtol=1e-10, atol=1e-10)


def test_svd_at_full_rank_reproduces_the_update_and_truncates_optimally() -> None:
    model = two_adapters()
    weights = [0.5, 1.5]
    dw = {l: sum(w * delta(model, l, n) for n, w in zip(["a", "b"], weights)) for l in ("fc1", "fc2")}
    combine_adapters(model, ["a", "b"], weights, "full", "svd", rank=5)  # 5 = min(in, out) of fc2; fc1's update has rank 7
    np.testing.assert_allclose(delta(model, "fc2", "full"), dw["fc2"], rtol=1e-10, atol=1e-10)
    combine_adapters(model, ["a", "b"], weights, "lin", "linear", rank=5)
    np.testing.assert_allclose(delta(model, "fc1", "lin"), delta(model, "fc1", "full"), rtol=1e-10, atol=1e-10)
    s = np.linalg.svd(dw["fc1"], compute_uv=False)
    err = np.linalg.norm(delta(model, "fc1", "full") - dw["fc1"])
    np.testing.assert_allclose(err, np.sqrt((s[5:] ** 2).sum()), rtol=1e-8)  # Eckart-Young: the best rank-5 fit
    combine_adapters(model, ["a", "b"], weights, "default_rank", "svd")
    assert model.fc1.lora_A["default_rank"].shape == (4, 12)  # the largest input rank


def test_svd_factor_is_a_factorisation() -> None:
    d = rng(2).standard_normal((6, 4)) @ rng(3).standard_normal((4, 8))
    a, b = svd_factor(d, 4, 2.5)
    np.testing.assert_allclose(2.5 * b @ a, d, atol=1e-12)


def test_dora_adapters_combine_through_their_effective_update() -> None:
    model = two_adapters(dora_b=True)
    weights = [1.0, 0.5]
    dw = sum(w * delta(model, "fc2", n) for n, w in zip(["a", "b"], weights))
    combine_adapters(model, ["a", "b"], weights, "c", "svd", rank=5)
    assert not model.fc2.configs["c"].use_dora
    np.testing.assert_allclose(delta(model, "fc2", "c"), dw, rtol=1e-10, atol=1e-10)
    with pytest.raises(AdapterError, match="'cat' cannot express DoRA"):
        combine_adapters(model, ["a", "b"], weights, "d", "cat")


def test_a_combined_adapter_survives_a_checkpoint(tmp_path) -> None:
    model = two_adapters(dtype=np.float32)  # checkpoints hold float32 models
    combine_adapters(model, ["a", "b"], [0.5, 0.5], "c", "cat")
    set_adapter(model, "c")
    save_model(model, tmp_path / "m")
    loaded, config = load_model(tmp_path / "m")
    assert config["active_adapter"] == "c" and config["adapters"]["c"]["rank_pattern"] == {"fc2": 5}
    with no_grad():
        x = X.astype(np.float32)
        np.testing.assert_array_equal(loaded(Tensor(x)).numpy(), model(Tensor(x)).numpy())


# ------------------------------------------------------------------------------ ties, dare


def test_magnitude_prune_keeps_the_largest_entries() -> None:
    d = np.array([[0.1, -3.0, 0.5], [2.0, -0.2, 1.0]])
    np.testing.assert_array_equal(magnitude_prune(d, 0.5), [[0, -3.0, 0], [2.0, 0, 1.0]])
    np.testing.assert_array_equal(magnitude_prune(d, 1.0), d)
    np.testing.assert_array_equal(magnitude_prune(d, 0.1), np.zeros_like(d))


def test_ties_merge_on_hand_made_matrices() -> None:
    d1 = np.array([[1.0, -2.0, 0.0], [3.0, 2.0, 0.0]])
    d2 = np.array([[2.0, 1.0, 0.0], [-1.0, -2.0, 0.0]])
    d3 = np.array([[-4.0, 3.0, 0.0], [-1.0, 0.0, 0.0]])
    w = [1.0, 2.0, 0.5]
    # elected signs from the unweighted sums [[-1, 2, 0], [1, 0, 0]]: [[-, +, +], [+, +, +]] (a zero sum elects +)
    # [0,0]: only d3 agrees -> 0.5 * -4 / 1;  [0,1]: d2, d3 agree -> (2*1 + 0.5*3) / 2;  [0,2]: nobody -> 0
    # [1,0]: only d1 agrees -> 1 * 3 / 1;  [1,1]: only d1 (+) agrees -> 1 * 2 / 1;  [1,2]: zeros never agree -> 0
    expected = np.array([[-2.0, 1.75, 0.0], [3.0, 2.0, 0.0]])
    np.testing.assert_allclose(ties_merge([d1, d2, d3], w), expected)
    # with trimming first (density 0.5 keeps the 3 largest of 6 entries of each)
    t = [magnitude_prune(d, 0.5) for d in (d1, d2, d3)]
    np.testing.assert_array_equal(t[0], [[0, -2.0, 0], [3.0, 2.0, 0]])
    np.testing.assert_allclose(combine_deltas([d1, d2, d3], w, "ties", density=0.5), ties_merge(t, w))


def test_dare_drops_with_probability_one_minus_density_and_rescales() -> None:
    d = rng(4).standard_normal((200, 300))
    out = dare_prune(d, 0.3, np.random.default_rng(5))
    keep = np.random.default_rng(5).random(d.shape) < 0.3
    np.testing.assert_array_equal(out, np.where(keep, d / 0.3, 0.0))
    assert abs(keep.mean() - 0.3) < 0.01
    w = [0.5, 2.0]
    d2 = rng(6).standard_normal((200, 300))
    r = np.random.default_rng(9)
    dropped = [dare_prune(d, 0.3, r), dare_prune(d2, 0.3, r)]
    np.testing.assert_array_equal(combine_deltas([d, d2], w, "dare_linear", 0.3, np.random.default_rng(9)),
                                  0.5 * dropped[0] + 2.0 * dropped[1])
    np.testing.assert_array_equal(combine_deltas([d, d2], w, "dare_ties", 0.3, np.random.default_rng(9)), ties_merge(dropped, w))


@pytest.mark.parametrize("combination", ["ties", "dare_linear", "dare_ties"])
def test_pruning_combinations_on_a_model_follow_the_definitions(combination: str) -> None:
    model = two_adapters()
    weights = [0.8, 0.6]
    deltas = {l: [delta(model, l, n) for n in ("a", "b")] for l in ("fc1", "fc2")}
    combine_adapters(model, ["a", "b"], weights, "c", combination, rank=5, density=0.4, seed=3)
    r = np.random.default_rng(3)  # one generator, layer by layer in model order, adapter by adapter
    for layer in ("fc1", "fc2"):
        expected = combine_deltas(deltas[layer], weights, combination, 0.4, r)
        if layer == "fc2":  # rank 5 is full rank for fc2: the factorisation is exact there
            np.testing.assert_allclose(delta(model, layer, "c"), expected, rtol=1e-10, atol=1e-10)
    combine_adapters(model, ["a", "b"], weights, "again", combination, rank=5, density=0.4, seed=3)
    np.testing.assert_array_equal(model.fc1.lora_B["again"].numpy(), model.fc1.lora_B["c"].numpy())  # seeded


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(combination="mean"), "unknown combination 'mean'"),
        (dict(weights=[1.0]), "1 weight(s) for 2 adapter(s)"),
        (dict(names=["a", "zzz"]), "unknown adapter 'zzz'"),
        (dict(names=["a", "a"]), "repeat"),
        (dict(new_name="b"), "already taken"),
        (dict(combination="ties"), "needs a density"),
        (dict(combination="dare_ties", density=1.5), "density must be in (0, 1]"),
        (dict(rank=6), "larger than min(in, out) = 5 of module 'fc2'"),
        (dict(combination="cat", rank=3), "'cat' gives rank 7"),
        (dict(weights=[1.0, float("nan")]), "finite"),
    ],
)
def test_bad_combinations_are_adapter_errors(kwargs: dict, needle: str) -> None:
    model = two_adapters()
    args = dict(names=["a", "b"], weights=[0.5, 0.5], new_name="c", combination="svd")
    args.update(kwargs)
    with pytest.raises(AdapterError) as e:
        combine_adapters(model, args.pop("names"), args.pop("weights"), args.pop("new_name"), **args)
    assert needle in str(e.value)
    assert list_adapters(model) == ["a", "b"]  # nothing was added


def test_adapters_on_different_targets_do_not_combine() -> None:
    model = two_adapters()
    add_adapter(model, "only_fc1", LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(AdapterError, match=r"target different modules \(a: fc1, fc2; only_fc1: fc1\)"):
        combine_adapters(model, ["a", "only_fc1"], [1, 1], "c", "svd")
    merge_adapters(model)
    with pytest.raises(AdapterError, match="unmerge"):
        combine_adapters(model, ["a", "b"], [1, 1], "c", "svd")
