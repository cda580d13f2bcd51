"""QLoRA and QDoRA: LoRA / DoRA adapters over a frozen base weight stored in 4 bits (NF4 or FP4).

QLoRALinear is a LoRALinear whose base weight is a ``peft.weights.PackedWeight`` operand: the same fused
ops (``peft.fused``) and the same adapter updates run over it, so this module is only about storage.

The base weight lives only as packed 4-bit codes (uint8, two per byte) plus its quantization state
(per-block absmax, or with double quantization 8-bit absmax codes + per-256 scales + one offset), all
registered as buffers, so ``state_dict`` and the model folder hold them exactly as they are. The
adapters (A, B, and DoRA's m) and the bias stay in the compute dtype (float32).

No full-precision copy of the base weight outlives a training step. The forward dequantizes W
into a fresh array (a weight over ``weights.CHUNK_VALUES`` by row chunks through one buffer), uses it for
``x W^T`` and drops it; when the input gradient ``g W`` will be needed (not in the first layer of a
network: its input is data) the op's graph node may hold that W until its backward, within a small
process-wide budget (``weights.KEEP_FOR_BACKWARD_BYTES``), and otherwise the backward dequantizes it again. A persistent scratch
buffer was rejected: kept per layer or in a pool keyed by shape, it is exactly the float32 weight the
4-bit format is meant to remove, and the dequantize kernel is fast next to the matmul it feeds. The
base gets no gradient.

``merge()`` folds the active adapter into a NEW 4-bit base (W_deq + delta, re-quantized); the old 4-bit
arrays are kept aside (4 bits a weight, not float32) so that ``unmerge()`` restores them bit for bit.
``to_linear()`` / ``merge_and_unload`` give plain float32 Linears holding W_deq (+ delta).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import Backend, QuantState, backend_of, check_block_size, check_packed, check_quant_type
from ..nn.layers import Linear
from ..nn.module import Module, Parameter, StateDictError
from ..tensor import Tensor
from .config import AdapterError, LoraConfig
from .lora import LoRALinear, layer_config
from .weights import PackedWeight

__all__ = ["QLoRALinear", "QuantizedWeight", "base_weight_nbytes", "quantized_layers"]

# buffer names: the packed codes, then QuantState.arrays()'s names with this prefix
PACKED = "weight_packed"
STATE_PREFIX = "weight_"
_PLAIN_KEYS = ("meta", "shape", "absmax")
_DQ_KEYS = ("meta", "shape", "absmax_codes", "absmax_scale", "absmax_offset")


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
    """A LoRALinear whose frozen base weight is stored in 4 bits (a PackedWeight to the ops); QDoRA when an
    adapter is a DoRA one. Forward, adapters and their updates are LoRALinear's; only storage differs."""

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
        self.add_adapter(adapter_name, layer_config(r, alpha, dropout, use_rslora, init, use_dora))

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
            config = layer_config(r, alpha, dropout, use_rslora, init, use_dora)
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
        self._init_layer(linear)
        self.quant_type, self.double_quant, self.block_size = quant_type, bool(double_quant), block_size
        self.compute_dtype = w.dtype  # float32 (float64 works too: for gradient checks)
        self._set_quantized(packed, state)
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

    def _base(self) -> PackedWeight:
        """The 4-bit base as an operand over the live buffers (made per call: a merge swaps the buffers)."""
        packed = self.weight_packed
        return PackedWeight(packed, self.quant_state, backend_of(packed), self.compute_dtype)

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
        """The packed base as the ops take it: a constant tensor over a PackedWeight operand, which
        dequantizes inside each product (fresh each call)."""
        base = self._base()
        return Tensor._make(base, base.backend, False)

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

