"""QLoRA / QDoRA: a 4-bit base (packed codes + quant state buffers) under LoRA and DoRA adapters.

Forward and gradients against LoRA/DoRA on the dequantized weight, float64 finite differences through
the 4-bit layer, no float copy of the base outliving a step, byte counts from the live arrays,
checkpoints (bit-exact round trip, every kind of damage as one CheckpointError), merging (into float32
and into a new 4-bit base), and the CLI.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gradcheck import as_leaf, gradcheck  # noqa: E402

from minitorch_peft.kernels.quant import FP4_CODE, NF4_CODE, dequantize_4bit, quantize_4bit  # noqa: E402
from minitorch_peft import Tensor, manual_seed, no_grad  # noqa: E402
from minitorch_peft import functional as F  # noqa: E402
from minitorch_peft.checkpoint import load_model, save_model  # noqa: E402
from minitorch_peft.nn import MLP, Linear  # noqa: E402
from minitorch_peft.nn.module import StateDictError  # noqa: E402
from minitorch_peft.optim import Adam  # noqa: E402
from minitorch_peft.peft import (  # noqa: E402
    AdapterError, LoRALinear, LoraConfig, QLoRALinear, base_weight_nbytes, count_parameters, disable_adapters,
    inject_adapters, lora_layers, merge_adapters, merge_and_unload, unmerge_adapters,
)
from minitorch_peft.peft import fused, qlora, weights  # noqa: E402
from minitorch_peft.serialize import CheckpointError  # noqa: E402

SMALL = [784, 512, 256, 10]
QUANTS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def out(model, x: np.ndarray) -> np.ndarray:
    with no_grad():
        return model(Tensor(x)).numpy()


def randomize_adapters(model, seed: int = 1, scale: float = 0.3) -> None:
    """Non-zero B (it starts at zero, which would hide most mistakes) and m away from the row norms."""
    g = rng(seed)
    for name, p in model.named_parameters():
        if ".lora_B." in name or name.startswith("lora_B."):
            p.data[...] = (scale * g.standard_normal(p.shape)).astype(p.dtype)
        if "lora_magnitude_vector." in name:
            p.data[...] *= g.uniform(0.5, 1.5, p.shape).astype(p.dtype)


def qmodel(dims=(40, 30, 10), quant="nf4", dq=True, block=64, dora=False, seed=0, dropout=0.0, **kw) -> MLP:
    manual_seed(seed)
    model = MLP(list(dims))
    inject_adapters(model, r=4, lora_alpha=8, lora_dropout=dropout, use_dora=dora, quantize=quant, double_quant=dq,
                    block_size=block, target_modules="all-linear", **kw)
    randomize_adapters(model, seed + 1)
    return model


def lora_twin(model: MLP) -> MLP:
    """The same model with every 4-bit base replaced by a float LoRALinear holding the dequantized weight
    (and the same adapters, shared): what QLoRA must compute."""
    twin = MLP(model.dims)
    for name, layer in lora_layers(model):
        lin = layer.to_linear(merge=False)
        t = LoRALinear.from_linear(lin, config=layer.configs["default"])
        for d in ("lora_A", "lora_B", "lora_magnitude_vector"):
            for k, p in getattr(layer, d).items():
                getattr(t, d)[k] = p
        twin.set_submodule(name, t)
    return twin


# ------------------------------------------------------------------------------ structure and bytes


def test_the_float_weight_is_gone_and_the_4bit_arrays_are_buffers() -> None:
    model = qmodel()
    layer = model.fc1
    assert isinstance(layer, QLoRALinear) and isinstance(layer, LoRALinear)
    names = set(model.state_dict())
    assert not any(k.endswith(".weight") for k in names)
    assert {"fc1.weight_packed", "fc1.weight_absmax_codes", "fc1.weight_absmax_scale", "fc1.weight_absmax_offset",
            "fc1.weight_meta", "fc1.weight_shape", "fc1.bias"} <= names
    assert layer.weight_packed.dtype == np.uint8 and layer.weight_packed.shape == (30 * 40 // 2,)
    assert "weight" not in layer._parameters and not layer.bias.requires_grad
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"fc{i}.lora_{k}.default" for i in (1, 2) for k in "AB"}
    assert layer.weight.shape == (30, 40) and layer.weight.dtype == np.float32 and not layer.weight.requires_grad
    assert not hasattr(layer.weight, "data")  # writing into a dequantized temporary must not look like it works
    assert layer.quant_config() == {"quant_type": "nf4", "double_quant": True, "block_size": 64}
    assert layer.quantized_numel == 1200
    assert count_parameters(model) == {"total": 40 * 30 + 30 * 10 + 30 + 10 + 4 * (40 + 30) + 4 * (30 + 10),
                                       "trainable": 4 * (40 + 30) + 4 * (30 + 10),
                                       "frozen": 40 * 30 + 30 * 10 + 30 + 10}


@pytest.mark.parametrize("quant,dq", QUANTS)
def test_the_4bit_base_is_the_float_weight_it_replaced(quant: str, dq: bool) -> None:
    """Each value of the 4-bit base lies within half the code book's widest gap, times its block's absmax,
    of the float weight it replaced (with double quantization, plus the 8-bit error of that absmax, at most
    1/254 of the largest); a new adapter (B = 0) then gives the float layer's output to within that error."""
    manual_seed(0)
    lin = Linear(96, 20)
    w, b = lin.weight.data.copy(), lin.bias.data.copy()
    layer = QLoRALinear.from_linear(lin, r=2, quant_type=quant, double_quant=dq, block_size=64)
    code = NF4_CODE if quant == "nf4" else FP4_CODE
    absmax = np.abs(w.reshape(-1, 64)).max(axis=1, keepdims=True)
    bound = absmax * np.diff(np.sort(code)).max() / 2 + (absmax.max() / 254 if dq else 0.0)
    bound = np.broadcast_to(bound * 1.0001 + 1e-7, (absmax.size, 64)).reshape(w.shape)
    w_hat = layer.base_weight()
    assert np.all(np.abs(w_hat - w) <= bound) and not np.array_equal(w_hat, w)
    x = rng(1).standard_normal((8, 96)).astype(np.float32)
    y = layer(Tensor(x)).numpy()
    assert np.all(np.abs(y - (x @ w.T + b)) <= np.abs(x) @ bound.T + 1e-4)


def test_small_mlp_weight_bytes_from_the_live_arrays() -> None:
    """2,140,160 (float32) -> 300,960 (NF4, block 64) -> 276,028 (NF4 + double quant) for 784-512-256-10."""
    counts = {}
    for label, dq in (("fp32", None), ("nf4", False), ("nf4_dq", True)):
        manual_seed(0)
        model = MLP(SMALL)
        if dq is not None:
            inject_adapters(model, r=8, lora_alpha=16, quantize="nf4", double_quant=dq, block_size=64)
            # the same total, summed straight from the buffers (metadata excluded)
            live = sum(int(b.nbytes) for n, b in model.named_buffers() if not n.endswith(("_meta", "_shape")))
            assert live == base_weight_nbytes(model)
        counts[label] = base_weight_nbytes(model)
    assert counts == {"fp32": 2_140_160, "nf4": 300_960, "nf4_dq": 276_028}
    for dims in (SMALL, [784, 2048, 1024, 10]):
        for dq in (False, True):
            manual_seed(0)
            model = inject_adapters(MLP(dims), quantize="nf4", double_quant=dq)
            assert base_weight_nbytes(model) == sum(qlora.expected_4bit_nbytes(o, i, 64, dq)
                                                    for i, o in zip(dims[:-1], dims[1:]))


def reachable_float_matrices(obj, shapes: set[tuple[int, int]], seen=None) -> list[str]:
    """Paths to float arrays of one of ``shapes`` reachable from ``obj`` through attributes, dicts, lists."""
    seen = set() if seen is None else seen
    found: list[str] = []

    def walk(o, path: str) -> None:
        if id(o) in seen:
            return
        seen.add(id(o))
        if isinstance(o, np.ndarray):
            if o.dtype.kind == "f" and o.shape in shapes:
                found.append(path)
            return
        if isinstance(o, Tensor):
            walk(o.data, path + ".data")
            walk(o.grad, path + ".grad")
            return
        if isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{path}[{k!r}]")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{path}[{i}]")
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            for k, v in vars(o).items():
                walk(v, f"{path}.{k}")

    walk(obj, "model")
    return found


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("dora", [False, True])
def test_no_float_copy_of_the_base_outlives_a_training_step(monkeypatch, dora: bool, chunked: bool) -> None:
    if chunked:
        monkeypatch.setattr(weights, "CHUNK_VALUES", 300)  # fc1 (1200 values) in row chunks through one buffer
    model = qmodel(dora=dora)
    assert len(model.fc1._base().row_chunks()) == (4 if chunked else 1)
    shapes = {(30, 40), (10, 30), (40, 30), (30, 10)}
    made: list[weakref.ref] = []
    real = weights.PackedWeight._dequantize

    def tracking(self, *args):
        w = real(self, *args)
        made.append(weakref.ref(w if w.base is None else w.base))  # a chunk is a view of the op's buffer
        return w

    opt = Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x, y = rng(2).standard_normal((16, 40)).astype(np.float32), rng(3).integers(0, 10, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights.PackedWeight, "_dequantize", tracking)
        loss = F.cross_entropy(model(Tensor(x)), Tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        del loss
        gc.collect()
    assert len(made) >= 2  # the forward of both layers (fc2's W is held for its backward, or rebuilt there)
    assert weights._held_bytes == 0
    assert all(r() is None for r in made), "a dequantized weight is still alive after the step"
    assert reachable_float_matrices(model, shapes) == []
    assert reachable_float_matrices(opt, shapes) == []
    assert not any(np.dtype(b.dtype).kind == "f" and b.ndim == 2 for _, b in model.named_buffers())


# ------------------------------------------------------------------------------ forward and gradients


@pytest.mark.parametrize("quant,dq", QUANTS)
@pytest.mark.parametrize("dora", [False, True])
def test_forward_equals_lora_on_the_dequantized_weight(quant: str, dq: bool, dora: bool) -> None:
    model = qmodel(quant=quant, dq=dq, dora=dora, block=32)
    x = rng(4).standard_normal((8, 40)).astype(np.float32)
    twin = lora_twin(model)
    np.testing.assert_array_equal(out(model, x), out(twin, x))  # the same kernels on the same arrays
    # and the dequantized weight is the 4-bit kernels' own dequantization of the stored codes
    layer = model.fc1
    np.testing.assert_array_equal(layer.base_weight(), dequantize_4bit(layer.weight_packed, layer.quant_state))
    with disable_adapters(model), disable_adapters(twin):
        np.testing.assert_array_equal(out(model, x), out(twin, x))


def test_forward_with_dropout_matches_lora_with_the_same_mask() -> None:
    model = qmodel(dropout=0.3)
    twin = lora_twin(model)
    x = rng(5).standard_normal((8, 40)).astype(np.float32)
    manual_seed(7)
    a = out(model, x)
    manual_seed(7)
    np.testing.assert_array_equal(a, out(twin, x))
    model.eval()
    assert not np.array_equal(out(model, x), a)  # eval: no dropout


@pytest.mark.parametrize("dora", [False, True])
def test_float32_gradients_equal_lora_on_the_dequantized_weight(dora: bool) -> None:
    model = qmodel(dora=dora)
    twin = lora_twin(model)  # shares the adapter Parameters: compare gradients one model at a time
    x, y = rng(6).standard_normal((16, 40)).astype(np.float32), rng(7).integers(0, 10, 16)
    grads = []
    for m in (model, twin):
        xt = Tensor(x, requires_grad=True)
        m.zero_grad()
        F.cross_entropy(m(xt), Tensor(y)).backward()
        grads.append([xt.grad] + [p.grad.copy() for p in m.parameters() if p.requires_grad])
        assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
    assert len(grads[0]) == len(grads[1]) == 1 + (6 if dora else 4)
    for g, h in zip(*grads):
        np.testing.assert_array_equal(g, h)


def float64_layer(dora: bool, norm_grad: bool = False, quant: str = "nf4", dq: bool = True) -> QLoRALinear:
    manual_seed(0)
    lin = Linear(70, 6, dtype=np.float64)  # 420 weights: several blocks of 64, the last one partial
    layer = QLoRALinear.from_linear(lin, config=LoraConfig(r=3, lora_alpha=5, use_dora=dora, dora_norm_grad=norm_grad),
                                    quant_type=quant, double_quant=dq, block_size=64)
    layer.lora_B["default"].data[...] = rng(1).standard_normal((6, 3))
    if dora:
        layer.lora_magnitude_vector["default"].data[...] *= rng(2).uniform(0.5, 1.5, 6)
    return layer


@pytest.mark.parametrize("dora,norm_grad", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("quant,dq", [("nf4", True), ("fp4", False)])
def test_float64_finite_differences_through_the_4bit_layer(dora: bool, norm_grad: bool, quant: str, dq: bool) -> None:
    """The base stays 4-bit; a float64 layer computes in float64 on the (float32-exact) dequantized values."""
    layer = float64_layer(dora, norm_grad, quant, dq)
    assert layer.compute_dtype == np.float64 and layer.base_weight().dtype == np.float64
    x = as_leaf(rng(3).standard_normal((5, 70)))
    params = [layer.lora_A["default"], layer.lora_B["default"]] + ([layer.lora_magnitude_vector["default"]] if dora else [])
    assert all(p.dtype == np.float64 for p in params) and layer.bias.dtype == np.float64
    if dora and not norm_grad:
        # DoRA's default treats the norm as a constant, so its A / B gradients are not those of the output:
        # check x and m by differences, and A / B against DoRA on the dequantized weight
        grads = gradcheck(lambda x, m: layer(x), x, params[2])
        twin = LoRALinear.from_linear(layer.to_linear(merge=False), config=layer.configs["default"])
        for d in ("lora_A", "lora_B", "lora_magnitude_vector"):
            getattr(twin, d)["default"] = getattr(layer, d)["default"]
        got = []
        for m in (layer, twin):
            m.zero_grad()
            m(x).backward(np.ones((5, 6)))
            got.append([p.grad.copy() for p in params])
        for g, h in zip(*got):
            np.testing.assert_array_equal(g, h)
    else:
        grads = gradcheck(lambda x, *p: layer(x), x, *params)
    assert all(np.abs(g).max() > 0 for g in grads)
    assert layer.bias.grad is None


def test_the_float64_check_can_fail() -> None:
    """Backward with the wrong weight (the codes of another tensor) must be caught by the check above."""
    layer = float64_layer(dora=False)
    wrong = quantize_4bit(rng(9).standard_normal((6, 70)).astype(np.float32), "nf4", 64, True)
    real = fused.LoRAFunction.backward

    def backward_with_wrong_weight(ctx, g):
        x, w, *rest = ctx.saved  # w: the op's PackedWeight, holding W for this backward (x needs a gradient)
        ctx.saved = (x, weights.PackedWeight(wrong[0], wrong[1], w.backend, w.dtype), *rest)
        return real(ctx, g)

    x = as_leaf(rng(3).standard_normal((5, 70)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused.LoRAFunction, "backward", staticmethod(backward_with_wrong_weight))
        with pytest.raises(AssertionError, match="gradient of input 0"):
            gradcheck(lambda x, a, b: layer(x), x, layer.lora_A["default"], layer.lora_B["default"])


@pytest.mark.parametrize("budget", [None, 0])
def test_dequantize_counts_and_the_budget_for_holding_w_until_backward(monkeypatch, budget) -> None:
    """fc1's input is data: its backward needs no g W, so its weight is dequantized once, in the forward.
    fc2's W is held by its graph node for the backward while the process-wide budget allows (then the
    backward dequantizes nothing), else rebuilt there; either way nothing is held after the step."""
    if budget is not None:
        monkeypatch.setattr(weights, "KEEP_FOR_BACKWARD_BYTES", budget)
    model = qmodel()
    calls: list[tuple[int, ...]] = []
    real = weights.PackedWeight.dequantize

    def counting(self):
        calls.append(self.state.shape)
        return real(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(weights.PackedWeight, "dequantize", counting)
        loss = F.cross_entropy(model(Tensor(rng(0).standard_normal((4, 40)).astype(np.float32))), Tensor(np.arange(4)))
        assert calls == [(30, 40), (10, 30)]
        assert weights._held_bytes == (0 if budget == 0 else 10 * 30 * 4)
        loss.backward()
    assert calls == [(30, 40), (10, 30)] + ([(10, 30)] if budget == 0 else [])
    del loss
    gc.collect()
    assert weights._held_bytes == 0
    with no_grad():  # nothing is held without a graph
        model(Tensor(rng(0).standard_normal((4, 40)).astype(np.float32)))
    assert weights._held_bytes == 0


def test_holding_stops_at_the_budget(monkeypatch) -> None:
    monkeypatch.setattr(weights, "KEEP_FOR_BACKWARD_BYTES", 2 * 30 * 30 * 4)
    manual_seed(0)
    model = MLP([40, 30, 30, 30, 30, 10])  # four 30x30-or-smaller layers after the first
    inject_adapters(model, r=4, quantize="nf4", target_modules="all-linear")
    randomize_adapters(model)
    x = Tensor(rng(1).standard_normal((4, 40)).astype(np.float32))
    loss = F.cross_entropy(model(x), Tensor(np.arange(4)))
    assert weights._held_bytes == 2 * 30 * 30 * 4  # fc2, fc3 held; fc4, fc5 would overrun the budget
    loss.backward()
    grads = [p.grad.copy() for p in model.parameters() if p.requires_grad]
    monkeypatch.setattr(weights, "KEEP_FOR_BACKWARD_BYTES", 0)
    model.zero_grad()
    F.cross_entropy(model(x), Tensor(np.arange(4))).backward()
    for g, p in zip(grads, [p for p in model.parameters() if p.requires_grad]):
        np.testing.assert_array_equal(g, p.grad)  # held or rebuilt: the same weight, the same gradients
    gc.collect()
    assert weights._held_bytes == 0


@pytest.mark.parametrize("dora", [False, True])
def test_qlora_trains(dora: bool) -> None:
    model = qmodel(dora=dora)
    codes = model.fc1.weight_packed.copy()
    x, y = rng(5).standard_normal((32, 40)).astype(np.float32), rng(6).integers(0, 10, 32)
    opt = Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = F.cross_entropy(model(Tensor(x)), Tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    np.testing.assert_array_equal(model.fc1.weight_packed, codes)  # the base never moves


@pytest.mark.parametrize("quant,dq", QUANTS)
def test_serial_dequantize_is_the_parallel_one_bit_for_bit(quant: str, dq: bool) -> None:
    """The layer dequantizes on one thread (kernels.quant's serial twin of the parallel kernel)."""
    g = rng(12)
    for shape in [(512, 784), (7, 9), (1, 1), (10, 256), (33, 65)]:
        for block in (32, 64, 4096):
            x = (g.standard_normal(shape) * g.uniform(0.01, 10)).astype(np.float32)
            packed, state = quantize_4bit(x, quant, block, dq)
            a = dequantize_4bit(packed, state)
            b = dequantize_4bit(packed, state, None, False, True)
            assert a.view(np.uint32).tobytes() == b.view(np.uint32).tobytes(), (shape, block)


# ------------------------------------------------------------------------------ row chunks


@pytest.mark.parametrize("n_in,n_out,block", [(70, 30, 64), (40, 33, 32), (33, 64, 64), (784, 10, 4096)])
def test_row_chunks_cover_the_rows_on_block_boundaries(monkeypatch, n_in: int, n_out: int, block: int) -> None:
    monkeypatch.setattr(weights, "CHUNK_VALUES", 256)
    manual_seed(0)
    layer = QLoRALinear.from_linear(Linear(n_in, n_out), r=2, block_size=block)
    base = layer._base()
    spans = base.row_chunks()
    assert spans[0][0] == 0 and spans[-1][1] == n_out and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all((r0 * n_in) % block == 0 for r0, _ in spans)
    assert len(spans) > 1 or n_out * n_in <= 256 or block // np.gcd(n_in, block) >= n_out
    w = np.concatenate([c.copy() for _, _, c in base.chunks()])
    np.testing.assert_array_equal(w, base.dequantize())


@pytest.mark.parametrize("n_out,chunk", [(512, 1 << 17), (2048, 1 << 19), (33, 600)])
def test_chunked_product_keeps_the_bits_of_per_chunk_products(monkeypatch, n_out: int, chunk: int) -> None:
    """x W^T by row chunks, computed as W_c x^T for speed, gives the bytes of x W_c^T chunk by chunk, and for
    products BLAS runs through its blocked kernel the bytes of x W^T on the whole W (the 33 x 40 layer is small
    enough for OpenBLAS's small-matrix path, which rounds a chunk differently from the whole)."""
    monkeypatch.setattr(weights, "CHUNK_VALUES", chunk)
    manual_seed(0)
    n_in = 784 if n_out > 100 else 40
    layer = QLoRALinear.from_linear(Linear(n_in, n_out), r=2)
    base = layer._base()
    assert len(base.row_chunks()) > 1
    w, b = base.dequantize(), layer.bias.data
    x = rng(1).standard_normal((64, n_in)).astype(np.float32)
    want = np.concatenate([x @ w[r0:r1].T for r0, r1 in base.row_chunks()], axis=1)
    if n_out > 100:
        assert want.tobytes() == (x @ w.T).tobytes()
    y = base.matmul_t(x)
    assert y.flags.c_contiguous and y.tobytes() == want.tobytes()
    z, _, _ = base.dora_terms(x, layer.lora_A["default"].data)  # QDoRA's pass: the same product
    assert z.tobytes() == want.tobytes()
    want += b
    assert base.matmul_t(x, b).tobytes() == want.tobytes()
    y3 = base.matmul_t(x.reshape(4, 16, n_in), b)  # a leading batch shape
    assert y3.shape == (4, 16, n_out) and y3.tobytes() == want.tobytes()


@pytest.mark.parametrize("dora,norm_grad", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_chunked_ops_equal_whole_weight_ops(monkeypatch, dora: bool, norm_grad: bool, dropout: float) -> None:
    """A weight over CHUNK_VALUES is done by row chunks: the same outputs and gradients to float32 rounding."""
    manual_seed(0)
    model = MLP([64, 40, 30, 10])
    inject_adapters(model, r=4, lora_alpha=8, lora_dropout=dropout, use_dora=dora, dora_norm_grad=norm_grad,
                    quantize="nf4", target_modules="all-linear")
    randomize_adapters(model, 1)
    x, y = rng(2).standard_normal((16, 64)).astype(np.float32), rng(3).integers(0, 10, 16)
    results = []
    for chunk in (1 << 19, 600):  # 600 values: fc1 (2560) in 5 chunks, fc2 (1200) in 2, fc3 whole
        monkeypatch.setattr(weights, "CHUNK_VALUES", chunk)
        xt = Tensor(x, requires_grad=True)
        model.zero_grad()
        manual_seed(5)
        logits = model(xt)
        F.cross_entropy(logits, Tensor(y)).backward()
        results.append([logits.numpy()] + [xt.grad] + [p.grad.copy() for p in model.parameters() if p.requires_grad])
        with disable_adapters(model):
            results[-1].append(out(model, x))
    assert [len(getattr(model, f"fc{i}")._base().row_chunks()) for i in (1, 2, 3)] == [5, 2, 1]
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.slow
def test_chunked_float64_finite_differences(monkeypatch, dora: bool) -> None:
    monkeypatch.setattr(weights, "CHUNK_VALUES", 150)
    manual_seed(0)
    layer = QLoRALinear.from_linear(Linear(64, 9, dtype=np.float64), block_size=64,
                                    config=LoraConfig(r=3, lora_alpha=5, use_dora=dora, dora_norm_grad=True))
    layer.lora_B["default"].data[...] = rng(1).standard_normal((9, 3))
    assert layer._base().row_chunks() == [(0, 3), (3, 6), (6, 9)]
    params = [layer.lora_A["default"], layer.lora_B["default"]] + ([layer.lora_magnitude_vector["default"]] if dora else [])
    grads = gradcheck(lambda x, *p: layer(x), as_leaf(rng(3).standard_normal((5, 64))), *params)
    assert all(np.abs(g).max() > 0 for g in grads)


# ------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("quant,dq", QUANTS)
@pytest.mark.parametrize("dora", [False, True])
def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path, quant: str, dq: bool, dora: bool) -> None:
    model = qmodel(quant=quant, dq=dq, dora=dora, block=128)
    save_model(model, tmp_path / "m")
    loaded, config = load_model(tmp_path / "m")
    assert config["quantization"] == {"quant_type": quant, "double_quant": dq, "block_size": 128}
    assert config["adapters"]["default"]["use_dora"] is dora
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    assert isinstance(loaded.fc1, QLoRALinear) and loaded.fc1.quant_config() == model.fc1.quant_config()
    x = rng(8).standard_normal((8, 40)).astype(np.float32)
    np.testing.assert_array_equal(out(loaded, x), out(model, x))
    with np.load(tmp_path / "m" / "base.npz") as z:
        assert z["fc1.weight_packed"].dtype == np.uint8 and not any(k.endswith(".weight") for k in z.files)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """Two small 4-bit model folders: "dq" (double quant) and "plain"."""
    for dq, name in ((True, "dq"), (False, "plain")):
        save_model(qmodel(dq=dq), tmp_path / name)
    return tmp_path


def damage(src: Path, dst: Path, change) -> Path:
    shutil.copytree(src, dst)
    with np.load(src / "base.npz") as z:
        arrays = {k: z[k].copy() for k in z.files}
    change(arrays)
    np.savez(dst / "base.npz", **arrays)
    return dst


def _set(key: str, index, value):
    def change(a):
        a[key][index] = value
    return change


def _cut(key: str, n: int = 1):
    def change(a):
        a[key] = a[key][:-n]
    return change


DAMAGE = [
    ("plain", _set("fc1.weight_absmax", 3, np.nan), "absmax contains NaN or Inf"),
    ("plain", _set("fc2.weight_absmax", 0, np.inf), "absmax contains NaN or Inf"),
    ("plain", _cut("fc1.weight_absmax"), "'fc1.weight_absmax' has shape"),
    ("dq", _set("fc1.weight_absmax_scale", 0, np.nan), "absmax_scale contains NaN or Inf"),
    ("dq", _set("fc1.weight_absmax_offset", (), np.inf), "absmax_offset contains NaN or Inf"),
    ("dq", _set("fc1.weight_absmax_codes", 1, 255), "byte > 254"),
    ("dq", _cut("fc1.weight_absmax_codes"), "'fc1.weight_absmax_codes' has shape"),
    ("dq", _cut("fc2.weight_packed", 3), "'fc2.weight_packed' has shape"),
    ("dq", _set("fc1.weight_meta", 2, 128), "corrupted quant state"),  # block size 128: wrong absmax length
    ("dq", _set("fc1.weight_meta", 1, 1), "the arrays hold fp4"),
    ("dq", _set("fc1.weight_meta", 0, 7), "unknown format version"),
    ("dq", _set("fc2.weight_shape", 0, 40), "corrupted quant state"),
    ("plain", _set("fc1.weight_meta", 3, 1), "corrupted quant state"),  # says double quant, has plain absmax
]


@pytest.mark.parametrize("kind,change,needle", DAMAGE)
def test_damaged_4bit_checkpoint_is_one_checkpoint_error(saved, kind: str, change, needle: str) -> None:
    tmp = saved
    bad = damage(tmp / kind, tmp / "bad", change)
    with pytest.raises(CheckpointError, match="bad") as e:
        load_model(bad)
    assert needle in str(e.value)


def test_truncated_base_file_and_bad_quantization_config(saved) -> None:
    tmp = saved
    bad = tmp / "trunc"
    shutil.copytree(tmp / "dq", bad)
    data = (bad / "base.npz").read_bytes()
    (bad / "base.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        load_model(bad)
    import json

    for quant, needle in (({"quant_type": "nf4", "double_quant": True, "block_size": 100}, "block_size=100"),
                          ({"quant_type": "int4", "double_quant": True, "block_size": 64}, "int4")):
        folder = tmp / f"cfg{needle}"
        shutil.copytree(tmp / "dq", folder)
        config = json.loads((folder / "config.json").read_text())
        config["quantization"] = quant
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=needle):
            load_model(folder)


def test_load_state_dict_checks_before_writing() -> None:
    model = qmodel(dq=False)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    bad = {k: v.copy() for k, v in before.items()}
    bad["fc2.weight_absmax"][0] = np.nan
    bad["fc1.weight_packed"][:] = 0  # a change that would be written first if the check came late
    with pytest.raises(StateDictError, match="fc2"):
        model.load_state_dict(bad)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


# ------------------------------------------------------------------------------ merging


@pytest.mark.parametrize("dora", [False, True])
def test_merge_and_unload_gives_float_linears_with_the_same_output(dora: bool) -> None:
    model = qmodel(dora=dora)
    x = rng(9).standard_normal((8, 40)).astype(np.float32)
    y = out(model, x)
    expected = model.fc1.base_weight() + model.fc1.delta_weight()
    merged = merge_and_unload(model)
    assert type(merged.fc1) is Linear and merged.fc1.weight.dtype == np.float32
    np.testing.assert_allclose(out(merged, x), y, rtol=1e-5, atol=1e-5)
    if not dora:
        np.testing.assert_array_equal(merged.fc1.weight.numpy(), expected)


def test_unload_gives_the_dequantized_base() -> None:
    from minitorch_peft.peft import unload

    model = qmodel()
    x = rng(9).standard_normal((8, 40)).astype(np.float32)
    w1, w2 = model.fc1.base_weight(), model.fc2.base_weight()
    with disable_adapters(model):
        base = out(model, x)
    plain = unload(model)
    np.testing.assert_array_equal(plain.fc1.weight.numpy(), w1)
    np.testing.assert_array_equal(plain.fc2.weight.numpy(), w2)
    np.testing.assert_array_equal(out(plain, x), base)


@pytest.mark.parametrize("dora", [False, True])
def test_merge_into_a_new_4bit_base_and_unmerge_exactly(dora: bool) -> None:
    model = qmodel(dora=dora)
    x = rng(10).standard_normal((64, 40)).astype(np.float32)
    y = out(model, x)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    nbytes = base_weight_nbytes(model)
    merge_adapters(model)
    layer = model.fc1
    assert layer.merged
    assert not np.array_equal(layer.weight_packed, before["fc1.weight_packed"])  # re-quantized codes
    assert layer.weight_packed.dtype == np.uint8 and layer.weight_packed.shape == before["fc1.weight_packed"].shape
    # the merged 4-bit weight is the quantization of W_deq + delta (so the output moves by a 4-bit rounding)
    unmerge_adapters(model)
    target = model.fc1.merged_weight()
    merge_adapters(model)
    np.testing.assert_array_equal(layer.base_weight(),
                                  dequantize_4bit(*quantize_4bit(target, "nf4", 64, True)))
    ym = out(model, x)
    err = np.abs(ym - y).max() / np.abs(y).max()
    assert 0 < err < 0.25, err  # one more 4-bit rounding of every weight (the size of a 4-bit step)
    assert base_weight_nbytes(model) == 2 * nbytes  # while merged the original 4-bit arrays are kept aside
    with disable_adapters(model):  # unmerges (exactly) for the block, merges again after
        np.testing.assert_array_equal(model.fc1.weight_packed, before["fc1.weight_packed"])
    assert layer.merged
    np.testing.assert_array_equal(out(model, x), ym)  # re-merging is deterministic
    unmerge_adapters(model)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    np.testing.assert_array_equal(out(model, x), y)
    assert base_weight_nbytes(model) == nbytes


def test_merge_refuses_a_non_finite_update() -> None:
    model = qmodel()
    model.fc1.lora_B["default"].data[0, 0] = np.inf
    codes = model.fc1.weight_packed.copy()
    with pytest.raises(AdapterError, match="cannot merge adapter 'default' into the 4-bit base"):
        model.fc1.merge()
    assert not model.fc1.merged
    np.testing.assert_array_equal(model.fc1.weight_packed, codes)


# ------------------------------------------------------------------------------ bad input


def test_bad_quantization_settings_change_nothing() -> None:
    for kw, needle in ((dict(quantize="int4"), "not supported"), (dict(quantize="nf4", block_size=100), "power of two"),
                       (dict(quantize="nf4", block_size=8192), "power of two")):
        manual_seed(0)
        model = MLP([40, 30, 10])
        with pytest.raises(ValueError, match=needle):
            inject_adapters(model, r=4, target_modules="all-linear", **kw)
        assert type(model.fc1) is Linear and type(model.fc2) is Linear and model.fc1.weight.requires_grad


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_base_weight_is_refused_naming_the_module(bad: float) -> None:
    manual_seed(0)
    model = MLP([40, 30, 10])
    model.fc2.weight.data[3, 4] = bad
    with pytest.raises(ValueError, match="cannot quantize fc2.weight to nf4: it contains NaN or Inf"):
        inject_adapters(model, r=4, quantize="nf4", target_modules="all-linear")
    assert type(model.fc1) is Linear  # checked before anything changed
    with pytest.raises(ValueError, match="NaN or Inf"):
        QLoRALinear.from_linear(model.fc2, r=4)


# ------------------------------------------------------------------------------ backends


def test_backend_forward_and_round_trip(backend, tmp_path: Path) -> None:
    """The same model on each backend: identical 4-bit arrays, outputs equal to float32 rounding."""
    model = qmodel(dora=True)
    x = rng(11).standard_normal((8, 40)).astype(np.float32)
    y = out(model, x)
    save_model(model, tmp_path / "m")
    moved, _ = load_model(tmp_path / "m", backend=backend)
    assert moved.fc1.weight.backend is backend
    np.testing.assert_array_equal(backend.to_numpy(moved.fc1.weight_packed), model.fc1.weight_packed)
    with no_grad():
        got = backend.to_numpy(moved(Tensor(backend.asarray(x), backend=backend)).data)
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)
    xt = Tensor(backend.asarray(x), backend=backend)
    F.cross_entropy(moved(xt), Tensor(backend.asarray(np.arange(8)), backend=backend)).backward()
    assert moved.fc1.lora_A["default"].grad is not None
    save_model(moved, tmp_path / "back")
    again, _ = load_model(tmp_path / "back")
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[k], v, err_msg=k)


# ------------------------------------------------------------------------------ CLI

from conftest import DATA, assert_one_line_error, cli_main, needs_mnist  # noqa: E402

TINY = ["--limit", "256", "--epochs", "1"]


@pytest.fixture
def cli_small(small_test_split: None):
    """cli.main on real MNIST with a 500-image test split (scoring all 10,000 would dominate these tests)."""
    import cli

    return cli


def run_cli(cli, capsys, *args: str) -> tuple[int, str, str]:
    return cli_main(capsys, *args)


def one_line_error(cli, capsys, *args: str, needle: str) -> None:
    code, out, err = run_cli(cli, capsys, *args)
    assert code == 2, err
    assert_one_line_error((code, out, err), needle)


@needs_mnist
@pytest.mark.slow
def test_cli_trains_qlora_and_qdora_and_infer_loads_them(cli_small, capsys, tmp_path: Path) -> None:
    import json

    code, stdout, err = run_cli(cli_small, capsys, "train", "--method", "qlora", *TINY, "--output", str(tmp_path / "q"),
                                "--json", str(tmp_path / "q.json"))
    assert code == 0, err
    assert "Base weights in nf4 + double quant (block 64): 276,028 bytes" in stdout
    metrics = json.loads((tmp_path / "q.json").read_text())
    assert metrics["method"] == "qlora" and metrics["params"]["trainable"] == 8 * (784 + 512) + 8 * (512 + 256) + 8 * (256 + 10)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"quant_type": "nf4", "double_quant": True, "block_size": 64}
    code, stdout, err = run_cli(cli_small, capsys, "infer", "--model-dir", str(tmp_path / "q"), "--samples", "2")
    assert code == 0, err
    assert "Loaded QLoRA (nf4) model" in stdout and f"{metrics['final_test_accuracy']:.2%}" in stdout

    code, stdout, err = run_cli(cli_small, capsys, "train", "--method", "qdora", "--quant", "fp4", "--no-double-quant",
                                "--block-size", "128", *TINY, "--output", str(tmp_path / "d"))
    assert code == 0, err
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["quantization"] == {"quant_type": "fp4", "double_quant": False, "block_size": 128}
    assert config["adapters"]["default"]["use_dora"] is True
    code, stdout, err = run_cli(cli_small, capsys, "infer", "--model-dir", str(tmp_path / "d"), "--samples", "2")
    assert code == 0 and "Loaded QDoRA (fp4) model" in stdout, err

    # a second adapter on the saved 4-bit base: added beside the first, the base stays 4-bit
    code, _, err = run_cli(cli_small, capsys, "train", "--method", "qlora", "--base", str(tmp_path / "q"),
                           "--adapter-name", "b", *TINY, "--output", str(tmp_path / "qb"))
    assert code == 0, err
    model, config = load_model(tmp_path / "qb")
    assert set(config["adapters"]) == {"default", "b"} and isinstance(model.fc1, QLoRALinear)


@needs_mnist
def test_cli_bad_quantization_input_is_one_error_line(cli_small, capsys, tmp_path: Path) -> None:
    for flags, needle in ((["--block-size", "100"], "--block-size must be a power of two from 32 to 4096, got 100"),
                          (["--block-size", "8192"], "--block-size must be a power of two"),
                          (["--block-size", "16"], "--block-size must be a power of two"),
                          (["--quant", "int4"], "--quant 'int4' is not supported")):
        one_line_error(cli_small, capsys, "train", "--method", "qlora", *flags, *TINY, "--output", str(tmp_path / "x"),
                       needle=needle)
    assert not (tmp_path / "x").exists()

    # a base holding NaN is refused when it is loaded, naming the array (quantizing it is never tried;
    # save_model refuses to write such a model, so the damaged file is made by hand)
    manual_seed(0)
    save_model(MLP(SMALL), tmp_path / "nan")
    with np.load(tmp_path / "nan" / "base.npz") as z:
        arrays = dict(z)
    arrays["fc2.weight"][0, 0] = np.nan
    np.savez(tmp_path / "nan" / "base.npz", **arrays)
    one_line_error(cli_small, capsys, "train", "--method", "qdora", "--base", str(tmp_path / "nan"), *TINY,
                   "--output", str(tmp_path / "x"), needle="array 'fc2.weight' holds 1 non-finite value(s)")

    # adapters on a float base are not silently added to a "qlora" run
    assert cli_small.main(["train", "--method", "lora", *TINY, "--output", str(tmp_path / "lora")]) == 0
    capsys.readouterr()
    one_line_error(cli_small, capsys, "train", "--method", "qlora", "--base", str(tmp_path / "lora"), "--adapter-name", "q",
                   *TINY, "--output", str(tmp_path / "x"), needle="holds adapters on a full-precision base")

    # damaged 4-bit checkpoints
    assert cli_small.main(["train", "--method", "qlora", *TINY, "--output", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    for change, needle in ((_set("fc1.weight_absmax_scale", 0, np.nan), "absmax_scale contains NaN or Inf"),
                           (_cut("fc2.weight_packed", 2), "'fc2.weight_packed' has shape"),
                           (_cut("fc1.weight_absmax_codes", 7), "'fc1.weight_absmax_codes' has shape")):
        bad = damage(tmp_path / "q", tmp_path / "bad", change)
        one_line_error(cli_small, capsys, "infer", "--model-dir", str(bad), needle=needle)
        one_line_error(cli_small, capsys, "train", "--method", "qlora", "--base", str(bad), "--adapter-name", "z", *TINY,
                       "--output", str(tmp_path / "x"), needle=needle)
        shutil.rmtree(bad)
    data = (tmp_path / "q" / "base.npz").read_bytes()
    shutil.copytree(tmp_path / "q", tmp_path / "trunc")
    (tmp_path / "trunc" / "base.npz").write_bytes(data[:1000])
    one_line_error(cli_small, capsys, "infer", "--model-dir", str(tmp_path / "trunc"), needle="truncated or corrupted")


def test_chunked_input_gradient_keeps_two_products_at_most() -> None:
    """g W by row chunks holds the chunk buffer, the running sum and one chunk's product, never more:
    a (batch x in) product per chunk kept alive would raise the step's peak (the medium MLP's by 0.5 MiB)."""
    import tracemalloc

    manual_seed(0)
    layer = QLoRALinear.from_linear(Linear(2048, 1024), r=2)
    base = layer._base()
    assert len(base.row_chunks()) == 4
    g = rng(1).standard_normal((64, 1024)).astype(np.float32)
    product = 64 * 2048 * 4
    chunk = base.row_chunks()[0][1] * 2048 * 4  # each chunk's absmax is decoded inside its dequantize
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        gx = base.matmul(g)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(gx, g @ base.dequantize(), rtol=1e-4, atol=1e-4)
    assert peak - before <= chunk + 2 * product + (64 << 10), (peak - before) / 2**20
