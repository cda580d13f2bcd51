"""The kernel contract (kernels/__init__.py: Kernels) is what every backend's kernel module provides, and
all it provides: the CPU module and the strict array-API test kernels by import, the GPU module from its
source (no CuPy needed). And the seam holds: outside backend.py and kernels/, nothing knows which backend
runs (no backend-name tests, no CuPy import, no kernels.quant import)."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path
from types import ModuleType

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ROOT  # noqa: E402

import minitorch_peft.kernels.cpu as cpu  # noqa: E402
from minitorch_peft.kernels import contract  # noqa: E402

CONTRACT = contract()
FUNCTIONS = {k: v for k, v in CONTRACT.items() if v is not None}
ATTRIBUTES = {k for k, v in CONTRACT.items() if v is None}


def _public_functions_of_module(module: ModuleType) -> dict[str, list[str]]:
    """Public functions defined in ``module``, and those of the contract it imports from a sibling module."""
    return {name: list(inspect.signature(fn).parameters) for name, fn in vars(module).items()
            if inspect.isfunction(fn) and not name.startswith("_")
            and (fn.__module__ == module.__name__ or name in FUNCTIONS)}


def _public_functions_of_source(path: Path) -> tuple[dict[str, list[str]], set[str]]:
    """Like _public_functions_of_module, read from the source (contract functions imported from a sibling
    module, ``from .x import f``, are read from that module's source)."""
    tree = ast.parse(path.read_text())
    fns, names = {}, set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for a in node.names:
                if a.name in FUNCTIONS:
                    fns[a.asname or a.name] = _public_functions_of_source(path.parent / f"{node.module}.py")[0][a.name]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            a = node.args
            fns[node.name] = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    names.add(t.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return fns, names


def _check(where: str, fns: dict[str, list[str]], names: set[str]) -> None:
    missing = sorted(set(FUNCTIONS) - set(fns))
    assert not missing, f"{where} lacks kernels of the contract: {missing}"
    extra = sorted(set(fns) - set(FUNCTIONS))
    assert not extra, f"{where} has public functions outside the contract (add them to Kernels, or make them private): {extra}"
    for name, args in FUNCTIONS.items():
        assert fns[name] == args, f"{where}: {name}{tuple(fns[name])} differs from the contract's {name}{tuple(args)}"
    assert ATTRIBUTES <= names, f"{where} lacks {sorted(ATTRIBUTES - names)}"


def test_contract_lists_the_kernels() -> None:
    assert {"linear_forward", "linear_backward", "row_sumsq", "rowdot", "dequantize_4bit"} <= set(FUNCTIONS)
    assert ATTRIBUTES == {"xp", "DEVICE", "PEAK_METHOD", "ALLREDUCE_TRANSPORTS"}
    # the fused adapter ops own their math: no LoRA / DoRA kernels in the contract
    assert not [n for n in CONTRACT if "lora" in n or "dora" in n]


def test_cpu_kernels_keep_the_contract() -> None:
    _check("kernels/cpu.py", _public_functions_of_module(cpu), set(vars(cpu)))
    assert cpu.DEVICE == "cpu"


def test_gpu_kernels_keep_the_contract() -> None:
    fns, names = _public_functions_of_source(ROOT / "kernels" / "gpu.py")
    _check("kernels/gpu.py", fns, names)


def test_strict_test_kernels_keep_the_contract() -> None:
    pytest.importorskip("array_api_strict")
    import strict_kernels

    _check("tests/strict_kernels.py", _public_functions_of_module(strict_kernels), set(vars(strict_kernels)))


def test_the_contract_check_can_fail() -> None:
    fns = dict(_public_functions_of_module(cpu))
    fns["lora_forward"] = ["x", "w"]
    with pytest.raises(AssertionError, match="outside the contract"):
        _check("patched", fns, set(vars(cpu)))
    fns = dict(_public_functions_of_module(cpu))
    fns["rowdot"] = ["p", "q"]
    with pytest.raises(AssertionError, match="differs"):
        _check("patched", fns, set(vars(cpu)))


# ------------------------------------------------------------------------------------------ the seam


def _engine_files() -> list[Path]:
    return [p for p in (ROOT / "minitorch_peft").rglob("*.py") if p.name != "backend.py" and "kernels" not in p.parts]


def _offences(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in ("cupy", "cupyx")]
            found += [f"import {a.name}" for a in node.names if ".kernels.quant" in f".{a.name}"]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[0] in ("cupy", "cupyx") or mod.endswith(("kernels.quant", "kernels.quant_cuda")) \
                    or (mod.endswith("kernels") and any(a.name.startswith("quant") for a in node.names)):
                found.append(f"from {'.' * node.level}{mod} import ...")
        elif isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                if (isinstance(side, ast.Attribute) and side.attr == "name" and "backend" in ast.unparse(side.value)) \
                        or (isinstance(side, ast.Name) and side.id == "backend_name"):
                    found.append(f"compares {ast.unparse(side)}")
    return found


def test_nothing_outside_backend_and_kernels_knows_the_backend() -> None:
    bad = {str(p.relative_to(ROOT)): o for p in _engine_files() if (o := _offences(ast.parse(p.read_text())))}
    assert not bad, f"backend-specific code outside backend.py and kernels/: {bad}"


def test_the_seam_check_can_fail() -> None:
    for src in ["import cupy", "from ..kernels.quant import QuantState", "from ..kernels import quant",
                "x = 1 if backend.name == 'numpy' else 2", "y = t.backend.name != 'cupy'"]:
        assert _offences(ast.parse(src)), src


def test_dora_does_not_import_lora() -> None:
    """DoRA is an update object that LoRALinear picks: dora.py never imports the layer's module at run time."""
    tree = ast.parse((ROOT / "minitorch_peft" / "peft" / "dora.py").read_text())
    runtime = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not [ast.unparse(n) for n in runtime if isinstance(n, ast.ImportFrom) and (n.module or "").endswith("lora")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cpu_relu_kernels_match_numpy_bit_for_bit(dtype: str) -> None:
    """The one-pass Numba ReLU gives NumPy's values exactly: NaN passes, -0.0 and the mask's 0 * inf = NaN
    come out as NumPy's do; a strided view takes the NumPy path."""
    import numpy as np

    rng = np.random.default_rng(0)
    special = [np.nan, -0.0, 0.0, np.inf, -np.inf, -1e-300, 1e-300, -5.0]
    for shape in [(64, 512), (3,), (2, 3, 4), (0, 5)]:
        x = rng.standard_normal(shape).astype(dtype)
        g = rng.standard_normal(shape).astype(dtype)
        if x.size >= 8:
            x.reshape(-1)[:8] = special
            g.reshape(-1)[:8] = special[::-1]
        y = cpu.relu_forward(x)
        assert y.dtype == x.dtype and np.array_equal(y.view(np.uint8), np.maximum(x, 0).view(np.uint8))
        with np.errstate(invalid="ignore"):
            want = g * (y > 0)
        assert np.array_equal(cpu.relu_backward(g, y).view(np.uint8), want.view(np.uint8))
    strided = rng.standard_normal((7, 5)).astype(dtype).T
    assert np.array_equal(cpu.relu_forward(strided), np.maximum(strided, 0))
    assert np.array_equal(cpu.relu_backward(strided, strided), strided * (strided > 0))
