"""Modules: registration, naming, initialisation, modes, freezing, state dicts, submodules, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest

import minitorch_peft as mp
from minitorch_peft import Tensor, nn
from minitorch_peft import functional as F
from minitorch_peft.nn import Module, Parameter, StateDictError
from minitorch_peft.optim import Adam


class Block(Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.scale = Parameter(np.ones(4, dtype=np.float32))
        self.note = "not registered"
        self.plain = Tensor(np.zeros(2))  # a Tensor that is not a Parameter is not registered

    def forward(self, x):
        return self.lin(x) * self.scale


class Net(Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        return self.head(F.relu(self.block(x)))


# ------------------------------------------------------------------------------- registration


def test_registration():
    b = Block()
    assert list(b._parameters) == ["scale"]
    assert list(b._modules) == ["lin"]
    assert "note" not in b._parameters and "plain" not in b._parameters
    b.scale = None  # reassigning a registered name to a plain value unregisters it
    assert "scale" not in b._parameters
    b.extra = Parameter(np.zeros(1, dtype=np.float32))
    assert "extra" in b._parameters
    del b.extra
    assert "extra" not in b._parameters and not hasattr(b, "extra")
    del b.lin
    assert "lin" not in b._modules


def test_module_without_super_init_fails_clearly():
    class Bad(Module):
        def __init__(self):
            self.w = Parameter(np.zeros(1))

    with pytest.raises(AttributeError, match="super"):
        Bad()


def test_named_parameters_nested():
    net = Net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["block.scale", "block.lin.weight", "block.lin.bias", "head.weight"]
    assert [n for n, _ in net.named_parameters(recurse=False)] == []
    assert [n for n, _ in net.block.named_parameters(recurse=False)] == ["scale"]
    assert [n for n, _ in net.named_modules()] == ["", "block", "block.lin", "head"]
    assert [n for n, _ in net.named_children()] == ["block", "head"]
    assert net.head.bias is None
    params = dict(net.named_parameters())
    assert params["block.lin.weight"] is net.block.lin.weight
    assert params["head.weight"].shape == (2, 4)


def test_sequential_names():
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)
    l0, l2 = seq.get_submodule("0"), seq.get_submodule("2")
    expected = np.maximum(x @ l0.weight.data.T + l0.bias.data, 0) @ l2.weight.data.T + l2.bias.data
    np.testing.assert_allclose(seq(Tensor(x)).numpy(), expected, rtol=1e-5)


def test_mlp_parameter_count_and_names():
    model = nn.MLP([784, 512, 256, 10])
    assert sum(p.data.size for p in model.parameters()) == 535_818
    assert model.num_parameters() == 535_818
    assert [n for n, _ in model.named_children()] == ["fc1", "fc2", "fc3"]
    assert [n for n, _ in model.named_parameters()] == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias",
    ]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    assert shapes["fc1.weight"] == (512, 784) and shapes["fc2.weight"] == (256, 512)
    assert shapes["fc3.weight"] == (10, 256) and shapes["fc3.bias"] == (10,)
    model.fc1.freeze()
    assert model.num_parameters(trainable_only=True) == 535_818 - (784 * 512 + 512)
    assert model.nbytes() == 535_818 * 4


def test_mlp_rejects_too_few_dims_and_linear_bad_sizes():
    with pytest.raises(ValueError):
        nn.MLP([5])
    with pytest.raises(ValueError):
        nn.Linear(0, 3)


# ------------------------------------------------------------------------------- init


def test_linear_init_statistics():
    mp.manual_seed(0)
    fan_in, fan_out = 400, 1000
    layer = nn.Linear(fan_in, fan_out)
    w, b = layer.weight.numpy(), layer.bias.numpy()
    bound = 1 / math.sqrt(fan_in)  # kaiming uniform with a = sqrt(5)
    assert np.abs(w).max() <= np.float32(bound)
    assert np.abs(w).max() > 0.99 * bound  # the full range is used, not a narrower one
    assert np.abs(b).max() <= np.float32(bound)
    assert abs(w.mean()) < 0.01 * bound
    np.testing.assert_allclose(w.var(), bound**2 / 3, rtol=0.02)
    counts, _ = np.histogram(w, bins=10, range=(-bound, bound))
    np.testing.assert_allclose(counts, w.size / 10, rtol=0.05)  # flat: uniform, not normal


def test_kaiming_uniform_bound_formula():
    mp.manual_seed(1)
    w = nn.kaiming_uniform((200, 300), fan_in=300, a=0.0, dtype=np.float64)
    bound = math.sqrt(6 / 300)  # a = 0: He uniform
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    assert w.dtype == np.float64


def test_init_is_seeded():
    mp.manual_seed(42)
    a = nn.MLP([5, 4, 3])
    mp.manual_seed(42)
    b = nn.MLP([5, 4, 3])
    mp.manual_seed(43)
    c = nn.MLP([5, 4, 3])
    for (_, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        np.testing.assert_array_equal(pa.data, pb.data)
        assert not np.array_equal(pa.data, pc.data)


# ------------------------------------------------------------------------------- modes and freezing


def test_train_eval_propagates():
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Dropout(0.5), nn.Linear(3, 3)))
    assert all(m.training for m in model.modules())
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())
    model.train(False)
    assert not any(m.training for m in model.modules())


def test_dropout_module_respects_mode():
    drop = nn.Dropout(0.5)
    x = Tensor(np.ones((20, 20), dtype=np.float32))
    mp.manual_seed(0)
    out = drop(x).numpy()
    assert set(np.unique(out)) == {0.0, 2.0}
    drop.eval()
    np.testing.assert_array_equal(drop(x).numpy(), x.numpy())
    with pytest.raises(ValueError):
        nn.Dropout(1.0)


def test_freeze_unfreeze():
    model = nn.MLP([3, 4, 2], dtype=np.float64)
    assert model.freeze() is model
    assert not any(p.requires_grad for p in model.parameters())
    x = Tensor(np.ones((2, 3)), requires_grad=True)
    model(x).sum().backward()
    assert all(p.grad is None for p in model.parameters())
    assert x.grad is not None
    model.unfreeze()
    assert all(p.requires_grad for p in model.parameters())
    model.fc2.freeze()
    F.cross_entropy(model(x), [0, 1]).backward()
    assert model.fc1.weight.grad is not None and model.fc1.bias.grad is not None
    assert model.fc2.weight.grad is None and model.fc2.bias.grad is None
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------------- state dicts


def _snapshot(model):
    return {k: v.copy() for k, v in model.state_dict().items()}


def _assert_state_equal(model, snapshot):
    state = model.state_dict()
    assert list(state) == list(snapshot)
    for k in snapshot:
        np.testing.assert_array_equal(state[k], snapshot[k])


def test_state_dict_round_trip():
    mp.manual_seed(0)
    a = nn.MLP([4, 5, 3])
    mp.manual_seed(1)
    b = nn.MLP([4, 5, 3])
    arrays_before = {n: p.data for n, p in b.named_parameters()}
    state = a.state_dict()
    assert list(state) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert state["fc1.weight"] is a.fc1.weight.data  # live arrays, not copies
    b.load_state_dict(state)
    _assert_state_equal(b, _snapshot(a))
    for n, p in b.named_parameters():
        assert p.data is arrays_before[n]  # loaded in place into the live arrays
        assert not np.shares_memory(p.data, a.state_dict()[n])
    x = Tensor(np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32))
    np.testing.assert_array_equal(a(x).numpy(), b(x).numpy())


def test_state_dict_includes_buffers():
    class WithBuffer(Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("codes", np.arange(6, dtype=np.uint8))

    m = WithBuffer()
    assert list(m.state_dict()) == ["lin.weight", "lin.bias", "codes"]
    state = {k: v.copy() for k, v in m.state_dict().items()}
    state["codes"] = np.full(6, 9, dtype=np.uint8)
    m.load_state_dict(state)
    np.testing.assert_array_equal(m.codes, np.full(6, 9))


@pytest.mark.parametrize("problem", ["missing", "unexpected", "shape", "dtype"])
def test_load_state_dict_errors_write_nothing(problem):
    mp.manual_seed(0)
    source = nn.MLP([4, 5, 3])
    mp.manual_seed(1)
    target = nn.MLP([4, 5, 3])
    before = _snapshot(target)
    state = {k: v.copy() for k, v in source.state_dict().items()}  # fc1.* come first and are valid
    key = "fc2.bias"
    if problem == "missing":
        del state[key]
    elif problem == "unexpected":
        key = "fc9.weight"
        state[key] = np.zeros((3, 3), dtype=np.float32)
    elif problem == "shape":
        state[key] = np.zeros(4, dtype=np.float32)
    else:
        state[key] = state[key].astype(np.float64)
    with pytest.raises(StateDictError) as info:
        target.load_state_dict(state, source="ckpt.npz")
    assert key in str(info.value) and "ckpt.npz" in str(info.value)
    _assert_state_equal(target, before)


def test_load_state_dict_non_strict():
    mp.manual_seed(0)
    source = nn.MLP([4, 5, 3])
    target = nn.MLP([4, 5, 3])
    before = _snapshot(target)
    state = {"fc1.weight": source.fc1.weight.data.copy(), "other": np.zeros(1)}
    target.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(target.fc1.weight.data, source.fc1.weight.data)
    np.testing.assert_array_equal(target.fc2.weight.data, before["fc2.weight"])
    with pytest.raises(StateDictError):
        target.load_state_dict({"fc1.weight": np.zeros((1, 1), dtype=np.float32)}, strict=False)


# ------------------------------------------------------------------------------- submodules


def test_get_and_set_submodule():
    net = Net()
    assert net.get_submodule("block.lin") is net.block.lin
    assert net.get_submodule("") is net
    with pytest.raises(AttributeError):
        net.get_submodule("block.nothing")
    with pytest.raises(AttributeError):
        net.get_submodule("scale.x")

    replacement = nn.Linear(3, 4)
    net.set_submodule("block.lin", replacement)
    assert net.block.lin is replacement and net.get_submodule("block.lin") is replacement
    assert dict(net.named_parameters())["block.lin.weight"] is replacement.weight


def test_set_submodule_changes_mlp_forward():
    mp.manual_seed(3)
    model = nn.MLP([3, 4, 2], dtype=np.float64)
    new = nn.Linear(3, 4, dtype=np.float64)
    new.weight.data[...] = 0.0
    new.bias.data[...] = np.array([1.0, -1.0, 2.0, 0.5])
    model.set_submodule("fc1", new)
    assert model.fc1 is new
    x = np.random.default_rng(0).standard_normal((5, 3))
    hidden = np.maximum(new.bias.data, 0)
    expected = np.tile(hidden @ model.fc2.weight.data.T + model.fc2.bias.data, (5, 1))
    np.testing.assert_allclose(model(Tensor(x)).numpy(), expected, rtol=1e-12)


# ------------------------------------------------------------------------------- learning


def test_mlp_learns_blobs():
    mp.manual_seed(0)
    r = np.random.default_rng(0)
    centers = np.array([[-2.0, -2.0], [-2.0, 2.0], [2.0, -2.0], [2.0, 2.0]])
    labels = np.repeat(np.arange(4), 64)
    x = (centers[labels] + 0.5 * r.standard_normal((256, 2))).astype(np.float32)
    # XOR-ish: classes 0 and 3 are opposite corners, so no single linear boundary splits (0,3) from (1,2)
    model = nn.MLP([2, 32, 32, 4])
    opt = Adam(model.parameters(), lr=1e-2)
    xt = Tensor(x)
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = F.cross_entropy(model(xt), labels)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    with mp.no_grad():
        final = F.cross_entropy(model(xt), labels).item()
        accuracy = np.mean(model(xt).numpy().argmax(axis=1) == labels)
    assert first > 1.0
    assert final < 0.05
    assert accuracy == 1.0
