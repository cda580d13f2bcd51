"""Write pure-Python wheels of distributions installed in this interpreter (for scripts/gpu_check.sh --prepare).

    python scripts/wheels_from_installed.py DEST NAME [NAME ...]

Each NAME's installed files (its RECORD, less compiled caches and the scripts pip generates) are zipped
into ``DEST/<name>-<version>-py3-none-any.whl`` with a fresh RECORD, so the GPU machine gets exactly
the versions the test suite passed with here, without a network. Only pure-Python distributions
(``Root-Is-Purelib: true``, no compiled module) are accepted: a wheel built for this machine's Python
might not import on another. Prints one line per wheel; exit status 1 with one line naming the first
distribution that is missing or not pure.
"""

from __future__ import annotations

import base64
import hashlib
import re
import sys
import zipfile
from importlib import metadata
from pathlib import Path

SKIP_IN_DIST_INFO = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}
COMPILED = (".so", ".pyd", ".dylib", ".dll")


class NotCarryable(Exception):
    pass


def _digest(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build(name: str, dest: Path) -> Path:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        raise NotCarryable(f"{name} is not installed in {sys.executable} (pip install -e '.[test]')") from None
    wheel_meta = dist.read_text("WHEEL") or ""
    if "Root-Is-Purelib: true" not in wheel_meta:
        raise NotCarryable(f"{name} {dist.version} is not a pure-Python distribution (its WHEEL says: "
                           f"{' '.join(wheel_meta.split())[:120]})")
    project = re.sub(r"[-_.]+", "_", dist.metadata["Name"]).lower()  # the wheel spec's normalized name
    info_dir = f"{project}-{dist.version}.dist-info"
    base = Path(dist.locate_file(""))
    entries: list[tuple[str, bytes]] = []
    for f in dist.files or ():
        rel = f.as_posix()
        if rel.startswith("..") or "__pycache__" in f.parts or rel.endswith(".pyc"):
            continue  # console scripts (pip writes them again) and bytecode
        if rel.endswith(COMPILED):
            raise NotCarryable(f"{name} {dist.version} holds a compiled module ({rel})")
        parts = f.parts
        if parts[0].endswith(".dist-info"):
            if parts[-1] in SKIP_IN_DIST_INFO:
                continue
            rel = "/".join((info_dir, *parts[1:]))
        entries.append((rel, (base / f).read_bytes()))
    if not any(rel == f"{info_dir}/METADATA" for rel, _ in entries):
        raise NotCarryable(f"{name} {dist.version}: no METADATA among its installed files")
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{project}-{dist.version}-py3-none-any.whl"
    record = [f"{rel},{_digest(data)},{len(data)}" for rel, data in entries] + [f"{info_dir}/RECORD,,"]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, data in entries:
            zf.writestr(zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0)), data, zipfile.ZIP_DEFLATED)
        zf.writestr(zipfile.ZipInfo(f"{info_dir}/RECORD", date_time=(1980, 1, 1, 0, 0, 0)),
                    "\n".join(record) + "\n", zipfile.ZIP_DEFLATED)
    return path


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    dest = Path(argv[0])
    for name in argv[1:]:
        try:
            path = build(name, dest)
        except NotCarryable as e:
            print(f"FAIL prepare: cannot carry {e}")
            return 1
        print(f"wheel {path.name} ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
