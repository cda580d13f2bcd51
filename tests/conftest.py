"""Shared fixtures and helpers.

``backend`` runs a test once per array backend ("numpy", and "cupy" where it can run). The cupy case is
skipped, with the reason in the test report, when CuPy is not installed or no CUDA GPU is usable, so the
suite passes unchanged on a CPU-only machine and covers the GPU path on a GPU one.

The command-line helpers (``run_cli`` in a subprocess, ``cli_main`` in this process, ``assert_one_line_error``)
and the data location (``DATA``, ``needs_mnist``) live here once for every test file.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from minitorch_peft.backend import Backend, get_backend


@functools.lru_cache(maxsize=None)
def cupy_skip_reason() -> str | None:
    """Why the cupy backend cannot run here ("CuPy not installed" / "no CUDA GPU ..."), None if it can."""
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        return f"CuPy not installed ({e.__class__.__name__})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"no CUDA GPU ({e.__class__.__name__}: {e})"
    return None if count > 0 else "no CUDA GPU (device count 0)"


def backend_param(name: str) -> object:
    """A pytest param for backend ``name``, skipped with a clear reason when it cannot run here."""
    if name == "cupy":
        reason = cupy_skip_reason()
        if reason is not None:
            return pytest.param(name, marks=pytest.mark.skip(reason=f"cupy backend: {reason}"), id=name)
    return pytest.param(name, id=name)


@pytest.fixture(params=[backend_param("numpy"), backend_param("cupy")])
def backend(request: pytest.FixtureRequest) -> Backend:
    """The Backend object of each available array backend in turn (``backend.name``, ``.xp``, ``.kernels``)."""
    return get_backend(request.param)


# ------------------------------------------------------------------------------ the command line

ROOT = Path(__file__).resolve().parents[1]


def find_data() -> tuple[Path, str | None]:
    """The folder the data tests read, and why they must skip (None when MNIST and Fashion-MNIST are there).

    ``$MINITORCH_PEFT_DATA`` when set (CI points it at its shared folder), else the user cache, where the
    files are downloaded once (verified by SHA-256) when there is a network. Without data and without a
    network the data tests are skipped with this reason, which ``-rs`` (pyproject's addopts) prints in the
    summary: never silently.
    """
    env = os.environ.get("MINITORCH_PEFT_DATA", "")
    if env:
        root = Path(env) if Path(env).is_absolute() else (ROOT / env).resolve()
        missing = [n for n in ("mnist", "fashion-mnist") if not (root / n).is_dir()]
        return root, (f"no {' or '.join(missing)} folder in {root} (from $MINITORCH_PEFT_DATA)" if missing else None)
    from minitorch_peft.data import DataError, cache_dir, find_split_files

    try:
        for name in ("mnist", "fashion-mnist"):
            for split in ("train", "test"):
                find_split_files(name, split, timeout=20)  # on disk already: no network used
    except DataError as e:
        first = str(e).split(";")[0]
        return cache_dir(), (f"MNIST / Fashion-MNIST are not in the cache {cache_dir()} and could not be downloaded "
                             f"({first}); connect to the internet once, or set MINITORCH_PEFT_DATA to a folder holding "
                             "mnist/ and fashion-mnist/")
    return cache_dir(), None


DATA, DATA_MISSING = find_data()
needs_mnist = pytest.mark.skipif(DATA_MISSING is not None, reason=DATA_MISSING or "")


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python cli.py ARGS`` in a fresh process (from the repository root, reading the data from ``DATA``)."""
    full_env = {**os.environ, "MINITORCH_PEFT_DATA": str(DATA), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)


def cli_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI's ``main`` in this process (fast: no interpreter start); returns (exit code, stdout, stderr)."""
    from minitorch_peft.cli import main

    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(result: subprocess.CompletedProcess[str] | tuple[int, str, str], *needles: str) -> str:
    """A non-zero exit with exactly one ``error: ...`` line on stderr, holding every needle; returns that line."""
    code, out, err = (result.returncode, result.stdout, result.stderr) if isinstance(result, subprocess.CompletedProcess) else result
    assert code != 0, out
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def small_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real MNIST, but a 500-image test split: scoring all 10,000 in every CLI test would dominate the suite."""
    import minitorch_peft.data as data
    import minitorch_peft.train as train

    real = data.load_mnist_like

    def load(name: str, split: str, data_dir: str | None = None, limit: int | None = None):
        return real(name, split, data_dir, limit=500 if split == "test" else limit)

    monkeypatch.setenv("MINITORCH_PEFT_DATA", str(DATA))
    monkeypatch.setattr(data, "load_mnist_like", load)
    monkeypatch.setattr(train, "load_mnist_like", load)


# ------------------------------------------------------------------ running without hypothesis
# scripts/gpu_check.sh runs the GPU tests on a machine whose Python may have no hypothesis build (its wheels
# are compiled for one Python version). Only there, with MINITORCH_PEFT_TESTS_WITHOUT_HYPOTHESIS=1 and
# hypothesis failing to import, the test files that import it are not collected, and the report says which
# and why. Anywhere else a missing hypothesis stays a collection error.
_HYPOTHESIS_IMPORT = re.compile(r"^\s*(from\s+hypothesis[\s.]|import\s+hypothesis\b)", re.MULTILINE)


@functools.lru_cache(maxsize=None)
def hypothesis_missing_reason() -> str | None:
    """Why the hypothesis-based test files are left out here, or None when they are collected as usual."""
    if os.environ.get("MINITORCH_PEFT_TESTS_WITHOUT_HYPOTHESIS") != "1":
        return None
    try:
        import hypothesis  # noqa: F401
    except Exception as e:  # ImportError, or a compiled module built for another Python
        return f"hypothesis cannot be imported here ({e.__class__.__name__}: {e})"
    return None


_left_out: list[str] = []


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    reason = hypothesis_missing_reason()
    if reason and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        if _HYPOTHESIS_IMPORT.search(collection_path.read_text(encoding="utf-8")):
            _left_out.append(collection_path.name)
            return True
    return None


def pytest_report_header(config: pytest.Config) -> str | None:
    reason = hypothesis_missing_reason()
    return f"{reason}: test files importing it are not collected" if reason else None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _left_out:
        terminalreporter.write_line(
            f"NOT COLLECTED {', '.join(sorted(set(_left_out)))}: {hypothesis_missing_reason()}"
        )


@pytest.fixture
def no_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither the graphviz package nor Graphviz's `dot` program (the `graph` command's two ways to draw)."""
    import builtins
    import shutil

    real_import = builtins.__import__

    def no_graphviz(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "graphviz":
            raise ImportError("no graphviz here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_graphviz)
    monkeypatch.setattr(shutil, "which", lambda name: None)
