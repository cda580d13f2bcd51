"""Base-weight operands: the frozen W (out x in) of an adapted layer, whatever its storage.

A fused LoRA / DoRA op asks its base weight for four products and nothing else:

    W.matmul_t(x, b)   x W^T + b                  (the forward's big matmul)
    W.matmul(g)        g W                        (the input gradient; g may be (batch, out) or (r, out))
    W.norm_terms(a)    (W A^T, ||W_o||^2 per row) (DoRA's row norm, without an (out x in) temporary)
    W.dora_terms(x, a) (x W^T, W A^T, ||W_o||^2)  (DoRA's forward: all three in one pass over W)

``DenseWeight`` answers from a float array through the backend's kernels. ``PackedWeight`` holds 4-bit
codes and dequantizes inside each call, by row chunks for a big weight, so an op written for a dense W
runs unchanged over a QLoRA base: QLoRA is LoRA with a packed base, QDoRA is DoRA with one.

Rows are independent in every one of these products (``g W`` sums over them), which is what makes row
chunks exact. An operand is made per forward call and kept by the op's graph node, so whatever it holds
(a dequantized W kept for the backward) goes with the graph.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Iterator

from ..backend import Backend, QuantState

__all__ = ["DenseWeight", "PackedWeight", "as_weight", "CHUNK_VALUES", "KEEP_FOR_BACKWARD_BYTES"]


class DenseWeight:
    """A float (out x in) weight held as an array of the backend (a plain, possibly trainable, W)."""

    __slots__ = ("w", "backend")

    def __init__(self, w: Any, backend: Backend) -> None:
        self.w, self.backend = w, backend

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.w.shape)

    def array(self) -> Any:
        """W itself (not a copy)."""
        return self.w

    def matmul_t(self, x: Any, b: Any = None, keep: bool = False) -> Any:
        """x W^T + b (``keep`` is for operands that rebuild W: a dense W is always there)."""
        return self.backend.kernels.linear_forward(x, self.w, b)

    def matmul(self, g: Any, keep: bool = False) -> Any:
        """g W (``keep``: for operands that hold a rebuilt W between calls)."""
        return self.backend.kernels.linear_backward(g, None, self.w, True, False, False)[0]

    def norm_terms(self, a: Any) -> tuple[Any, Any]:
        """(W A^T, ||W_o||^2 per output row)."""
        return self.w @ self.backend.matrix_transpose(a), self.backend.kernels.row_sumsq(self.w)

    def dora_terms(self, x: Any, a: Any, keep: bool = False) -> tuple[Any, Any, Any]:
        """(x W^T, W A^T, ||W_o||^2 per output row)."""
        return (self.matmul_t(x), *self.norm_terms(a))


def as_weight(w: Any, backend: Backend) -> Any:
    """``w`` as an operand: an array becomes a DenseWeight, an operand is returned as it is."""
    return w if isinstance(w, (DenseWeight, PackedWeight)) else DenseWeight(w, backend)


#: The largest piece of a packed base weight dequantized at once, in values (2 MiB of float32). A bigger
#: weight is processed in chunks of output rows through one buffer per call, so the transient float copy a
#: step needs stays this small whatever the layer size (the medium MLP's 2048x1024 weight would otherwise
#: take 8.4 MB in every step). Not smaller: every chunk is one more BLAS call, and on a busy 2-core machine
#: 1 MiB chunks (two for the small MLP's 512x784 weight) measured a QLoRA step 1.6-1.8x LoRA's against
#: 1.2-1.3x unchunked.
CHUNK_VALUES = 1 << 19

#: Bytes of dequantized weights that ops may hold from their forward to their backward, process-wide.
#: An op whose input gradient will be needed asks its (unchunked) W to stay for that backward instead of
#: dequantizing it a second time, while the total held stays under this; beyond it, the backward
#: dequantizes again. Held arrays go with the graph (after backward(), or when it is dropped), never into
#: the layer, so nothing survives the step; the bound keeps a deep stack of small layers from holding its
#: whole float32 base at the step's peak.
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


class PackedWeight:
    """A 4-bit base: packed codes + QuantState, dequantized on demand (whole, or by row chunk).

    Holding the arrays (not the layer) means a merge() between forward and backward, which swaps in
    new arrays, cannot change the weight this op's backward uses.
    """

    __slots__ = ("packed", "state", "backend", "dtype", "held", "__weakref__")

    def __init__(self, packed: Any, state: QuantState, backend: Backend, dtype: Any) -> None:
        self.packed, self.state, self.backend, self.dtype = packed, state, backend, dtype
        self.held: Any = None  # the dequantized W kept from the forward for the backward, within the budget

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.state.shape)  # type: ignore[return-value]

    def array(self) -> Any:
        """W as a fresh array of the compute dtype."""
        return self.dequantize()

    def dequantize(self) -> Any:
        """The whole weight as a fresh array of the compute dtype."""
        return self._dequantize(None)

    def _dequantize(self, out: Any, rows: tuple[int, int] | None = None) -> Any:
        """W (or rows r0:r1 of it) into ``out`` (or a fresh array), in the compute dtype."""
        # validate=False: the arrays were checked when they were made, loaded or merged, and checking
        # them again on every forward would cost a quarter of the dequantize (and on CuPy a GPU wait per
        # check: one, or three with double quantization).
        # serial=True: on a CPU, one thread (a parallel region costs more than it saves at chunk size,
        # and on a busy machine waits for a core); a device kernel ignores it
        w = self.backend.kernels.dequantize_4bit(self.packed, self.state, out, False, True, rows)
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
        xp = self.backend.xp
        buf = xp.empty((spans[0][1], self.shape[1]), dtype=xp.float32)
        for r0, r1 in spans:
            yield r0, r1, self._dequantize(buf[: r1 - r0], (r0, r1))

    def _whole(self, keep: bool) -> Any:
        """The whole W (unchunked weights only), held for the backward when ``keep`` and the budget allow."""
        w = self.dequantize()
        if keep:
            self.held = _hold(w)
        return w

    def _out(self, lead: tuple[int, ...], width: int, dtype: Any) -> Any:
        return self.backend.xp.empty(lead + (width,), dtype=dtype)

    def matmul_t(self, x: Any, b: Any = None, keep: bool = False) -> Any:
        """x W^T + b, W dequantized whole (and held if ``keep``) or by row chunks."""
        if len(self.row_chunks()) == 1:
            return self.backend.kernels.linear_forward(x, self._whole(keep), b)
        y = self._matmul_t_chunks(x)
        if b is not None:
            y += b
        return y

    def _matmul_t_chunks(self, x: Any, each: Callable[[int, int, Any], None] | None = None) -> Any:
        """x W^T by row chunks of W (x None: None), calling ``each(r0, r1, W[r0:r1])`` on every chunk too.

        The product is computed as its transpose W x^T: chunk (r0, r1) gives rows r0:r1 of it, so each
        product lands in one contiguous block, and one transposing copy ends the loop. Each output is the
        same dot product either way: the bits are those of x W_c^T chunk by chunk (and, for products past
        OpenBLAS's small-matrix path, of x W^T on the whole W). Against x W_c^T per chunk written into
        columns r0:r1 of the output (medium MLP, same process, interleaved): the QLoRA forward took
        0.87-0.92x the time, the step 0.97-0.99x (four runs). BLAS runs faster with the many weight rows as the
        product's rows than with the batch of 64 there (``kernels.cpu.WIDE_OUT`` says the same of a dense W).
        """
        be = self.backend
        x2 = None if x is None else be.xp.reshape(x, (-1, x.shape[-1]))
        y_t = None if x2 is None else be.xp.empty((self.shape[0], x2.shape[0]), dtype=x.dtype)
        for r0, r1, w in self.chunks():
            if y_t is not None:
                # linear_forward(a, b) is a b^T: here W_c x^T, through the kernel that owns the BLAS call, which
                # writes it straight into its rows of y_t (against a product per chunk copied there: medium
                # QLoRA forward 0.93-0.95x the time, step 0.98x, the same bits)
                be.kernels.linear_forward(w, x2, None, y_t[r0:r1])
            if each is not None:
                each(r0, r1, w)
        if y_t is None:
            return None
        lead = tuple(x.shape[:-1])
        y = self._out(lead, self.shape[0], x.dtype)
        y[...] = be.xp.reshape(be.matrix_transpose(y_t), lead + (self.shape[0],))
        return y

    def matmul(self, g: Any, keep: bool = False) -> Any:
        """g W: the held W (released unless ``keep``), else W dequantized again, whole or by row chunks
        (the chunks' products summed)."""
        linear_backward = self.backend.kernels.linear_backward
        w = self.held
        if not keep:
            self.held = None
        if w is None and len(self.row_chunks()) == 1:
            w = self.dequantize()
        if w is not None:
            return linear_backward(g, None, w, True, False, False)[0]
        total = None
        for r0, r1, w in self.chunks():
            part = linear_backward(g[..., r0:r1], None, w, True, False, False)[0]
            if total is None:
                total = part
            else:
                total += part
            del part  # else it stays alive beside the next chunk's product: one more (batch x in) at the peak
        return total

    def norm_terms(self, a: Any) -> tuple[Any, Any]:
        """(W A^T, ||W_o||^2 per output row), by row chunks."""
        return self.dora_terms(None, a)[1:]

    def dora_terms(self, x: Any, a: Any, keep: bool = False) -> tuple[Any, Any, Any]:
        """(x W^T, W A^T, ||W_o||^2 per output row) from one dequantize of each row chunk (x None: no x W^T)."""
        be = self.backend
        k, a_t = be.kernels, be.matrix_transpose(a)
        if len(self.row_chunks()) == 1:
            w = self._whole(keep and x is not None)
            return (None if x is None else k.linear_forward(x, w, None)), w @ a_t, k.row_sumsq(w)
        n_out = self.shape[0]
        wa = be.xp.empty((n_out, a.shape[0]), dtype=a.dtype)
        sq = be.xp.empty((n_out,), dtype=self.dtype)

        def norm_rows(r0: int, r1: int, w: Any) -> None:
            wa[r0:r1] = w @ a_t
            sq[r0:r1] = k.row_sumsq(w)

        return self._matmul_t_chunks(x, norm_rows), wa, sq
