"""QLoRA and QDoRA: LoRA / DoRA adapters over a frozen base weight stored in 4 bits (NF4 or FP4).

The base weight lives only as packed 4-bit codes (uint8, two per byte) plus its quantization state
(per-block absmax, or with double quantization 8-bit absmax codes + per-256 scales + one offset), all
registered as buffers, so ``state_dict`` and the model folder hold them exactly as they are. The
adapters (A, B, and DoRA's m) and the bias stay in the compute dtype (float32).

No full-precision copy of the base weight outlives a training step. The forward dequantizes W
into a fresh array (a weight over ``CHUNK_VALUES`` by row chunks through one buffer), uses it for
``x W^T`` and drops it; when the input gradient ``g W`` will be needed (not in the first layer of a
network: its input is data) the op's graph node may hold that W until its backward, within a small
process-wide budget, and otherwise the backward dequantizes it again. A persistent scratch
buffer was rejected: kept per layer or in a pool keyed by shape, it is exactly the float32 weight the
4-bit format is meant to remove, and the dequantize kernel is fast next to the matmul it feeds. The
base gets no gradient.

``merge()`` folds the active adapter into a NEW 4-bit base (W_deq + delta, re-quantized); the old 4-bit
arrays are kept aside (4 bits a weight, not float32) so that ``unmerge()`` restores them bit for bit.
``to_linear()`` / ``merge_and_unload`` give plain float32 Linears holding W_deq (+ delta).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Iterator

import numpy as np

from ..kernels.quant import QuantState, check_block_size, check_packed, check_quant_type

from ..backend import Backend, backend_of
from ..function import Context, Function
from ..nn.layers import Linear
from ..nn.containers import ParameterDict
from ..nn.module import Module, Parameter, StateDictError
from ..random import generator
from ..tensor import Tensor
from .config import AdapterError, LoraConfig
from .lora import LoRALinear

__all__ = ["QLoRALinear", "QuantizedWeight", "QLoRAFunction", "QDoRAFunction", "Linear4bitFunction",
           "base_weight_nbytes", "quantized_layers"]

# buffer names: the packed codes, then QuantState.arrays()'s names with this prefix
PACKED = "weight_packed"
STATE_PREFIX = "weight_"
_PLAIN_KEYS = ("meta", "shape", "absmax")
_DQ_KEYS = ("meta", "shape", "absmax_codes", "absmax_scale", "absmax_offset")


#: The largest piece of a base weight dequantized at once, in values (2 MiB of float32). A bigger weight
#: is processed in chunks of output rows, one reused buffer per op, so the transient float copy a step
#: needs stays this small whatever the layer size (the medium MLP's 2048x1024 weight would otherwise
#: take 8.4 MB in every step). Rows are independent in every LoRA / DoRA formula (DoRA's norm is per
#: row), so an op is the kernels applied chunk by chunk: outputs per row, input gradients summed.
#: Not smaller: every chunk is one more BLAS call, and on a busy 2-core machine 1 MiB chunks (two for
#: the small MLP's 512x784 weight) measured a QLoRA step 1.6-1.8x LoRA's against 1.2-1.3x unchunked.
CHUNK_VALUES = 1 << 19


class _Base4bit:
    """The 4-bit base as one op saw it: packed codes + state, dequantized on demand (whole or by row chunk).

    Holding the arrays (not the layer) means a merge() between forward and backward, which swaps in
    new arrays, cannot change the weight this op's backward uses.
    """

    __slots__ = ("packed", "state", "backend", "dtype")

    def __init__(self, packed: Any, state: QuantState, backend: Backend, dtype: Any) -> None:
        self.packed, self.state, self.backend, self.dtype = packed, state, backend, dtype

    def dequantize(self) -> Any:
        """The whole weight as a fresh array of the compute dtype."""
        return self._dequantize(self.packed, self.state, None)

    def _dequantize(self, packed: Any, state: QuantState, out: Any) -> Any:
        # validate=False: the arrays were checked when they were made, loaded or merged, and checking
        # them again on every forward would cost a quarter of the dequantize (and two GPU waits on CuPy)
        if self.backend.name == "numpy":
            # on one thread: a parallel region costs more than it saves at this size (a chunk is at
            # most CHUNK_VALUES), and on a busy 2-core machine it also waits for a second core
            w = self.backend.kernels.dequantize_4bit(packed, state, out, False, True)
        else:
            w = self.backend.kernels.dequantize_4bit(packed, state, out, False)
        if w.dtype != self.dtype:  # a float64 layer (gradient checks): one cast of the float32 values
            w = self.backend.astype(w, self.dtype)
        return w

    def row_chunks(self) -> list[tuple[int, int]]:
        """[(r0, r1), ...] covering the output rows, each at most ~CHUNK_VALUES values and starting on a
        quantization block (r0 * in a multiple of the block size), so it dequantizes on its own."""
        n_out, n_in = self.state.shape
        if n_out * n_in <= CHUNK_VALUES or n_out == 1:
            return [(0, n_out)]
        align = self.state.block_size // math.gcd(n_in, self.state.block_size)
        pieces = -(-n_out * n_in // CHUNK_VALUES)
        rows = -(-n_out // pieces)
        rows = -(-rows // align) * align
        return [(r0, min(r0 + rows, n_out)) for r0 in range(0, n_out, rows)]

    def chunks(self) -> Iterator[tuple[int, int, Any]]:
        """(r0, r1, W[r0:r1]) for each row chunk; the array is reused: valid until the next one."""
        spans = self.row_chunks()
        if len(spans) == 1:
            yield 0, spans[0][1], self.dequantize()
            return
        state, n_in, block = self.state, self.state.shape[1], self.state.block_size
        if self.backend.name == "numpy":
            from ..kernels.quant import dequantize_absmax
        else:
            from ..kernels.quant_cuda import dequantize_absmax
        absmax = dequantize_absmax(state)  # per block, 1/block of the weight's size
        xp = self.backend.xp
        buf = xp.empty((spans[0][1], n_in), dtype=xp.float32)
        for r0, r1 in spans:
            v0, v1 = r0 * n_in, r1 * n_in  # v0 is a multiple of the block size, so even
            sub = QuantState(shape=(r1 - r0, n_in), quant_type=state.quant_type, block_size=block,
                             absmax=absmax[v0 // block: -(-v1 // block)])
            yield r0, r1, self._dequantize(self.packed[v0 // 2: (v1 + 1) // 2], sub, buf[: r1 - r0])


#: Bytes of dequantized weights that ops may hold from their forward to their backward, process-wide.
#: A layer whose input gradient will be needed keeps its (unchunked) W for that backward instead of
#: dequantizing it a second time, while the total held stays under this; beyond it, the backward
#: dequantizes again. Held arrays go with the graph (after backward(), or when it is dropped), never
#: into the layer, so nothing survives the step; the bound keeps a deep stack of small layers from
#: holding its whole float32 base at the step's peak. (Measured on the small MLP: keeping fc2's W
#: makes the QLoRA step ~5% faster, with the same peak, which fc1's forward sets.)
KEEP_FOR_BACKWARD_BYTES = 4 * CHUNK_VALUES
_held_bytes = 0


def _hold(w: Any) -> Any:
    """``w`` if it may be held for the backward (counted until it is freed), else None."""
    global _held_bytes
    size = int(w.nbytes)
    if _held_bytes + size > KEEP_FOR_BACKWARD_BYTES:
        return None
    try:
        weakref.finalize(w, _release, size)
    except TypeError:  # an array type without weak references: do not hold it
        return None
    _held_bytes += size
    return w


def _release(size: int) -> None:
    global _held_bytes
    _held_bytes -= size


def _held_or_dequantize(ctx: Context) -> Any:
    w = getattr(ctx, "held", None)
    ctx.held = None
    return w if w is not None else ctx.base.dequantize()


def _rows(a: Any, r0: int, r1: int) -> Any:
    return None if a is None else a[r0:r1]


def _add(total: Any, part: Any) -> Any:
    if part is None:
        return total
    if total is None:
        return part
    total += part
    return total


class Linear4bitFunction(Function):
    """y = x W^T + b with W dequantized for the op only; dx = g W (dequantized again), db; no dW."""

    @staticmethod
    def forward(ctx: Context, x: Any, b: Any = None, *, base: _Base4bit) -> Any:
        k = ctx.backend.kernels
        ctx.base = base
        spans = base.row_chunks()
        if len(spans) == 1:
            w = base.dequantize()
            if ctx.needs_input_grad[0]:
                ctx.held = _hold(w)
            return k.linear_forward(x, w, b)
        y = ctx.backend.xp.empty(x.shape[:-1] + (base.state.shape[0],), dtype=x.dtype)
        for r0, r1, w in base.chunks():
            y[..., r0:r1] = k.linear_forward(x, w, _rows(b, r0, r1))
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, ...]:
        k = ctx.backend.kernels
        need = ctx.needs_input_grad
        need_b = len(need) > 1 and need[1]
        gx = None
        if need[0] and len(ctx.base.row_chunks()) == 1:
            gx = k.linear_backward(g, None, _held_or_dequantize(ctx), True, False, False)[0]
        elif need[0]:
            for r0, r1, w in ctx.base.chunks():
                gx = _add(gx, k.linear_backward(g[..., r0:r1], None, w, True, False, False)[0])
        gb = k.linear_backward(g, None, None, False, False, True)[2] if need_b else None
        return (gx,) + ((gb,) if len(need) > 1 else ())


class QLoRAFunction(Function):
    """y = x W^T + b + s (x_d A^T) B^T over a 4-bit W: the LoRA kernels, with W dequantized per use."""

    @staticmethod
    def forward(ctx: Context, x: Any, a: Any, bm: Any, b: Any = None, *, base: _Base4bit, scaling: float,
                mask: Any = None) -> Any:
        k = ctx.backend.kernels
        xd = None if mask is None else x * mask
        if len(base.row_chunks()) == 1:
            w = base.dequantize()
            if ctx.needs_input_grad[0]:
                ctx.held = _hold(w)
            y, u = k.lora_forward(x, w, b, a, bm, scaling, xd)
        else:  # x W^T + b by row chunks, then the adapter term once, as lora_forward adds it
            y = ctx.backend.xp.empty(x.shape[:-1] + (base.state.shape[0],), dtype=x.dtype)
            for r0, r1, w in base.chunks():
                y[..., r0:r1] = k.linear_forward(x, w, _rows(b, r0, r1))
            u = (x if xd is None else xd) @ a.T
            u *= scaling
            y += u @ bm.T
        ctx.save_for_backward(x, a, bm, u, xd, mask)  # W only as ctx.held (bounded), else rebuilt
        ctx.base, ctx.scaling = base, scaling
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, ...]:
        x, a, bm, u, xd, mask = ctx.saved
        k = ctx.backend.kernels
        need = ctx.needs_input_grad
        need_b = len(need) > 3 and need[3]
        flags = (need[0], False, need_b, need[1], need[2])
        if not need[0] or len(ctx.base.row_chunks()) == 1:
            w = _held_or_dequantize(ctx) if need[0] else None  # no W at all when dx is not needed
            gx, _, gb, ga, gbm = k.lora_backward(g, x, w, a, bm, u, ctx.scaling, flags, xd, mask)
        else:  # dA, dB, db need no W; dx = g W (by row chunks) + s (g B) A [* mask], as lora_backward forms it
            _, _, gb, ga, gbm = k.lora_backward(g, x, None, a, bm, u, ctx.scaling, (False,) + flags[1:], xd, mask)
            gx = None
            for r0, r1, w in ctx.base.chunks():
                gx = _add(gx, k.linear_backward(g[..., r0:r1], None, w, True, False, False)[0])
            gu = g @ bm
            gu *= ctx.scaling
            lora_part = gu @ a
            if mask is not None:
                lora_part *= mask
            gx += lora_part
        return (gx, ga, gbm) + ((gb,) if len(need) > 3 else ())


class QDoRAFunction(Function):
    """DoRA's y = (m / ||W + s B A||_row) (x W^T + s (x_d A^T) B^T) + b over a 4-bit W (rebuilt per use)."""

    @staticmethod
    def forward(ctx: Context, x: Any, a: Any, bm: Any, mag: Any, b: Any = None, *, base: _Base4bit,
                scaling: float, mask: Any = None, norm_grad: bool = False) -> Any:
        k = ctx.backend.kernels
        xd = None if mask is None else x * mask
        if len(base.row_chunks()) == 1:
            w = base.dequantize()
            if ctx.needs_input_grad[0] or (norm_grad and ctx.needs_input_grad[1]):
                ctx.held = _hold(w)
            y, z, u, n, wa = k.dora_forward(x, w, b, a, bm, mag, scaling, xd)
        else:
            xp, n_out = ctx.backend.xp, base.state.shape[0]
            y = xp.empty(x.shape[:-1] + (n_out,), dtype=x.dtype)
            z = xp.empty(x.shape[:-1] + (n_out,), dtype=x.dtype)
            n = xp.empty((n_out,), dtype=mag.dtype)
            wa = xp.empty((n_out, a.shape[0]), dtype=a.dtype)
            for r0, r1, w in base.chunks():
                y[..., r0:r1], z[..., r0:r1], u, n[r0:r1], wa[r0:r1] = k.dora_forward(
                    x, w, _rows(b, r0, r1), a, bm[r0:r1], mag[r0:r1], scaling, xd)
        ctx.save_for_backward(x, a, bm, mag, u, z, n, wa, xd, mask)
        ctx.base, ctx.scaling, ctx.norm_grad = base, scaling, norm_grad
        return y

    @staticmethod
    def backward(ctx: Context, g: Any) -> tuple[Any, ...]:
        x, a, bm, mag, u, z, n, wa, xd, mask = ctx.saved
        k = ctx.backend.kernels
        need = ctx.needs_input_grad
        need_b = len(need) > 4 and need[4]
        flags = (need[0], False, need_b, need[1], need[2], need[3])
        need_w = need[0] or (ctx.norm_grad and need[1])  # W enters dx, and dA through the norm
        if not need_w or len(ctx.base.row_chunks()) == 1:
            w = _held_or_dequantize(ctx) if need_w else None
            gx, _, gb, ga, gbm, gm = k.dora_backward(g, x, w, a, bm, mag, u, z, n, wa, ctx.scaling, flags, xd, mask,
                                                     ctx.norm_grad)
        else:  # by row chunks: dB, dm, db per row; dx and dA summed over the chunks
            xp = ctx.backend.xp
            gx = ga = None
            gbm = xp.empty(bm.shape, dtype=bm.dtype) if need[2] else None
            gm = xp.empty(mag.shape, dtype=mag.dtype) if need[3] else None
            gb = xp.empty(bm.shape[:1], dtype=bm.dtype) if need_b else None
            for r0, r1, w in ctx.base.chunks():
                cx, _, cb, ca, cbm, cm = k.dora_backward(
                    g[..., r0:r1], x, w, a, bm[r0:r1], mag[r0:r1], u, z[..., r0:r1], n[r0:r1], wa[r0:r1],
                    ctx.scaling, flags, xd, mask, ctx.norm_grad)
                gx, ga = _add(gx, cx), _add(ga, ca)
                for full, part in ((gbm, cbm), (gm, cm), (gb, cb)):
                    if full is not None:
                        full[r0:r1] = part
        return (gx, ga, gbm, gm) + ((gb,) if len(need) > 4 else ())


class QuantizedWeight:
    """``layer.weight`` of a 4-bit layer: a read-only view of the packed codes and their state.

    It answers what code written for LoRALinear asks of a weight (backend, dtype, shape) without holding
    any float array; ``dequantize()`` builds a fresh full-precision copy for the caller. It has no
    ``.data``: writing into a dequantized temporary would silently do nothing.
    """

    __slots__ = ("_layer",)
    requires_grad = False
    grad = None

    def __init__(self, layer: "QLoRALinear") -> None:
        self._layer = layer

    @property
    def backend(self) -> Backend:
        return backend_of(self._layer.weight_packed)

    @property
    def dtype(self) -> Any:
        return self._layer.compute_dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self._layer.out_features, self._layer.in_features)

    @property
    def size(self) -> int:
        return self._layer.quantized_numel

    @property
    def nbytes(self) -> int:
        return self._layer.quantized_nbytes()

    def dequantize(self) -> Any:
        return self._layer.base_weight()

    def __repr__(self) -> str:
        q = self._layer.quant_config()
        return f"QuantizedWeight(shape={self.shape}, {q['quant_type']}, block={q['block_size']}, dq={q['double_quant']})"


class QLoRALinear(LoRALinear):
    """A LoRALinear whose frozen base weight is stored in 4 bits; QDoRA when an adapter has use_dora."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = "kaiming",
        adapter_name: str = "default",
        quant_type: str = "nf4",
        double_quant: bool = True,
        block_size: int = 64,
        dtype: Any = None,
        backend: str | Backend = "numpy",
    ) -> None:
        base = Linear(in_features, out_features, bias=bias, dtype=dtype, backend=backend)
        self._init_quantized(base, quant_type, double_quant, block_size)
        self.add_adapter(adapter_name, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                                                  use_dora=use_dora, init_lora_weights=init))

    @classmethod
    def from_linear(
        cls,
        linear: Linear,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        adapter_name: str = "default",
        config: LoraConfig | None = None,
        quant_type: str = "nf4",
        double_quant: bool = True,
        block_size: int = 64,
        use_dora: bool = False,
    ) -> "QLoRALinear":
        """Quantize ``linear``'s weight to 4 bits (its float weight is not kept) and add an adapter.

        The bias is shared with ``linear`` and frozen. Raises ValueError for a bad quant type or block
        size, or a weight holding NaN / Inf, before anything is changed.
        """
        if config is None:
            config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora, use_dora=use_dora,
                                init_lora_weights=init)
        layer = cls.__new__(cls)
        layer._init_quantized(linear, quant_type, double_quant, block_size)
        layer.add_adapter(adapter_name, config)
        return layer

    def _init_quantized(self, linear: Linear, quant_type: str, double_quant: bool, block_size: int) -> None:
        check_quant_type(quant_type)
        block_size = check_block_size(block_size)
        w = linear.weight
        be = w.backend
        if np.dtype(w.dtype).kind != "f":
            raise AdapterError(f"cannot quantize a base weight of dtype {w.dtype}")
        try:
            packed, state = be.kernels.quantize_4bit(w.data, quant_type, block_size, bool(double_quant))
        except ValueError as e:
            raise AdapterError(
                f"cannot quantize the {linear.out_features}x{linear.in_features} base weight to {quant_type}: {e}"
            ) from None
        Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.quant_type, self.double_quant, self.block_size = quant_type, bool(double_quant), block_size
        self.compute_dtype = w.dtype  # float32 (float64 works too: for gradient checks)
        self._set_quantized(packed, state)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad = False
        self.lora_A = ParameterDict()
        self.lora_B = ParameterDict()
        self.lora_magnitude_vector = ParameterDict()
        self.configs: dict[str, LoraConfig] = {}
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.dora_merge_state: dict[str, Any] = {}
        self.adapters_disabled = False
        self._premerge: dict[str, Any] | None = None  # the 4-bit arrays a merge() replaced

    # ------------------------------------------------------------------------------ the 4-bit base

    @property
    def weight(self) -> QuantizedWeight:  # type: ignore[override]
        return QuantizedWeight(self)

    def _state_keys(self) -> tuple[str, ...]:
        return _DQ_KEYS if self.double_quant else _PLAIN_KEYS

    def _set_quantized(self, packed: Any, state: QuantState) -> None:
        """Register ``packed`` and every array of ``state`` as buffers (replacing the previous ones)."""
        if state.double_quant != self.double_quant or state.quant_type != self.quant_type:
            raise ValueError("quant state does not match the layer's quantization settings")
        self.register_buffer(PACKED, packed)
        xp = backend_of(packed).xp
        for key, value in state.arrays().items():
            if key in ("meta", "shape"):
                value = xp.asarray(value)  # host metadata, kept beside the codes on their device
            self.register_buffer(STATE_PREFIX + key, value)

    def _quantized_buffers(self) -> dict[str, Any]:
        return {name: self._buffers[name] for name in (PACKED, *(STATE_PREFIX + k for k in self._state_keys()))}

    @property
    def quant_state(self) -> QuantState:
        """The QuantState over the live buffers (built on each call: the buffers may have been moved or loaded)."""
        b = self._buffers
        kw: dict[str, Any]
        if self.double_quant:
            kw = dict(absmax_codes=b["weight_absmax_codes"], absmax_scale=b["weight_absmax_scale"],
                      absmax_offset=b["weight_absmax_offset"])
        else:
            kw = dict(absmax=b["weight_absmax"])
        return QuantState(shape=(self.out_features, self.in_features), quant_type=self.quant_type,
                          block_size=self.block_size, **kw)

    def _base(self) -> _Base4bit:
        packed = self.weight_packed
        return _Base4bit(packed, self.quant_state, backend_of(packed), self.compute_dtype)

    def quant_config(self) -> dict[str, Any]:
        """What config.json records: {"quant_type", "double_quant", "block_size"}."""
        return {"quant_type": self.quant_type, "double_quant": self.double_quant, "block_size": self.block_size}

    @property
    def quantized_numel(self) -> int:
        """Number of weights the 4-bit base encodes (out x in)."""
        return self.out_features * self.in_features

    def quantized_nbytes(self) -> int:
        """Bytes of the live 4-bit weight: packed codes + quant state (absmax, or its double-quant arrays),
        plus the pre-merge copy while merged. Metadata (two tiny int64 arrays) is not counted."""
        total = int(self.weight_packed.nbytes) + self.quant_state.nbytes()
        if self._premerge is not None:
            total += sum(int(v.nbytes) for k, v in self._premerge.items() if not k.endswith(("_meta", "_shape")))
        return total

    def base_weight(self) -> Any:
        """The base weight dequantized into a fresh array of the compute dtype (not kept by the layer)."""
        return self._base().dequantize()

    def base_weight_tensor(self) -> Tensor:
        """The dequantized base weight as a constant tensor (fresh each call)."""
        packed = self.weight_packed
        return Tensor._make(self.base_weight(), backend_of(packed), False)

    def check_loaded_state(self, state: dict[str, Any], prefix: str, source: str) -> None:
        """Module.load_state_dict's semantic check of the 4-bit arrays, run before anything is written.

        Shapes and dtypes are already checked; this rebuilds the QuantState from the incoming arrays
        (format version, quant type, block size, double-quant flag, finite scales, absmax code range)
        and checks that it describes this layer.
        """
        pre = f"{prefix}." if prefix else ""
        own = self._quantized_buffers()
        arrays = {}
        for name, current in own.items():
            value = state.get(pre + name, current)
            if name != PACKED:
                value = backend_of(value).to_numpy(value)
            arrays[name[len(STATE_PREFIX):] if name != PACKED else name] = value
        where = f"{source}: 4-bit weight of {prefix or 'the layer'!r}"
        try:
            loaded = QuantState.from_arrays(arrays)
            check_packed(arrays[PACKED], loaded)
        except ValueError as e:
            raise StateDictError(f"{where}: {e}") from None
        expect = (self.quant_type, self.block_size, self.double_quant, (self.out_features, self.in_features))
        got = (loaded.quant_type, loaded.block_size, loaded.double_quant, loaded.shape)
        if got != expect:
            raise StateDictError(
                f"{where}: the arrays hold {got[0]}, block {got[1]}, double quant {got[2]}, shape {got[3]}, "
                f"but the config says {expect[0]}, block {expect[1]}, double quant {expect[2]}, shape {expect[3]}"
            )

    # ------------------------------------------------------------------------------ merge

    def merge(self) -> None:
        """Fold the active adapter into a new 4-bit base: quantize(W_deq + delta) replaces the codes.

        The replaced 4-bit arrays are kept (not a float copy) so that unmerge() is exact.
        """
        name = self._active()
        if name in self.merged_adapters:
            return
        w = self.merged_weight(name)
        be = self.weight.backend
        try:
            packed, state = be.kernels.quantize_4bit(w, self.quant_type, self.block_size, self.double_quant)
        except ValueError as e:
            self.dora_merge_state.pop(name, None)
            raise AdapterError(f"cannot merge adapter {name!r} into the 4-bit base: {e}") from None
        self._premerge = self._quantized_buffers()
        self._set_quantized(packed, state)
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Put back the 4-bit base that merge() replaced (bit-exact)."""
        if not self.merged_adapters:
            return
        if self._premerge is None:
            raise AdapterError("this layer's merged 4-bit base has no saved original to restore; cannot unmerge")
        for key, value in self._premerge.items():
            self.register_buffer(key, value)
        self._premerge = None
        for name in self.merged_adapters:
            self.dora_merge_state.pop(name, None)
        self.merged_adapters = []

    def to_linear(self, merge: bool = True) -> Linear:
        """A plain float Linear holding W_deq (+ the active adapter's update when ``merge``)."""
        if merge and self.active_adapter is not None and not self.merged:
            w = self.merged_weight()
            self.dora_merge_state.pop(self.active_adapter, None)
        else:
            if not merge and self.merged:
                self.unmerge()
            w = self.base_weight()
        lin = Linear.__new__(Linear)
        Module.__init__(lin)
        lin.in_features, lin.out_features = self.in_features, self.out_features
        be = self.weight.backend
        lin.weight = Parameter(be.xp.asarray(w))  # w is a fresh array: nothing else holds it
        lin.bias = Parameter(be.xp.array(self.bias.data, copy=True)) if self.bias is not None else None
        return lin

    # ------------------------------------------------------------------------------ forward

    def forward(self, x: Tensor) -> Tensor:
        base = self._base()
        bias = (self.bias,) if self.bias is not None else ()
        name = self.active_adapter
        if name is None or self.adapters_disabled or self.merged:
            return Linear4bitFunction.apply(x, *bias, base=base)
        config = self.configs[name]
        mask = None
        if self.training and config.lora_dropout > 0.0:
            mask = x.backend.kernels.dropout_mask(x.shape, config.lora_dropout, x.dtype, generator())
        a, bm = self.lora_A[name], self.lora_B[name]
        if config.use_dora:
            return QDoRAFunction.apply(x, a, bm, self.lora_magnitude_vector[name], *bias, base=base,
                                       scaling=config.scaling, mask=mask, norm_grad=config.dora_norm_grad)
        return QLoRAFunction.apply(x, a, bm, *bias, base=base, scaling=config.scaling, mask=mask)

    def extra_repr(self) -> str:
        q = f"{self.quant_type}, block={self.block_size}{', double_quant' if self.double_quant else ''}"
        return f"{super().extra_repr()}; base: {q}"


# ---------------------------------------------------------------------------------- model level


def check_quantizable(name: str, linear: Linear, quant_type: str, block_size: int) -> None:
    """Raise ValueError (naming the module) unless ``linear``'s weight can go to 4 bits as asked."""
    check_quant_type(quant_type)
    check_block_size(block_size)
    w = linear.weight
    if np.dtype(w.dtype).kind != "f":
        raise AdapterError(f"cannot quantize {name}.weight: dtype {w.dtype} is not floating point")
    if not bool(w.backend.xp.all(w.backend.xp.isfinite(w.data))):
        raise AdapterError(f"cannot quantize {name}.weight to {quant_type}: it contains NaN or Inf")


def quantized_layers(model: Module) -> list[tuple[str, QLoRALinear]]:
    """(qualified name, layer) of every 4-bit layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QLoRALinear)]


def base_weight_nbytes(model: Module) -> int:
    """Bytes held by the live arrays of the base weights (biases and adapters excluded).

    A 4-bit layer counts its packed codes + quant state; a float Linear or LoRALinear its weight array.
    For the 784-512-256-10 MLP: 2,140,160 (float32), 300,960 (NF4, block 64), 276,028 (NF4 + double quant).
    """
    total = 0
    for _, m in model.named_modules():
        if isinstance(m, QLoRALinear):
            total += m.quantized_nbytes()
        elif isinstance(m, (Linear, LoRALinear)):
            total += int(m.weight.nbytes)
    return total


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def expected_4bit_nbytes(out_features: int, in_features: int, block_size: int = 64, double_quant: bool = True) -> int:
    """The storage formula (for cross-checking the live count): n/2 codes + 4 B per block, or with
    double quant 1 B per block + 4 B per 256 blocks + a 4 B offset."""
    n = out_features * in_features
    nb = _ceil_div(n, block_size)
    if double_quant:
        return _ceil_div(n, 2) + nb + 4 * _ceil_div(nb, 256) + 4
    return _ceil_div(n, 2) + 4 * nb

