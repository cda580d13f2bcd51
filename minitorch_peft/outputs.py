"""The output policy: where a command may write, decided once, before any work.

A command writes only into a new folder, an empty one, or a folder that holds what this project wrote
there before (a model folder recognised by its ``config.json``; for ``export-peft`` a PEFT adapter folder
recognised by what ``save_peft`` writes). Any other existing folder is refused with one line: the save
replaces the folder whole, so its files would be lost; so is a write-protected one of ours. The place is
also probed for writability, so a read-only or misspelt path fails before a training run, not after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Literal

from .errors import ConfigError

Kind = Literal["model", "peft"]
MARKER = "minitorch_peft"  # safetensors metadata key set by save_peft


class OutputError(ConfigError):
    """An output path that cannot or must not be written; the message names the flag and the reason."""


def _is_our_model(folder: Path) -> str | None:
    """None if ``folder`` holds a model saved by this project (and nothing else), else why not."""
    from .serialize import CheckpointError, load_json

    cfg = folder / "config.json"
    if not cfg.is_file():
        return "it holds no config.json"
    try:
        config = load_json(cfg)
    except CheckpointError:
        return "its config.json is not readable JSON"
    if not isinstance(config, dict) or config.get("format") != MARKER:
        return "its config.json is not a minitorch_peft model config"
    others = sorted(p.name for p in folder.iterdir() if p.name != "config.json" and not (p.suffix == ".npz" and p.is_file()))
    if others:
        return f"besides the model it holds {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}"
    return None


def _safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its header only (8-byte length + JSON)."""
    with contextlib.suppress(OSError, ValueError, struct.error):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 1 << 20:
                meta = json.loads(f.read(n)).get("__metadata__")
                return meta if isinstance(meta, dict) else {}
    return {}


def _is_our_peft_export(folder: Path) -> str | None:
    """None if ``folder`` holds an adapter exported by ``export-peft`` (and nothing else), else why not."""
    from .peft.adapter_io import CONFIG_FILE, PEFT_WEIGHTS_FILE

    names = {p.name for p in folder.iterdir()}
    if not names <= {CONFIG_FILE, PEFT_WEIGHTS_FILE}:
        extra = sorted(names - {CONFIG_FILE, PEFT_WEIGHTS_FILE})
        return f"it holds {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}, not only a PEFT adapter"
    if _safetensors_metadata(folder / PEFT_WEIGHTS_FILE).get(MARKER) is None:
        return "its adapter was not exported by minitorch_peft"
    return None


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def _probe_writable(parent: Path, where: str) -> None:
    """OutputError (naming ``where``) unless a file can be created in ``parent``: tried, not guessed from modes."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{where}: cannot write in {parent} ({e.strerror or e})") from None


def check_output(path: str | os.PathLike[str], flag: str = "--output", kind: Kind = "model") -> Path:
    """Refuse ``path`` unless it is new, empty, or holds a model (``kind="peft"``: an adapter export) of ours.

    Also refuses a path under a file and a place where nothing can be written, each in one line naming
    ``flag``. Returns the path. Called by every command that writes a folder, before it does any work.
    """
    path = Path(path)
    where = f"{flag} {path}"
    if os.path.lexists(path):
        if not path.is_dir():
            raise OutputError(f"{where}: exists and is not a folder")
        if any(path.iterdir()):
            why = _is_our_model(path) if kind == "model" else _is_our_peft_export(path)
            if why is not None:
                what = "a minitorch_peft model" if kind == "model" else "a PEFT adapter exported by minitorch_peft"
                raise OutputError(f"{where}: an existing folder that is not {what} ({why}); "
                                  "refusing to replace it: name a new or empty folder")
            # the swap goes through the parent, so a write-protected folder would be replaced all the same:
            # no write bit (or none for us) is taken as its owner's wish to keep it
            if not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222:
                raise OutputError(f"{where}: the folder is write-protected; refusing to replace it: "
                                  "make it writable or name another folder")
        parent = path.resolve().parent  # the new version is written beside the old one
    else:
        parent = _nearest_existing(path.absolute())
        if not parent.is_dir():
            raise OutputError(f"{where}: {parent} is a file, not a folder")
    _probe_writable(parent, where)
    return path


def check_output_file(path: str | os.PathLike[str], flag: str) -> Path:
    """Refuse a file destination (``--json``, ``--plot``) that cannot be written, in one line naming ``flag`` and
    the path as given; returns the path. Called before any work, so a misspelt or read-only place costs nothing.

    An existing file is replaced (it is the user's to name); missing folders on the way are created by the save,
    as they are for ``--output``, so the place probed is the nearest folder that exists.
    """
    path = Path(path)
    where = f"{flag} {path}"
    if path.is_dir():
        raise OutputError(f"{where}: is a folder, not a file")
    parent = _nearest_existing(path.absolute().parent)
    if not parent.is_dir():
        raise OutputError(f"{where}: {parent} is a file, not a folder")
    _probe_writable(parent, where)
    return path
