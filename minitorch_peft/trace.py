"""One training step, traced as it runs: the forward ops, then the backward in the order it runs.

``trace_step`` records each op as ``Function.apply`` runs it (inputs, output shape, the bytes it saves for
backward, read from the live arrays), then wraps each recorded node's backward so that, while
``loss.backward()`` runs, it sees which gradients the op really returned: *computed*, or *skipped*
because the input is a frozen weight or data. That is the lesson of PEFT seen live: with LoRA the big
base weights never get a gradient at all, not a zero one. Then one optimizer step.

``python cli.py trace --method lora`` prints it; ``docs/02-one-training-step.md`` embeds the output for
``lora`` and ``full`` (``python cli.py trace --update-doc`` regenerates it; a test fails if it is stale).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .function import Function
from .graph import _held_base, is_packed_base, leaf_kind, saved_arrays
from .tensor import Tensor

__all__ = ["StepTrace", "build_step", "trace_step", "update_doc", "DOC_PATH", "DOC_METHODS"]

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "02-one-training-step.md"
DOC_METHODS = ("lora", "full")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ("," if len(shape) == 1 else "") + ")"


@dataclass
class StepTrace:
    """What one traced step did; ``lines`` is the printable trace."""

    lines: list[str] = field(default_factory=list)
    computed: list[str] = field(default_factory=list)       # parameters whose gradient was computed
    skipped: list[str] = field(default_factory=list)        # frozen parameters whose gradient was skipped
    computed_values: int = 0
    skipped_values: int = 0
    saved_bytes: int = 0
    updated: int = 0

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class _Recorder:
    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.number: dict[int, int] = {}     # id(output tensor) -> op number
        self.ctx_number: dict[int, int] = {}  # id(ctx) -> op number
        self.forward: list[str] = []
        self.leaf_data: set[int] = set()
        self.saved_ids: set[int] = set()
        self.saved_bytes = 0

    def label(self, t: Any) -> str:
        if not isinstance(t, Tensor):
            return repr(t)
        if id(t) in self.number:
            return f"#{self.number[id(t)]}"
        name = self.names.get(id(t)) or t.name
        if name is None:
            return "const"
        kind = leaf_kind(t) if t._ctx is None else ""
        return name + (" [frozen]" if kind == "frozen" else "")

    def described(self, t: Any) -> str:
        """'fc1.weight (512, 784) frozen', 'x (64, 784)', '#2 (64, 512)', or a number's repr."""
        if not isinstance(t, Tensor):
            return repr(t)
        label = self.label(t)
        frozen = label.endswith(" [frozen]")
        return f"{label.replace(' [frozen]', '')} {_shape(t.shape)}" + (" frozen" if frozen else "")

    def on_forward(self, fn: type, inputs: tuple[Any, ...], out: Tensor) -> None:
        ctx = out._ctx
        ins = ", ".join(self.described(t) for t in inputs if not is_packed_base(t))
        if ctx is None:
            self.forward.append(f"  -- {fn.__name__:<18}{ins} -> {_shape(out.shape)}   not recorded (no input needs a gradient)")
            return
        k = len(self.number) + 1
        self.number[id(out)] = k
        self.ctx_number[id(ctx)] = k
        for t in inputs:
            if isinstance(t, Tensor) and t._ctx is None:
                self.leaf_data.add(id(t.data))
        base = _held_base(ctx)
        if base is not None:
            ins += f", 4-bit base {_shape(tuple(base.state.shape))} frozen"
        new, refs = 0, 0
        for s in saved_arrays(ctx):
            if s.array_id in self.leaf_data:
                refs += 1
                continue
            new += s.nbytes
            if s.array_id not in self.saved_ids:
                self.saved_ids.add(s.array_id)
                self.saved_bytes += s.nbytes
        saves = f"saves {new:,} B" + (f" (+ {refs} leaf array{'s' if refs > 1 else ''} by reference)" if refs else "")
        self.forward.append(f"  #{k:<2} {fn.__name__:<17}{ins}")
        self.forward.append(f"      {'':<17}-> {_shape(out.shape)}   {saves}")


@contextlib.contextmanager
def _record_forward(recorder: _Recorder) -> Iterator[None]:
    """While active, every ``Function.apply`` reports its inputs and result to ``recorder``."""
    original = Function.__dict__["apply"]

    def apply(cls: type, *inputs: Any, **kwargs: Any) -> Tensor:
        out = original.__func__(cls, *inputs, **kwargs)
        recorder.on_forward(cls, inputs, out)
        return out

    Function.apply = classmethod(apply)  # type: ignore[method-assign, assignment]
    try:
        yield
    finally:
        Function.apply = original  # type: ignore[method-assign]


class _TracedFn:
    """Stands in for a node's ``ctx.fn``: runs the real backward, then reports what it returned."""

    def __init__(self, fn: Any, report: Callable[[Any, tuple[Any, ...]], None]) -> None:
        self.fn, self.report, self.__name__ = fn, report, fn.__name__

    def backward(self, ctx: Any, g: Any) -> tuple[Any, ...]:
        grads = self.fn.backward(ctx, g)
        self.report(ctx, grads)
        return grads


def trace_step(model: Any, x: Tensor, labels: Any, optimizer: Any = None,
               loss_fn: Callable[[Tensor, Any], Tensor] | None = None) -> StepTrace:
    """Run one step (forward, backward, optimizer step) of ``model`` on a batch, tracing every op."""
    from . import functional as F

    loss_fn = loss_fn or F.cross_entropy
    if not isinstance(labels, Tensor):
        labels = Tensor._make(x.backend.asarray(labels), x.backend, False)
    names = {id(p): n for n, p in model.named_parameters()}
    names[id(x)], names[id(labels)] = "x", "labels"
    params = dict(model.named_parameters())
    rec = _Recorder(names)
    trace = StepTrace()
    with _record_forward(rec):
        loss = loss_fn(model(x), labels)

    backward: list[str] = []
    computed: dict[str, int] = {}
    skipped: dict[str, int] = {}

    def report(ctx: Any, grads: tuple[Any, ...]) -> None:
        done, skip = [], []
        for parent, grad in zip(ctx.parents, grads):
            if is_packed_base(parent):
                continue
            label = rec.label(parent).replace(" [frozen]", "")
            if grad is not None:
                done.append(f"d{label} {_shape(tuple(grad.shape))}")
                if parent._ctx is None and id(parent) in names and label in params:
                    computed[label] = parent.size
                if not parent.requires_grad:
                    done[-1] += " (unused!)"
            elif parent.requires_grad:
                skip.append(f"{label} (MISSING: it requires grad)")
            else:
                kind = leaf_kind(parent) if parent._ctx is None else "constant"
                skip.append(f"{label} ({'frozen' if kind == 'frozen' else 'data'})")
                if kind == "frozen":
                    skipped[label] = parent.size
        k = rec.ctx_number.get(id(ctx), 0)
        base = _held_base(ctx)
        if base is not None:
            skip.append("4-bit base (frozen: a packed operand, no gradient path)")
            skipped[f"4-bit base of #{k}"] = int(np.prod(base.state.shape))
        backward.append(f"  #{k:<2} {ctx.fn.__name__:<17}computed: {', '.join(done) or 'nothing'}")
        if skip:
            backward.append(f"      {'':<17}skipped:  {', '.join(skip)}")

    from .graph import graph_nodes

    for node in graph_nodes(loss):
        ctx = node._ctx
        if ctx is not None and hasattr(ctx, "fn") and ctx.fn is not None:
            ctx.fn = _TracedFn(ctx.fn, report)
    if optimizer is not None:
        optimizer.zero_grad()
    loss.backward()
    if optimizer is not None:
        with_grad = [n for n, p in params.items() if p.grad is not None]
        before = {n: params[n].numpy().copy() for n in with_grad}
        optimizer.step()
        still = [n for n in with_grad if np.array_equal(before[n], params[n].numpy())]
        trace.updated = len(with_grad) - len(still)
        upd = (f"optimizer step: {type(optimizer).__name__} updated the {len(with_grad)} tensors that have a gradient "
               f"({sum(params[n].size for n in with_grad):,} values)")
        if still:
            upd += f"; {len(still)} of them did not move (gradient exactly zero): {', '.join(still)}"
        no_grad = len(params) - len(with_grad)
        if no_grad:
            upd += f"; {no_grad} frozen tensors: no gradient, no optimizer state, not touched"
    trace.computed, trace.skipped = list(computed), list(skipped)
    trace.computed_values, trace.skipped_values = sum(computed.values()), sum(skipped.values())
    trace.saved_bytes = rec.saved_bytes
    n_params = len(params) + sum(1 for k in skipped if k.startswith("4-bit base"))
    trace.lines = (
        ["forward, in the order the ops run (#k: the output of op k)"] + rec.forward
        + ["", "backward, in the order it runs"] + backward + [""]
        + ([upd] if optimizer is not None else [])
        + [f"saved for backward: {rec.saved_bytes:,} B (distinct arrays; the leaves' own data not counted)",
           f"weight gradients computed: {len(computed)} of {n_params} ({trace.computed_values:,} values)",
           f"weight gradients skipped (frozen): {len(skipped)} of {n_params} ({trace.skipped_values:,} values never computed)"
           + (": " + ", ".join(skipped) if skipped else "")]
    )
    return trace


def build_step(method: str, batch_size: int = 64, seed: int = 0, backend: str = "numpy") -> tuple[Any, Any, Tensor, Tensor]:
    """The default model prepared as ``cli.py train --method METHOD`` prepares it, its optimizer, and one
    seeded random batch (shapes and bytes do not depend on the pixel values, so no dataset is needed)."""
    from .backend import get_backend
    from .nn.layers import MLP
    from .optim import Adam
    from .random import manual_seed
    from .train import DIMS, METHODS, TrainConfig

    cfg = TrainConfig(method=method, batch_size=batch_size, backend=backend)
    cfg.validate()
    manual_seed(seed)
    model = MLP(DIMS)
    groups = METHODS[method](model, cfg)
    be = get_backend(backend)
    model.to(be)
    rng = np.random.default_rng(seed)
    x = Tensor(be.asarray(rng.random((batch_size, DIMS[0]), dtype=np.float32)), backend=be)
    labels = Tensor(be.asarray(rng.integers(0, DIMS[-1], batch_size)), backend=be)
    return model, Adam(groups, lr=cfg.lr), x, labels


def method_trace(method: str, batch_size: int = 64) -> StepTrace:
    from .train import DIMS

    model, optimizer, x, labels = build_step(method, batch_size)
    trace = trace_step(model, x, labels, optimizer)
    head = (f"one training step: --method {method}, MLP {' -> '.join(map(str, DIMS))}, batch {batch_size}, "
            f"{np.dtype(x.dtype).name}, a seeded random batch")
    trace.lines.insert(0, head)
    trace.lines.insert(1, "")
    return trace


def _markers(method: str) -> tuple[str, str]:
    return f"<!-- trace --method {method}: generated by `python cli.py trace --update-doc`, do not edit -->", \
        f"<!-- end trace --method {method} -->"


def doc_block(method: str) -> str:
    start, end = _markers(method)
    return f"{start}\n```text\n{method_trace(method).text()}```\n{end}"


def update_doc(path: Path | str = DOC_PATH, check: bool = False) -> bool:
    """Replace each generated trace block in ``path`` with a fresh one; True if the file was already current.

    With ``check`` nothing is written. A document missing a block's markers is an error (ValueError).
    """
    path = Path(path)
    text = original = path.read_text(encoding="utf-8")
    for method in DOC_METHODS:
        start, end = _markers(method)
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise ValueError(f"{path}: no generated block for --method {method} (markers {start!r} ... {end!r})")
        text = pattern.sub(lambda _: doc_block(method), text, count=1)
    if text != original and not check:
        path.write_text(text, encoding="utf-8")
    return text == original
