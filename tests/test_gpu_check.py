"""scripts/gpu_check.sh must work the first time on a bare GPU machine: checked here without a GPU.

The GPU machine has numpy, CuPy, numba (numba-cuda) and PyTorch, and nothing else; everything else the
check needs travels in ``.whl/`` (built by ``--prepare``). So the check's preparation runs here, then
its setup runs in a fresh virtual environment that sees only numpy, numba, llvmlite, pip and a CuPy
stand-in (a module that imports but finds no GPU): the setup must pass, which proves that every module
the check imports and every test module imports with what is on such a machine or carried, and the
run must stop at the smoke step with one line naming the missing GPU.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from conftest import DATA, DATA_MISSING, ROOT, needs_mnist

SCRIPT = ROOT / "scripts" / "gpu_check.sh"
DEVICE_HAS = {"numpy", "numba", "llvmlite", "pip"}  # besides CuPy (faked here) and PyTorch (bench only)
STANDIN_CUPY = '''"""A stand-in for CuPy on a machine without a GPU: it imports, and finds no CUDA device."""
__version__ = "0+standin"


class _Runtime:
    @staticmethod
    def getDeviceCount():
        raise RuntimeError("CuPy stand-in: no CUDA driver on this machine")


class cuda:  # mirrors cupy.cuda
    runtime = _Runtime
'''
IGNORED = {".git", ".venv", "tmp", ".whl", ".gpu-data", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist"}


def copy_tree(dest: Path) -> Path:
    """The working tree as the GPU machine gets it: the project's files, none of the ignored ones."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                                check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                  if p.is_file() and not IGNORED.intersection(p.relative_to(ROOT).parts)]
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def bare_python(where: Path, with_cupy: bool = True) -> Path:
    """A virtual environment without pip whose only packages are this interpreter's numpy, numba,
    llvmlite and pip (linked, not copied: fast) and, if asked, the CuPy stand-in."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(where / "venv")
    exposed = where / "exposed"
    exposed.mkdir()
    for name in sorted(DEVICE_HAS):
        mod = __import__(name)
        site = Path(mod.__file__).resolve().parents[1]
        for entry in site.iterdir():
            stem = entry.name.split("-")[0].split(".")[0].lower()
            if stem == name and not (exposed / entry.name).exists():
                (exposed / entry.name).symlink_to(entry)
    if with_cupy:
        (exposed / "cupy").mkdir()
        (exposed / "cupy" / "__init__.py").write_text(STANDIN_CUPY)
    python = where / "venv" / "bin" / "python"
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    (site_packages / "exposed.pth").write_text(f"{exposed}\n")
    return python


def run_script(tree: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PYTEST", "MINITORCH_PEFT", "NUMBA_"))}
    return subprocess.run(["bash", str(tree / "scripts" / "gpu_check.sh"), *args], cwd=tree, capture_output=True,
                          text=True, timeout=timeout, env={**clean, **(env or {})})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A copy of the working tree after ``gpu_check.sh --prepare`` ran with this interpreter's packages."""
    if DATA_MISSING is not None:
        pytest.skip(DATA_MISSING)
    tree = copy_tree(tmp_path_factory.mktemp("tree"))
    done = run_script(tree, "--prepare", env={"PYTHON": sys.executable, "MINITORCH_PEFT_DATA": str(DATA)})
    return tree, done


@needs_mnist
@pytest.mark.slow
def test_prepare_builds_pure_wheels_and_the_data_and_prints_what_to_carry(
    prepared: tuple[Path, subprocess.CompletedProcess[str]],
) -> None:
    tree, done = prepared
    assert done.returncode == 0, done.stdout + done.stderr
    assert 'carry: [".whl", ".gpu-data"]' in done.stdout and "MiB" in done.stdout
    assert "bash scripts/gpu_check.sh" in done.stdout
    wheels = sorted((tree / ".whl").glob("*.whl"))
    names = {w.name.split("-")[0] for w in wheels}
    assert {"pytest", "pluggy", "iniconfig", "packaging", "pygments", "click", "array_api_strict"} <= names, names
    for w in wheels:
        assert w.name.endswith("-py3-none-any.whl"), w.name  # any Python on the GPU machine can import it
        with zipfile.ZipFile(w) as zf:
            assert zf.testzip() is None
            assert not [n for n in zf.namelist() if n.endswith((".so", ".pyd"))], w.name
            assert any(n.endswith(".dist-info/RECORD") for n in zf.namelist())
    for f in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert (tree / ".gpu-data" / "mnist" / f).read_bytes() == (DATA / "mnist" / f).read_bytes()


@pytest.mark.slow
@needs_mnist
def test_setup_passes_on_a_bare_machine_and_the_run_stops_at_the_smoke_step(
    prepared: tuple[Path, subprocess.CompletedProcess[str]], tmp_path: Path,
) -> None:
    tree, done = prepared
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    run = run_script(tree, env={"PYTHON": str(bare_python(tmp_path)), "OUT": str(out)})
    log = run.stdout + run.stderr
    summary = (out / "summary.txt").read_text().splitlines()
    assert run.returncode == 1, log
    assert summary[0].startswith("PASS setup"), log
    assert "tests collected" in summary[0], summary[0]
    # the bare environment has no hypothesis: its test files are left out, and the line says so
    assert "hypothesis cannot import here" in summary[0] and "not collected" in summary[0], summary[0]
    assert summary[1].startswith("FAIL smoke") and "CUDA device (CuPy): RuntimeError: CuPy stand-in" in summary[1], log
    assert summary[2].startswith("INFO total") and len(summary) == 3, summary  # nothing ran after the smoke step
    assert sorted(p.name for p in out.iterdir()) == ["env.txt", "logs.tar.gz", "smoke.log", "summary.json", "summary.txt"]
    from importlib.metadata import version

    assert f"pytest {version('pytest')}\n" in (out / "env.txt").read_text()  # the carried pytest, the one tested here


@needs_mnist
@pytest.mark.slow
def test_setup_names_the_missing_wheels_and_how_to_carry_them(tmp_path: Path) -> None:
    """The first failure the issue saw (pytest not carried) now names the command that fixes it."""
    tree = copy_tree(tmp_path / "tree")
    shutil.copytree(DATA / "mnist", tree / ".gpu-data" / "mnist")
    run = run_script(tree, env={"PYTHON": str(bare_python(tmp_path)), "OUT": str(tmp_path / "out")})
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert run.returncode == 1 and summary[0].startswith("FAIL setup"), run.stdout + run.stderr
    assert "cannot import: pytest (ModuleNotFoundError" in summary[0] and "--prepare" in summary[0], summary[0]
    assert '[".whl", ".gpu-data"]' in summary[0]


@pytest.mark.slow
def test_setup_names_a_missing_gpu_module_first(tmp_path: Path) -> None:
    run = run_script(copy_tree(tmp_path / "tree"), env={"PYTHON": str(bare_python(tmp_path, with_cupy=False)),
                                                        "OUT": str(tmp_path / "out")})
    line = (tmp_path / "out" / "summary.txt").read_text().splitlines()[0]
    assert run.returncode == 1 and line.startswith("FAIL setup"), run.stdout + run.stderr
    assert line.endswith("missing on this machine (not carried; install cupy-cuda13x, numba, numba-cuda there): cupy"), line


def test_a_compiled_distribution_is_refused_for_the_carry(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "wheels_from_installed.py"), str(tmp_path), "numpy"],
                         capture_output=True, text=True)
    assert run.returncode == 1 and run.stdout.startswith("FAIL prepare: cannot carry numpy"), run.stdout + run.stderr
    assert "not a pure-Python distribution" in run.stdout and not list(tmp_path.iterdir())


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_scripts_import_only_the_standard_library_the_gpu_machine_and_the_project() -> None:
    """What the smoke step and the wheel builder import is on the bare GPU machine or is the project."""
    allowed = set(sys.stdlib_module_names) | DEVICE_HAS | {"cupy", "cupy_backends", "minitorch_peft"}
    for script in ("gpu_smoke.py", "wheels_from_installed.py"):
        extra = _imports(ROOT / "scripts" / script) - allowed
        assert not extra, f"scripts/{script} imports {extra}: neither on the GPU machine nor carried"


def test_the_header_states_the_commands_the_carry_and_the_budget() -> None:
    text = SCRIPT.read_text()
    header = text[: text.index("\nset -uo pipefail")]
    carry = next(line.split("=", 1)[1].strip("'") for line in text.splitlines() if line.startswith("CARRY="))
    assert carry == '[".whl", ".gpu-data"]'
    for needed in ("bash scripts/gpu_check.sh --prepare", "command:   bash scripts/gpu_check.sh\n",
                   f"carry:     {carry}", "timeout_s: 360", "bash scripts/gpu_check.sh --bench", "300 s"):
        assert needed in header, needed
    for phase in ("setup", "smoke", "tests", "train", "compare"):
        assert f"#   {phase} " in header, phase
