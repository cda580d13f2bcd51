"""LoRA+: B's learning rate is ratio times A's, and that is what the optimizer step really does."""

from __future__ import annotations

import numpy as np
import pytest

from minitorch_peft import Tensor, manual_seed
from minitorch_peft import functional as F
from minitorch_peft.nn import MLP
from minitorch_peft.optim import SGD, Adam
from minitorch_peft.peft import AdapterError, LoraConfig, add_adapter, inject_adapters, loraplus_param_groups
from minitorch_peft.train import METHODS, TrainConfig

RATIO = 16.0
LR = 1e-3


def model_with_adapters(use_dora: bool = False) -> MLP:
    manual_seed(0)
    model = MLP([20, 12, 5], dtype=np.float64)  # float64: the steps compared below are not lost to rounding
    inject_adapters(model, r=3, lora_alpha=6, use_dora=use_dora, target_modules=["fc1", "fc2"])
    g = np.random.default_rng(1)
    for name, p in model.named_parameters():
        if ".lora_B." in name:  # B = 0 would leave A without a gradient on the first step
            p.data[...] = 0.2 * g.standard_normal(p.shape)
    return model


def test_groups_put_b_at_ratio_times_lr_and_everything_else_at_lr() -> None:
    model = model_with_adapters(use_dora=True)
    model.fc2.bias.requires_grad = True  # an unfrozen bias trains at lr
    add_adapter(model, "other", LoraConfig(r=2, target_modules=["fc1"]))
    groups = loraplus_param_groups(model, LR, RATIO)
    by_id = {id(p): g["lr"] for g in groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(by_id) == sum(len(g["params"]) for g in groups)  # nothing listed twice
    lrs = {names[i]: lr for i, lr in by_id.items()}
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            assert lrs[name] == LR * RATIO
        elif ".lora_" in name or p.requires_grad:
            assert lrs[name] == LR, name
        else:
            assert name not in lrs  # frozen base weights stay out
    assert "fc2.bias" in lrs and "fc1.lora_magnitude_vector.default" in lrs and "fc1.lora_B.other" in lrs


def one_step(opt_factory, plus: bool) -> dict[str, np.ndarray]:
    """The change one optimizer step makes to every adapter tensor."""
    model = model_with_adapters()
    params = loraplus_param_groups(model, LR, RATIO) if plus else [p for p in model.parameters() if p.requires_grad]
    opt = opt_factory(params)
    x = np.random.default_rng(2).standard_normal((16, 20))
    y = np.random.default_rng(3).integers(0, 5, 16)
    before = {n: p.numpy().copy() for n, p in model.named_parameters()}
    loss = F.cross_entropy(model(Tensor(x)), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return {n: p.numpy().astype(np.float64) - before[n] for n, p in model.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("opt_factory", [lambda p: SGD(p, lr=LR), lambda p: Adam(p, lr=LR)], ids=["sgd", "adam"])
def test_the_step_of_b_is_ratio_times_larger(opt_factory) -> None:
    plain, plus = one_step(opt_factory, False), one_step(opt_factory, True)
    for name in plain:
        assert np.abs(plain[name]).max() > 0
        factor = RATIO if ".lora_B." in name else 1.0
        np.testing.assert_allclose(plus[name], factor * plain[name], rtol=1e-6, atol=1e-12, err_msg=name)


def test_adam_first_step_sizes_are_lr_and_ratio_times_lr() -> None:
    plus = one_step(lambda p: Adam(p, lr=LR), True)
    for name, d in plus.items():
        big = np.abs(d)[np.abs(d) > 0]
        expected = LR * (RATIO if ".lora_B." in name else 1.0)
        np.testing.assert_allclose(np.median(big), expected, rtol=1e-4)  # Adam's first step is lr * sign(g)


def test_bad_input_and_the_train_method() -> None:
    with pytest.raises(AdapterError, match="adapters"):
        loraplus_param_groups(MLP([4, 3]), LR)
    with pytest.raises(AdapterError, match="ratio"):
        loraplus_param_groups(model_with_adapters(), LR, ratio=0)
    manual_seed(0)
    model = MLP([784, 512, 256, 10])
    groups = METHODS["lora-plus"](model, TrainConfig(method="lora-plus", lr=2e-3, loraplus_ratio=4.0))
    assert sorted(g["lr"] for g in groups) == [2e-3, 8e-3]
    assert all(".lora_B." in n for n, p in model.named_parameters() if any(p is q for q in groups[1]["params"]))
