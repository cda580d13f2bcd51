"""The project's own error types: the ones the command line turns into one line instead of a traceback.

Every error raised on purpose because of the user's input (a flag, a file, a config, a missing GPU)
derives from ``MinitorchPeftError``; anything else that escapes is a bug and keeps its traceback.
The subclasses also derive from the built-in type a Python caller would expect (``ValueError``...).
"""

from __future__ import annotations


class MinitorchPeftError(Exception):
    """Base of every error raised on purpose for bad input; the CLI prints it as ``error: <message>``."""


class ConfigError(MinitorchPeftError, ValueError):
    """A setting (a flag, a config field) that cannot be used, named in the message."""


class MinitorchPeftWarning(UserWarning):
    """Base of the project's warnings (a setting that works but deserves a note); the CLI prints each as one
    ``warning: <message>`` line on stderr."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C after the command had saved something (``train --save-every-epoch``): ``saved`` says what and where,
    so the CLI's "interrupted" line can say it instead of "nothing was saved"."""

    def __init__(self, saved: str) -> None:
        super().__init__(saved)
        self.saved = saved
