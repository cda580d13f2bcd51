"""``graph``, ``trace`` and ``gradcheck``: the engine seen from the inside, for learning and for checking."""

from __future__ import annotations

import math
import shutil
import subprocess
from pathlib import Path

import click

from .app import UserError, cli, user_paths

TEACH_METHODS = ["lora", "dora", "qlora", "qdora", "lora-plus", "head", "full"]
METHOD = click.option("--method", default="lora", show_default=True, type=click.Choice(TEACH_METHODS),
                      help="How the default MLP is prepared, as in `train --method`.")
BATCH = click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Samples in the batch.")


@cli.command()
@METHOD
@BATCH
@click.option("--output", type=click.Path(dir_okay=False), default=None,
              help="Write the graph here: .dot (always possible), .svg or .png (need Graphviz's `dot`). "
                   "Without it, print the graph as a text tree.")
def graph(method: str, batch_size: int, output: str | None) -> None:
    """Draw the graph of one training step (frozen and trainable tensors told apart)."""
    from ..functional import cross_entropy
    from ..graph import format_graph, to_dot
    from ..trace import build_step

    path = Path(output) if output else None
    fmt = path.suffix.lower().lstrip(".") if path else ""
    if path is not None and fmt not in ("dot", "gv", "svg", "png", "pdf"):
        raise UserError(f"--output {output!r}: use a .dot, .svg, .png or .pdf file name")
    model, _, x, labels = build_step(method, batch_size)
    loss = cross_entropy(model(x), labels)
    names = {n: p for n, p in model.named_parameters()}
    names.update(x=x, labels=labels)
    if path is None:
        click.echo(format_graph(loss, names))
        return
    source = to_dot(loss, names, title=f"one training step, --method {method} (green: trainable, grey dashed: frozen)")
    dot_path = path if fmt in ("dot", "gv") else path.with_suffix(".dot")
    with user_paths():
        dot_path.write_text(source, encoding="utf-8")
    if fmt in ("dot", "gv"):
        click.echo(f"Graph written to {dot_path} (render it: dot -Tsvg {dot_path} -o {dot_path.with_suffix('.svg')})")
        return
    rendered = render(source, path, fmt)
    if rendered:
        click.echo(f"Graph written to {path} (DOT source: {dot_path})")
    else:
        click.echo(f"Graphviz's `dot` program was not found, so only the DOT source was written: {dot_path}; "
                   f"render it with: dot -T{fmt} {dot_path} -o {path}")


def render(source: str, path: Path, fmt: str) -> bool:
    """Render DOT ``source`` to ``path`` with the graphviz package, else the ``dot`` program; False if neither works."""
    try:
        import graphviz  # the optional extra: pip install 'minitorch_peft[graph]'
    except ImportError:
        graphviz = None
    if graphviz is not None:
        try:
            data = graphviz.Source(source).pipe(format=fmt)
        except (graphviz.ExecutableNotFound, OSError):
            return False
    else:
        exe = shutil.which("dot")
        if exe is None:
            return False
        data = subprocess.run([exe, f"-T{fmt}"], input=source.encode(), capture_output=True, check=True).stdout
    with user_paths():
        path.write_bytes(data)
    return True


@cli.command()
@METHOD
@BATCH
@click.option("--update-doc", is_flag=True, default=False,
              help="Regenerate the traces embedded in docs/02-one-training-step.md (lora and full) instead.")
def trace(method: str, batch_size: int, update_doc: bool) -> None:
    """Trace one training step: forward ops with shapes and saved bytes, then the backward as it runs."""
    from .. import trace as tr

    if update_doc:
        try:
            with user_paths():
                current = tr.update_doc(tr.DOC_PATH)
        except ValueError as e:  # the page lost its markers: say which, do not guess where to write
            raise UserError(str(e)) from None
        click.echo(f"{tr.DOC_PATH}: {'already current' if current else 'traces regenerated'}")
        return
    click.echo(tr.method_trace(method, batch_size).text(), nl=False)


@cli.command()
@click.option("--atol", default=1e-5, show_default=True, type=float, help="Absolute tolerance.")
@click.option("--rtol", default=1e-3, show_default=True, type=float, help="Relative tolerance.")
def gradcheck(atol: float, rtol: float) -> None:
    """Check every op and the Linear, LoRA, DoRA and 4-bit layers against float64 central differences."""
    from ..testing import gradcheck_report, standard_checks

    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        # inf passes every check and nan or a negative one fails every check: neither says anything about the ops
        if not (math.isfinite(value) and value >= 0):
            raise UserError(f"{flag} must be a finite number >= 0, got {value:g}")
    click.echo(f"float64 central differences; an element passes when |analytic - numeric| <= {atol:g} + {rtol:g} |numeric|;")
    click.echo("rel err = |analytic - numeric| / max(|numeric|, atol), the worst over every checked element")
    failed = []
    checks = standard_checks()
    width = max(len(c.name) for c in checks)
    for c in checks:
        report = gradcheck_report(c.fn, c.inputs, eps=c.eps, atol=atol, rtol=rtol)
        status = "ok" if report.passed else "FAIL"
        click.echo(f"{c.name:<{width}}  rel err {report.max_rel_error:8.1e}  abs err {report.max_abs_error:8.1e}  "
                   f"({report.checked} elements, eps {c.eps:g})  {status}")
        if not report.passed:
            failed.append(c.name)
            click.echo(f"    {report.message()}")
    if failed:
        raise UserError(f"gradcheck failed for {len(failed)} of {len(checks)}: {', '.join(failed)}")
    click.echo(f"all {len(checks)} checks passed (threshold: rel err <= rtol {rtol:g} suffices)")
