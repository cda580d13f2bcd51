"""The fused LoRA / DoRA ops are held to their plain-ops specification (minitorch_peft.peft.reference).

Float64, every input requiring grad (so every gradient the fused backward can produce is compared),
with and without a dropout mask and a bias; DoRA with its detached norm and with dora_norm_grad=True.
Only public entry points are used: LoRAFunction / DoRAFunction.apply and LoRALinear's forward.
"""

from __future__ import annotations

import numpy as np
import pytest

from minitorch_peft import Tensor
from minitorch_peft.peft import DoRAFunction, LoRAFunction, LoRALinear, LoraConfig
from minitorch_peft.peft.reference import dora_reference, lora_reference
from minitorch_peft.testing import as_leaf, gradcheck

S = 1.75
N, IN, OUT, R = 5, 7, 6, 3


def arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((N, IN)), "W": rng.standard_normal((OUT, IN)), "A": rng.standard_normal((R, IN)),
        "B": rng.standard_normal((OUT, R)), "m": np.abs(rng.standard_normal(OUT)) + 0.5, "b": rng.standard_normal(OUT),
        "mask": (rng.random((N, IN)) >= 0.3) / 0.7, "g": rng.standard_normal((N, OUT)),
    }


def run(fn, names, v, requires_grad):
    """fn's output and the gradient of sum(g * y) for each named input (None where it gets none)."""
    leaves = [as_leaf(v[k], requires_grad=requires_grad.get(k, True)) for k in names]
    y = fn(*leaves)
    y.backward(v["g"])
    return y.numpy(), [None if t.grad is None else np.asarray(t.grad) for t in leaves]


def assert_same(fused, ref) -> None:
    np.testing.assert_allclose(fused[0], ref[0], rtol=1e-12, atol=1e-12)
    for k, (gf, gr) in enumerate(zip(fused[1], ref[1])):
        if gr is None:
            assert gf is None, f"input {k}: the fused op computed a gradient the reference does not have"
        else:
            assert gf is not None, f"input {k}: the fused op skipped a gradient"
            np.testing.assert_allclose(gf, gr, rtol=1e-10, atol=1e-12, err_msg=f"gradient of input {k}")


FROZEN_BASE = {"W": False, "b": False}


@pytest.mark.parametrize("frozen", [False, True], ids=["all-trainable", "frozen-base"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_lora_function_matches_its_reference(with_bias, with_mask, frozen) -> None:
    v = arrays()
    mask = v["mask"] if with_mask else None
    names = ["x", "W", "A", "B"] + (["b"] if with_bias else [])
    need = FROZEN_BASE if frozen else {}
    fused = run(lambda *t: LoRAFunction.apply(*t, scaling=S, mask=mask), names, v, need)
    ref = run(lambda x, W, A, B, b=None: lora_reference(x, W, A, B, b, S, mask), names, v, need)
    assert_same(fused, ref)
    if frozen:
        assert fused[1][1] is None  # the frozen base weight got no gradient at all


@pytest.mark.parametrize("norm_grad", [False, True], ids=["detached-norm", "norm-grad"])
@pytest.mark.parametrize("frozen", [False, True], ids=["all-trainable", "frozen-base"])
@pytest.mark.parametrize("with_mask", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_dora_function_matches_its_reference(with_bias, with_mask, frozen, norm_grad) -> None:
    v = arrays(1)
    mask = v["mask"] if with_mask else None
    names = ["x", "W", "A", "B", "m"] + (["b"] if with_bias else [])
    need = FROZEN_BASE if frozen else {}
    fused = run(lambda *t: DoRAFunction.apply(*t, scaling=S, mask=mask, norm_grad=norm_grad), names, v, need)
    ref = run(lambda x, W, A, B, m, b=None: dora_reference(x, W, A, B, m, b, S, mask, norm_grad), names, v, need)
    assert_same(fused, ref)


def test_the_detached_norm_changes_the_gradient_of_a_and_b_only() -> None:
    """What norm_grad changes: dA, dB (and dW) get the extra term through n; dx and dm do not."""
    v = arrays(2)
    names = ["x", "W", "A", "B", "m", "b"]
    off = run(lambda *t: dora_reference(*t[:5], t[5], S), names, v, {})
    on = run(lambda *t: dora_reference(*t[:5], t[5], S, norm_grad=True), names, v, {})
    np.testing.assert_array_equal(off[0], on[0])
    for k, name in enumerate(names):
        differs = not np.allclose(off[1][k], on[1][k], rtol=1e-9)
        assert differs == (name in ("W", "A", "B")), name


@pytest.mark.parametrize("norm_grad", [False, True])
def test_the_references_themselves_pass_gradcheck(norm_grad) -> None:
    v = arrays(3)
    mask = v["mask"]
    assert gradcheck(lambda x, W, A, B, b: lora_reference(x, W, A, B, b, S, mask),
                     [as_leaf(v[k]) for k in ("x", "W", "A", "B", "b")])
    if norm_grad:  # with a detached n, numeric differences see n move: only the norm_grad form is the true derivative
        assert gradcheck(lambda x, W, A, B, m, b: dora_reference(x, W, A, B, m, b, S, mask, True),
                         [as_leaf(v[k]) for k in ("x", "W", "A", "B", "m", "b")])
    else:  # x and m do not enter n: their gradients are exact even with n detached
        W, A, B = (as_leaf(v[k], False) for k in ("W", "A", "B"))
        assert gradcheck(lambda x, m: dora_reference(x, W, A, B, m, None, S, mask), [as_leaf(v["x"]), as_leaf(v["m"])])


@pytest.mark.parametrize("use_dora", [False, True])
def test_lora_linear_forward_is_the_reference(use_dora) -> None:
    layer = LoRALinear(IN, OUT, r=R, alpha=4.0, dtype=np.float64)
    if use_dora:
        layer.add_adapter("d", LoraConfig(r=R, lora_alpha=4.0, use_dora=True))
        layer.set_adapter("d")
    name = layer.active_adapter
    rng = np.random.default_rng(4)
    layer.lora_B[name].data[...] = rng.standard_normal((OUT, R))  # B = 0 at init would hide the adapter path
    x = Tensor(rng.standard_normal((N, IN)))
    A, B = layer.lora_A[name], layer.lora_B[name]
    if use_dora:
        m = layer.lora_magnitude_vector[name]
        want = dora_reference(x, layer.weight, A, B, m, layer.bias, layer.scaling())
    else:
        want = lora_reference(x, layer.weight, A, B, layer.bias, layer.scaling())
    np.testing.assert_allclose(layer(x).numpy(), want.numpy(), rtol=1e-12, atol=1e-12)
