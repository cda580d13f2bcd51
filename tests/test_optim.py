"""Adam and SGD against hand-written reference formulas (PyTorch's conventions); groups; frozen tensors."""

from __future__ import annotations

import numpy as np
import pytest

import minitorch_peft as mp
from minitorch_peft import Tensor, nn
from minitorch_peft import functional as F
from minitorch_peft.optim import SGD, Adam, AdamW

P0 = np.array([[0.5, -1.25, 2.0], [-0.75, 0.0, 1.5]])
C = np.array([[1.0, -2.0, 0.5], [3.0, 0.25, -1.0]])


def grad_of(p: np.ndarray) -> np.ndarray:
    """Gradient of a made-up loss sum(c * p^2 / 2 + p^3 / 3): depends on p, so steps interact."""
    return C * p + p * p


def ref_adam(p, steps, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
    b1, b2 = betas
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    history = []
    for t in range(1, steps + 1):
        g = grad_of(p)
        if weight_decay and not decoupled:
            g = g + weight_decay * p
        if weight_decay and decoupled:
            p = p * (1 - lr * weight_decay)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        history.append(p.copy())
    return history


def ref_sgd(p, steps, lr, momentum=0.0, weight_decay=0.0):
    p = p.astype(np.float64).copy()
    buf = None
    history = []
    for _ in range(steps):
        g = grad_of(p) + weight_decay * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + g
            g = buf
        p = p - lr * g
        history.append(p.copy())
    return history


def run(opt_factory, dtype, steps=3):
    p = Tensor(P0.astype(dtype), requires_grad=True)
    opt = opt_factory([p])
    history = []
    for _ in range(steps):
        p.grad = grad_of(p.data.astype(np.float64)).astype(dtype)
        opt.step()
        assert p.dtype == dtype
        history.append(p.data.astype(np.float64).copy())
    return history, opt, p


TOL = {np.float64: dict(rtol=1e-12, atol=1e-14), np.float32: dict(rtol=2e-5, atol=1e-6)}

ADAM_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, betas=(0.8, 0.99), eps=1e-6),
    dict(lr=0.1, weight_decay=0.1, decoupled=False),
    dict(lr=0.1, weight_decay=0.1, decoupled=True),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kw", ADAM_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_adam_matches_reference(kw, dtype):
    got, opt, p = run(lambda ps: Adam(ps, **kw), dtype)
    expected = ref_adam(P0, 3, **kw)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, **TOL[dtype])
    assert opt.state[id(p)]["step"] == 3


def test_adam_coupled_and_decoupled_differ():
    a, _, _ = run(lambda ps: Adam(ps, lr=0.1, weight_decay=0.5, decoupled=False), np.float64)
    b, _, _ = run(lambda ps: Adam(ps, lr=0.1, weight_decay=0.5, decoupled=True), np.float64)
    assert not np.allclose(a[-1], b[-1])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adamw_is_decoupled_adam(dtype):
    got, _, _ = run(lambda ps: AdamW(ps, lr=0.1), dtype)
    expected = ref_adam(P0, 3, lr=0.1, weight_decay=0.01, decoupled=True)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, **TOL[dtype])


SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.05, weight_decay=0.2),
    dict(lr=0.05, momentum=0.5, weight_decay=0.2),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("kw", SGD_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sgd_matches_reference(kw, dtype):
    got, opt, p = run(lambda ps: SGD(ps, **kw), dtype)
    expected = ref_sgd(P0, 3, **kw)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, **TOL[dtype])
    if kw.get("momentum"):
        # the buffer after step 3 is the last update divided by lr
        np.testing.assert_allclose(
            opt.state[id(p)]["momentum_buffer"], (got[1] - got[2]) / kw["lr"], rtol=1e-4 if dtype == np.float32 else 1e-9
        )


def test_step_after_real_backward():
    p = Tensor(P0.copy(), requires_grad=True)
    opt = SGD([p], lr=0.5)
    loss = (p * Tensor(C)).sum()
    loss.backward()
    opt.step()
    np.testing.assert_allclose(p.data, P0 - 0.5 * C, rtol=1e-14)


@pytest.mark.parametrize("make", [lambda ps: SGD(ps, lr=0.1, momentum=0.9), lambda ps: Adam(ps, lr=0.1)])
def test_non_contiguous_parameter_is_updated(make):
    # a parameter viewing a transposed array: the update must land in that array, not in a copy
    base = np.ascontiguousarray(P0.T)
    p = Tensor(base.T, requires_grad=True)
    assert not p.data.flags.c_contiguous
    q = Tensor(P0.copy(), requires_grad=True)
    opt_p, opt_q = make([p]), make([q])
    for _ in range(3):
        p.grad = grad_of(p.data)
        q.grad = grad_of(q.data)
        opt_p.step()
        opt_q.step()
    np.testing.assert_allclose(p.data, q.data, rtol=1e-12)
    np.testing.assert_allclose(base.T, q.data, rtol=1e-12)
    assert not np.allclose(q.data, P0)


# ------------------------------------------------------------------------------- groups


@pytest.mark.parametrize("factory", [SGD, Adam], ids=["sgd", "adam"])
def test_param_groups_step_scales_with_lr(factory):
    a = Tensor(P0.copy(), requires_grad=True)
    b = Tensor(P0.copy(), requires_grad=True)
    opt = factory([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}], lr=0.5)
    a.grad = grad_of(P0)
    b.grad = grad_of(P0)
    opt.step()
    np.testing.assert_allclose(P0 - a.data, 10 * (P0 - b.data), rtol=1e-10, atol=1e-15)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["lr"] == 0.01
    assert not np.allclose(a.data, P0)


def test_param_group_defaults_and_overrides():
    a = Tensor(P0.copy(), requires_grad=True)
    b = Tensor(P0.copy(), requires_grad=True)
    opt = SGD([{"params": [a]}, {"params": [b], "momentum": 0.9}], lr=0.1)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.0
    assert opt.param_groups[1]["lr"] == 0.1 and opt.param_groups[1]["momentum"] == 0.9
    for _ in range(2):
        a.grad, b.grad = grad_of(a.data), grad_of(b.data)
        opt.step()
    np.testing.assert_allclose(a.data, ref_sgd(P0, 2, lr=0.1)[-1], rtol=1e-12)
    np.testing.assert_allclose(b.data, ref_sgd(P0, 2, lr=0.1, momentum=0.9)[-1], rtol=1e-12)


# ------------------------------------------------------------------------------- frozen and skipped


@pytest.mark.parametrize(
    "factory",
    [lambda ps: Adam(ps, lr=0.1, weight_decay=0.1), lambda ps: AdamW(ps, lr=0.1), lambda ps: SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1)],
    ids=["adam", "adamw", "sgd"],
)
def test_frozen_tensors_untouched_and_stateless(factory):
    trainable = Tensor(P0.copy(), requires_grad=True)
    frozen = Tensor(P0.astype(np.float32), requires_grad=False)
    frozen.grad = np.ones_like(frozen.data)  # a stale gradient must not make it move
    no_grad_yet = Tensor(P0.copy(), requires_grad=True)  # trainable, but grad None: skipped
    frozen_bytes = frozen.data.tobytes()
    opt = factory([trainable, frozen, no_grad_yet])
    for _ in range(3):
        trainable.grad = grad_of(trainable.data)
        opt.step()
    assert frozen.data.tobytes() == frozen_bytes
    np.testing.assert_array_equal(no_grad_yet.data, P0)
    assert not np.allclose(trainable.data, P0)
    assert set(opt.state) == {id(trainable)}


def test_frozen_module_parameters_with_adam():
    mp.manual_seed(0)
    model = nn.MLP([3, 4, 2])
    model.fc1.freeze()
    frozen = {n: p.data.tobytes() for n, p in model.named_parameters() if n.startswith("fc1")}
    opt = Adam(model.parameters(), lr=0.1)
    x = Tensor(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32))
    before_fc2 = model.fc2.weight.data.copy()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), [0, 1, 1, 0, 1]).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n.startswith("fc1"):
            assert p.data.tobytes() == frozen[n]
            assert p.grad is None
    assert not np.array_equal(model.fc2.weight.data, before_fc2)
    assert set(opt.state) == {id(model.fc2.weight), id(model.fc2.bias)}
    assert opt.state_nbytes() == 2 * 4 * (model.fc2.weight.size + model.fc2.bias.size)


def test_zero_grad():
    a = Tensor(P0.copy(), requires_grad=True)
    a.grad = np.ones_like(P0)
    opt = SGD([a], lr=0.1)
    opt.zero_grad()
    assert a.grad is None
    opt.step()  # nothing to do
    np.testing.assert_array_equal(a.data, P0)


# ------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("factory", [SGD, Adam, AdamW], ids=["sgd", "adam", "adamw"])
@pytest.mark.parametrize("lr", [0.0, -1e-3])
def test_non_positive_lr_raises(factory, lr):
    p = Tensor(P0.copy(), requires_grad=True)
    with pytest.raises(ValueError, match="learning rate"):
        factory([p], lr=lr)
    with pytest.raises(ValueError, match="learning rate"):
        factory([{"params": [p]}, {"params": [Tensor(P0.copy(), requires_grad=True)], "lr": lr}], lr=0.1)


def test_other_invalid_settings_raise():
    p = Tensor(P0.copy(), requires_grad=True)
    with pytest.raises(ValueError):
        SGD([], lr=0.1)
    with pytest.raises(ValueError):
        SGD([{"params": [p], "betas": (0.9, 0.9)}], lr=0.1)
    with pytest.raises(ValueError):
        SGD([p], lr=0.1, momentum=-0.5)
    with pytest.raises(ValueError):
        Adam([p], betas=(1.0, 0.999))
    with pytest.raises(ValueError):
        Adam([p], eps=0.0)
    with pytest.raises(ValueError):
        Adam([p], weight_decay=-0.1)


# ------------------------------------------------------------------------------ state_dict / load_state_dict


def _run(opt_factory, steps: int, split_at: int | None = None):
    """``steps`` steps of the made-up loss; with ``split_at``, the optimizer is rebuilt there from its
    state_dict (through a save-like host copy), as a resumed run does. Returns the final parameters."""
    a = Tensor(P0.copy(), requires_grad=True)
    b = Tensor(P0[0].copy() * 2, requires_grad=True)
    frozen = Tensor(P0.copy(), requires_grad=False)
    opt = opt_factory([{"params": [a, frozen], "lr": 0.05}, {"params": [b], "lr": 0.01}])
    for t in range(steps):
        if t == split_at:
            saved = opt.state_dict()
            host = {"state": {i: {k: (np.array(v) if hasattr(v, "shape") else v) for k, v in s.items()}
                              for i, s in saved["state"].items()},
                    "param_groups": [dict(g) for g in saved["param_groups"]]}
            opt = opt_factory([{"params": [a, frozen], "lr": 0.05}, {"params": [b], "lr": 0.01}])
            opt.load_state_dict(host)
        for p in (a, b):
            p.grad = grad_of(p.data)
        opt.step()
    return a.data.copy(), b.data.copy(), opt


@pytest.mark.parametrize("factory", [
    lambda g: Adam(g, lr=0.05),
    lambda g: AdamW(g, lr=0.05, weight_decay=0.1),
    lambda g: SGD(g, lr=0.05, momentum=0.9, weight_decay=0.01),
    lambda g: SGD(g, lr=0.05),
], ids=["adam", "adamw", "sgd-momentum", "sgd"])
def test_state_dict_round_trip_continues_bit_identically(factory) -> None:
    a1, b1, _ = _run(factory, 6)
    a2, b2, _ = _run(factory, 6, split_at=3)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)
    a3, _, _ = _run(factory, 6, split_at=0)  # an empty state loads too
    np.testing.assert_array_equal(a1, a3)


def test_state_dict_has_pytorchs_layout() -> None:
    _, _, opt = _run(lambda g: Adam(g, lr=0.05), 2)
    sd = opt.state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2]]
    assert [g["lr"] for g in sd["param_groups"]] == [0.05, 0.01] and sd["param_groups"][0]["betas"] == (0.9, 0.999)
    assert sorted(sd["state"]) == [0, 2]  # the frozen tensor (index 1) has no state
    assert sd["state"][0]["step"] == 2 and sd["state"][0]["m"].shape == P0.shape


def test_load_state_dict_restores_settings_and_refuses_what_does_not_fit() -> None:
    from minitorch_peft.optim import OptimizerStateError

    _, _, opt = _run(lambda g: Adam(g, lr=0.05), 2)
    sd = opt.state_dict()
    sd["param_groups"][1]["lr"] = 0.5
    other = Adam([{"params": [Tensor(P0.copy(), requires_grad=True), Tensor(P0.copy())]},
                  {"params": [Tensor(P0[0].copy(), requires_grad=True)]}], lr=1.0)
    other.load_state_dict(sd)
    assert [g["lr"] for g in other.param_groups] == [0.05, 0.5]
    assert other.state_dict()["state"][0]["m"] is not sd["state"][0]["m"]  # copied, never shared
    with pytest.raises(OptimizerStateError, match=r"2 parameter group\(s\), this optimizer 1"):
        Adam([Tensor(P0.copy(), requires_grad=True)]).load_state_dict(sd)
    with pytest.raises(OptimizerStateError, match="shape"):
        Adam([{"params": [Tensor(P0[0].copy(), requires_grad=True), Tensor(P0.copy())]},
              {"params": [Tensor(P0[0].copy(), requires_grad=True)]}]).load_state_dict(sd)
