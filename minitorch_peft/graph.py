"""The graph behind a tensor, made visible: a text tree (``Tensor.graph()``) and Graphviz DOT source.

A graph node is a tensor made by an op: its ``_ctx`` holds the op (``ctx.fn``), the input tensors
(``ctx.parents``) and what the forward saved for the backward (``ctx.saved`` and any other array the op
kept on ``ctx``). A leaf has no ``_ctx``; it is *trainable* (``requires_grad``: backward accumulates into
its ``.grad``), *frozen* (a module's Parameter with ``requires_grad=False``: no gradient is ever computed
for it) or a *constant* (data: the input batch, the labels).

"Saved bytes" are the bytes of the distinct arrays an op keeps for its backward, read from the live
arrays. Arrays that are a leaf's own data (a weight, the input batch) are listed but not counted: they
exist whether or not a graph is recorded. After ``backward()`` the graph is released; call ``graph()``
before it (or backward with ``retain_graph=True``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .tensor import Tensor, postorder

__all__ = ["Saved", "format_graph", "graph_nodes", "leaf_kind", "name_map", "saved_arrays", "to_dot"]

_CTX_FIELDS = {"backend", "needs_input_grad", "saved", "fn", "parents"}


def name_map(names: Any = None) -> dict[int, str]:
    """{id(tensor): name} from a Module (its named parameters), a mapping name -> tensor, or one of ids."""
    if names is None:
        return {}
    if hasattr(names, "named_parameters"):
        return {id(p): n for n, p in names.named_parameters()}
    items = dict(names)
    if all(isinstance(k, int) for k in items):
        return {int(k): str(v) for k, v in items.items()}
    return {id(t): str(n) for n, t in items.items()}


def _is_array(v: Any) -> bool:
    return not isinstance(v, Tensor) and all(hasattr(v, a) for a in ("nbytes", "shape", "dtype"))


@dataclass
class Saved:
    """One array an op keeps for its backward; ``of`` is the input tensor whose data it is, if any."""

    label: str
    shape: tuple[int, ...]
    nbytes: int
    array_id: int
    of: Tensor | None


def saved_arrays(ctx: Any) -> list[Saved]:
    """The distinct arrays ``ctx`` keeps for backward: ``ctx.saved`` in order, then arrays on other fields."""
    if ctx is None or not hasattr(ctx, "parents"):
        return []
    by_data = {id(p.data): p for p in ctx.parents if p is not None}
    found: list[tuple[str, Any]] = [(f"saved[{i}]", v) for i, v in enumerate(getattr(ctx, "saved", ())) if _is_array(v)]
    for key, value in vars(ctx).items():
        if key not in _CTX_FIELDS and _is_array(value):
            found.append((key, value))
    out: list[Saved] = []
    seen: set[int] = set()
    for label, array in found:
        if id(array) in seen:
            continue
        seen.add(id(array))
        out.append(Saved(label, tuple(int(n) for n in array.shape), int(array.nbytes), id(array), by_data.get(id(array))))
    return out


def is_packed_base(t: Any) -> bool:
    """Whether ``t`` is an op input holding QLoRA's packed 4-bit base (a PackedWeight operand) or is None
    (an optional input not given): not a tensor of values to list or differentiate."""
    return t is None or (hasattr(t.data, "packed") and hasattr(t.data, "state"))


def _held_base(ctx: Any) -> Any:
    """The frozen 4-bit weight an op multiplies by (QLoRA's packed base, an operand input), or None."""
    for p in getattr(ctx, "parents", ()) or ():
        if p is not None and is_packed_base(p):
            return p.data
    for key, value in vars(ctx).items() if ctx is not None and hasattr(ctx, "parents") else ():
        if key not in _CTX_FIELDS and hasattr(value, "packed") and hasattr(value, "state"):
            return value
    return None


def graph_nodes(root: Tensor) -> list[Tensor]:
    """Every tensor the graph behind ``root`` reaches (through all inputs, frozen ones too), inputs first."""
    return postorder(root, lambda node: reversed(_parents(node)))  # reversed: the first input comes first


def _parents(node: Tensor) -> tuple[Tensor, ...]:
    return tuple(p for p in getattr(node._ctx, "parents", ()) or () if not is_packed_base(p))


def _is_parameter(t: Tensor) -> bool:
    from .nn.module import Parameter

    return isinstance(t, Parameter)


def leaf_kind(t: Tensor) -> str:
    """'trainable' (requires grad), 'frozen' (a module's Parameter that does not) or 'constant' (data)."""
    if t.requires_grad:
        return "trainable"
    return "frozen" if _is_parameter(t) else "constant"


def _shape(t: Any) -> str:
    return "(" + ", ".join(str(n) for n in t.shape) + ("," if len(t.shape) == 1 else "") + ")"


def _op_name(node: Tensor) -> str:
    fn = getattr(node._ctx, "fn", None)
    return getattr(fn, "__name__", type(fn).__name__) if fn is not None else "released"


def _fmt_bytes(n: int) -> str:
    return f"{n:,} B"


def _activation_bytes(ctx: Any, leaf_data: set[int]) -> tuple[int, list[Saved]]:
    items = saved_arrays(ctx)
    return sum(s.nbytes for s in items if s.array_id not in leaf_data), items


def _leaf_label(t: Tensor, names: Mapping[int, str]) -> str:
    return names.get(id(t)) or t.name or "const"


def format_graph(root: Tensor, names: Any = None) -> str:
    """A text tree of the graph behind ``root``: each op with its output shape and saved bytes, each leaf
    with its name, shape and kind (trainable / frozen / constant); a shared node is drawn once and then
    referred to by its number. Ends with totals, all read from the live arrays."""
    ids = name_map(names)
    nodes = graph_nodes(root)
    leaf_data = {id(n.data) for n in nodes if n._ctx is None}
    number: dict[int, int] = {}
    for n in nodes:
        if n._ctx is not None:
            number[id(n)] = len(number) + 1
    lines: list[str] = []
    drawn: set[int] = set()

    def describe(t: Tensor) -> str:
        if t._ctx is None:
            kind = leaf_kind(t)
            return f"{_leaf_label(t, ids)} {_shape(t)} {t.dtype} {kind}"
        if not hasattr(t._ctx, "parents"):
            return f"#{number[id(t)]} (released: backward() already ran through it)"
        act, items = _activation_bytes(t._ctx, leaf_data)
        refs = sum(1 for s in items if s.array_id in leaf_data)
        saved = f"saves {_fmt_bytes(act)}" + (f" + {refs} leaf array{'s' if refs > 1 else ''} by reference" if refs else "")
        base = _held_base(t._ctx)
        extra = ""
        if base is not None:
            extra = f"; holds a frozen 4-bit weight {tuple(base.state.shape)}"
        return f"#{number[id(t)]} {_op_name(t)} -> {_shape(t)} {t.dtype}  [{saved}{extra}]"

    stack: list[tuple[Tensor, str, str]] = [(root, "", "")]
    while stack:
        t, lead, child_lead = stack.pop()
        if id(t) in drawn and t._ctx is not None:
            lines.append(f"{lead}#{number[id(t)]} {_op_name(t)} (drawn above)")
            continue
        drawn.add(id(t))
        lines.append(lead + describe(t))
        parents = _parents(t)
        for i in reversed(range(len(parents))):
            last = i == len(parents) - 1
            stack.append((parents[i], child_lead + ("└── " if last else "├── "), child_lead + ("    " if last else "│   ")))

    ops = [n for n in nodes if n._ctx is not None]
    leaves = [n for n in nodes if n._ctx is None]
    total, seen = 0, set()
    for n in ops:
        for s in saved_arrays(n._ctx):
            if s.array_id not in leaf_data and s.array_id not in seen:
                seen.add(s.array_id)
                total += s.nbytes
    kinds = {k: [t for t in leaves if leaf_kind(t) == k] for k in ("trainable", "frozen", "constant")}
    counts = ", ".join(f"{len(v)} {k} ({sum(t.size for t in v):,} values)" for k, v in kinds.items())
    lines.append(f"{len(ops)} ops; leaves: {counts}; saved for backward: {_fmt_bytes(total)} (distinct arrays, leaf data excluded)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ DOT

_STYLE = {
    "trainable": 'shape=ellipse, style="filled,bold", fillcolor="#b7e1a1", color="#2e7d32", penwidth=2',
    "frozen": 'shape=ellipse, style="filled,dashed", fillcolor="#d9d9d9", color="#757575", fontcolor="#424242"',
    "constant": 'shape=note, style=filled, fillcolor="#ffffff", color="#9e9e9e"',
    "op": 'shape=box, style="rounded,filled", fillcolor="#dbe9f7", color="#1f4e79"',
}


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(root: Tensor, names: Any = None, title: str | None = None) -> str:
    """Graphviz DOT source for the graph behind ``root``: data flows from the leaves to ``root``.

    Ops are blue boxes (output shape, saved bytes); trainable leaves green bold ellipses, frozen leaves
    grey dashed ellipses, constants (data) white notes.
    """
    ids = name_map(names)
    nodes = graph_nodes(root)
    leaf_data = {id(n.data) for n in nodes if n._ctx is None}
    key = {id(n): f"n{i}" for i, n in enumerate(nodes)}
    out = ["digraph step {", "  rankdir=BT;", '  node [fontname="Helvetica", fontsize=10];',
           '  edge [color="#555555", arrowsize=0.7];']
    if title:
        out.append(f"  labelloc=t; label={_q(title)};")
    number = 0
    for n in nodes:
        if n._ctx is None:
            kind = leaf_kind(n)
            label = f"{_leaf_label(n, ids)}\n{_shape(n)}\n{kind}"
            out.append(f"  {key[id(n)]} [label={_q(label)}, {_STYLE[kind]}];")
            continue
        number += 1
        act, _ = _activation_bytes(n._ctx, leaf_data) if hasattr(n._ctx, "parents") else (0, [])
        label = f"#{number} {_op_name(n)}\n-> {_shape(n)}\nsaves {_fmt_bytes(act)}"
        out.append(f"  {key[id(n)]} [label={_q(label)}, {_STYLE['op']}];")
        base = _held_base(n._ctx)
        if base is not None:
            q = f"{key[id(n)]}_base"
            out.append(f"  {q} [label={_q('frozen 4-bit weight ' + str(tuple(base.state.shape)))}, {_STYLE['frozen']}];")
            out.append(f"  {q} -> {key[id(n)]} [style=dashed];")
        for p in _parents(n):
            style = " [style=dashed]" if not p.requires_grad else ""
            out.append(f"  {key[id(p)]} -> {key[id(n)]}{style};")
    out.append("}")
    return "\n".join(out) + "\n"
