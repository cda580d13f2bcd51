"""``python cli.py ...``: the command line from a checkout (installed, the same is the ``minitorch-peft`` command).

The commands live in ``minitorch_peft/cli/``, one module each.
"""

import sys

from minitorch_peft.cli import cli, main

__all__ = ["cli", "main"]

if __name__ == "__main__":
    sys.exit(main())
