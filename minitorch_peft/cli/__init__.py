"""minitorch_peft's command line: ``train``, ``infer``, ``bench`` and the adapter tools, one module each.

Installed, it is the ``minitorch-peft`` command; from a checkout, ``python cli.py``. Every expected failure
(bad flag, missing data, damaged checkpoint, missing GPU: an error type of ``minitorch_peft.errors``) ends
in one line on stderr and exit status 2; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import sys

import click

from ..errors import MinitorchPeftError
from . import adapters, bench, infer, teach, train  # noqa: F401  (each registers its commands on the group)
from .app import UserError, cli

__all__ = ["UserError", "cli", "main", "run"]


def main(argv: list[str] | None = None, prog_name: str = "cli.py") -> int:
    """Run the CLI; expected failures become one line on stderr and exit status 2 (130 on Ctrl-C)."""
    try:
        cli.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was saved; any earlier checkpoint is unchanged", err=True)
        return 130
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        return e.exit_code or 2
    except MinitorchPeftError as e:
        click.echo(f"error: {e}", err=True)
        return 2
    return 0


def run() -> None:
    """The ``minitorch-peft`` console script."""
    sys.exit(main(prog_name="minitorch-peft"))
