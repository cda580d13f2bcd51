"""The one exception type the data package raises for missing, corrupt or unfetchable files."""

from __future__ import annotations

from ..errors import MinitorchPeftError


class DataError(MinitorchPeftError):
    """A dataset file is missing, corrupt or could not be fetched; the message is one line."""

    def __init__(self, message: str) -> None:
        # Collapse whitespace so wrapped OS/HTTP messages still print as a single line.
        super().__init__(" ".join(message.split()))
