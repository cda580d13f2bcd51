"""minitorch_peft's command line: ``train``, ``infer``, ``bench`` and the adapter tools, one module each.

Installed, it is the ``minitorch-peft`` command; from a checkout, ``python cli.py``. Every expected failure
(bad flag, missing data, damaged checkpoint, missing GPU: an error type of ``minitorch_peft.errors``) ends
in one line on stderr and exit status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import sys
import warnings

import click

from ..errors import Interrupted, MinitorchPeftError, MinitorchPeftWarning
from . import adapters, bench, infer, teach, train  # noqa: F401  (each registers its commands on the group)
from .app import UserError, cli

__all__ = ["UserError", "cli", "main", "run"]


def main(argv: list[str] | None = None, prog_name: str = "cli.py") -> int:
    """Run the CLI; expected failures become one line on stderr and exit status 2 (130 on Ctrl-C).

    The project's own warnings (``MinitorchPeftWarning``: a setting that works but deserves a note) become
    one ``warning: ...`` line on stderr; any other warning keeps Python's format (file and line).
    """
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
            if issubclass(category, MinitorchPeftWarning):
                click.echo(f"warning: {message}", err=True)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        warnings.simplefilter("always", MinitorchPeftWarning)  # every run says it, even twice in one process
        return _main(argv, prog_name)


def _main(argv: list[str] | None, prog_name: str) -> int:
    try:
        code = cli.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt) as e:
        # with standalone_mode=False click turns Ctrl-C into Abort (from the KeyboardInterrupt);
        # every save is atomic, so an interrupted command has written nothing over an earlier checkpoint,
        # unless it says what it saved before the interruption (Interrupted: train --save-every-epoch)
        cause = e if isinstance(e, KeyboardInterrupt) else e.__cause__
        if isinstance(cause, Interrupted):
            click.echo(f"interrupted: {cause.saved}", err=True)
        elif isinstance(cause, KeyboardInterrupt):
            click.echo("interrupted: nothing was saved; any earlier checkpoint is unchanged", err=True)
        else:
            click.echo("interrupted", err=True)
        return 130
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code or 2
    except MinitorchPeftError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    return code if isinstance(code, int) else 0  # a command may return its exit status (bench --check)


def run() -> None:
    """The ``minitorch-peft`` console script."""
    sys.exit(main(prog_name="minitorch-peft"))
