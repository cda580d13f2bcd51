"""The click group, the options several commands share, and the boundary where errors become one line."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator

import click
from click.core import ParameterSource

from ..errors import MinitorchPeftError


class UserError(MinitorchPeftError):
    """A problem with the user's input at the command line, reported as one line."""


@contextlib.contextmanager
def user_paths() -> Iterator[None]:
    """Around reading or writing the paths the user gave: an OS error there (a missing folder, no permission)
    is the user's to fix and becomes one line. OS errors anywhere else stay bugs with tracebacks."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise
        where = f"{e.filename!r}" if e.filename2 is None else f"{e.filename!r} -> {e.filename2!r}"
        raise UserError(f"{where}: {e.strerror or e}") from None


def write_json(path: str | None, obj: dict[str, Any], flag: str = "--json") -> None:
    """Write ``obj`` to the ``--json`` file ``path`` (if given); a failure names that path, not the temporary file."""
    if path:
        from ..serialize import save_json

        try:
            save_json(path, obj)
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot write it ({e.strerror or e})") from None


def destination(flag: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback checking a file destination (``outputs.check_output_file``) as the flags are read:
    before any work, so a place that cannot be written fails in one line instead of after a long run."""
    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value and not ctx.resilient_parsing:
            from ..outputs import check_output_file

            check_output_file(value, flag)
        return value

    return check


def split(value: str | None) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']; empty items are dropped."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def floats(value: str, flag: str) -> list[float]:
    try:
        numbers = [float(v) for v in split(value)]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {value!r}") from None
    if not all(math.isfinite(v) for v in numbers):
        raise UserError(f"{flag} must be finite numbers, got {value!r}")
    return numbers


def output_folder(path: str, flag: str = "--output", kind: str = "model") -> None:
    """The output policy (``minitorch_peft.outputs``), applied at a command's start, before any work."""
    from ..outputs import check_output

    check_output(path, flag, kind)  # type: ignore[arg-type]


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr (a flag that has no effect, say); the run goes on."""
    click.echo(f"warning: {message}", err=True)


def given(ctx: click.Context, name: str) -> bool:
    """Whether option ``name`` was typed on the command line (or set by its environment variable)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def hidden_alias(old: str, canonical: str, **option: Any) -> Any:
    """An old spelling of an option, kept working (so no script breaks) but hidden from ``--help``.

    The value lands in ``ctx.meta["aliases"][canonical]``; ``apply_aliases`` moves it to the canonical
    parameter. Giving both spellings is an error.
    """
    def remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is not None:
            ctx.meta.setdefault("aliases", {})[canonical] = (old, value)
        return value

    return click.option(old, f"alias_{canonical}", hidden=True, default=None, expose_value=False, callback=remember,
                        help=f"Old spelling of --{canonical.replace('_', '-')}.", **option)


def apply_aliases(ctx: click.Context, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the values given through hidden aliases moved to their canonical names."""
    for canonical, (old, value) in ctx.meta.get("aliases", {}).items():
        flag = "--" + canonical.replace("_", "-")
        if given(ctx, canonical):
            raise UserError(f"{old} is the old spelling of {flag}: give one of them")
        params[canonical] = value
    return params


BACKEND = click.option("--backend", default="numpy", show_default=True, type=click.Choice(["numpy", "cupy"]),
                       help="Array backend: numpy (CPU) or cupy (CUDA GPU).")
DATASET = click.option("--dataset", default="mnist", show_default=True, type=click.Choice(["mnist", "fashion-mnist"]),
                       help="Dataset to train or score on.")
DATA_DIR = click.option("--data-dir", type=click.Path(file_okay=False), default=None,
                        help="Folder holding mnist/ and fashion-mnist/ (else $MINITORCH_PEFT_DATA, else the cache).")
JSON = click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, callback=destination("--json"),
                    help="Write metrics as JSON here.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """LoRA / DoRA / QLoRA fine-tuning on a hand-written autograd engine."""
