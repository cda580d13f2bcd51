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
# MNIST's training set: no real batch is larger, and the step's arrays stay small (x alone: 60,000 x 784 float32, 188 MB)
MAX_BATCH = 60_000
BATCH = click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1, max=MAX_BATCH),
                     help="Samples in the batch.")


# how every DOT file this command writes begins (graph.to_dot): a .dot beside the picture may be replaced only then
DOT_START = "digraph step {\n  rankdir=BT;"


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
    from ..outputs import check_output_file
    from ..trace import build_step

    path = Path(output) if output else None
    fmt = path.suffix.lower().lstrip(".") if path else ""
    if path is not None and fmt not in ("dot", "gv", "svg", "png", "pdf"):
        raise UserError(f"--output {output!r}: use a .dot, .svg, .png or .pdf file name")
    dot_path = None
    if path is not None:  # both files this command writes are checked before any work
        check_output_file(path, "--output")
        dot_path = path if fmt in ("dot", "gv") else path.with_suffix(".dot")
        if dot_path != path:
            _check_dot_beside(dot_path, output)
    model, _, x, labels = build_step(method, batch_size)
    loss = cross_entropy(model(x), labels)
    names = {n: p for n, p in model.named_parameters()}
    names.update(x=x, labels=labels)
    if dot_path is None:  # no --output: the graph as text
        click.echo(format_graph(loss, names))
        return
    source = to_dot(loss, names, title=f"one training step, --method {method} (green: trainable, grey dashed: frozen)")
    _save(dot_path, source.encode("utf-8"), output)
    if fmt in ("dot", "gv"):
        click.echo(f"Graph written to {dot_path} (render it: dot -Tsvg {dot_path} -o {dot_path.with_suffix('.svg')})")
        return
    try:
        data = render(source, fmt)
    except DotFailed as e:
        raise UserError(f"--output {output}: Graphviz's `dot` failed ({e}), so it was not drawn; "
                        f"the DOT source is in {dot_path}") from None
    if data is None:  # the picture asked for cannot be made: say so with a failing status, not as a success
        raise UserError(f"--output {output}: Graphviz's `dot` program was not found, so it was not drawn; the DOT source "
                        f"is in {dot_path}: render it with: dot -T{fmt} {dot_path} -o {path}")
    _save(path, data, output)
    click.echo(f"Graph written to {path} (DOT source: {dot_path})")


def _check_dot_beside(dot_path: Path, output: str) -> None:
    """Refuse to replace ``dot_path`` (the DOT source written beside ``--output``, a name the user did not give)
    unless it is missing or a DOT file this command wrote: the output policy of ``minitorch_peft.outputs``."""
    if not dot_path.exists():
        return
    try:
        with open(dot_path, "rb") as f:
            ours = f.read(len(DOT_START)) == DOT_START.encode()
    except OSError:  # a folder, or unreadable: not known to be ours
        ours = False
    if not ours:
        raise UserError(f"--output {output}: its DOT source goes to {dot_path}, which exists and was not written by "
                        "this command; refusing to replace it: move it, or name another --output")


def _save(path: Path, data: bytes, output: str) -> None:
    """Write one of the files of ``--output`` atomically; a failure names it, not the temporary file."""
    from ..serialize import save_bytes

    try:
        save_bytes(path, data)
    except OSError as e:
        raise UserError(f"--output {output}: cannot write {path} ({e.strerror or e})") from None


class DotFailed(Exception):
    """Graphviz's ``dot`` ran and failed; the message is its reason (``graph`` turns it into one line)."""


def render(source: str, fmt: str) -> bytes | None:
    """DOT ``source`` drawn as ``fmt`` by the graphviz package, else by the ``dot`` program; None if neither is
    installed. A ``dot`` that cannot run or fails raises DotFailed with its first line of stderr."""
    try:
        import graphviz  # the optional extra: pip install 'minitorch_peft[graph]'
    except ImportError:
        graphviz = None
    try:
        if graphviz is not None:
            try:
                return graphviz.Source(source).pipe(format=fmt)
            except graphviz.ExecutableNotFound:
                return None
        exe = shutil.which("dot")
        if exe is None:
            return None
        return subprocess.run([exe, f"-T{fmt}"], input=source.encode(), capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as e:  # graphviz's own CalledProcessError derives from it
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else str(e.stderr or "")
        first = next((line.strip() for line in stderr.splitlines() if line.strip()), "")
        raise DotFailed(f"exit status {e.returncode}" + (f": {first}" if first else "")) from None
    except OSError as e:  # found but not runnable
        raise DotFailed(f"it could not be run: {e.strerror or e}") from None


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
