"""GPU code paths checked without a GPU: what the cupy backend does before and around its kernels.

Each test here guards a cost or a deprecation that only shows on a GPU (a host wait per QLoRA forward,
a stream synchronization per numba-cuda launch, a deprecated CuPy call); scripts/gpu_check.sh checks
the same paths on a real GPU.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.machinery
import inspect
import os
import sys
import types
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

import minitorch_peft.backend as backend_module
from minitorch_peft.kernels import quant as Q
from minitorch_peft.kernels import quant_cuda as C

ROOT = Path(__file__).resolve().parents[1]
SYNC = "NUMBA_CUDA_ARRAY_INTERFACE_SYNC"


# --------------------------------------------------- dequantize_absmax keeps the offset on the device


class HostCopy(AssertionError):
    pass


class DeviceArray(np.ndarray):
    """A stand-in for a CuPy array: its type's module is "cupy", and every way to the host raises."""

    def get(self, *a: Any, **k: Any) -> Any:
        raise HostCopy("get()")

    def item(self, *a: Any) -> Any:
        raise HostCopy("item()")

    def tolist(self) -> Any:
        raise HostCopy("tolist()")

    def __float__(self) -> float:
        raise HostCopy("float()")

    def __int__(self) -> int:
        raise HostCopy("int()")

    def __bool__(self) -> bool:
        raise HostCopy("bool()")

    def __array__(self, *a: Any, **k: Any) -> Any:  # np.asarray / np.float32(...) on it
        raise HostCopy("__array__")


DeviceArray.__module__ = "cupy._core.core"


def fake_cupy() -> types.ModuleType:
    cp = types.ModuleType("cupy")
    for name in ("float32", "uint8", "uint32"):
        setattr(cp, name, getattr(np, name))

    def to_device(a: Any, dtype: Any = None) -> DeviceArray:
        return np.array(a, dtype=dtype).view(DeviceArray)

    def asnumpy(a: Any) -> Any:
        raise HostCopy("cupy.asnumpy")

    cp.asarray = to_device  # type: ignore[attr-defined]
    cp.empty = lambda shape, dtype=None: np.empty(shape, dtype=dtype).view(DeviceArray)  # type: ignore[attr-defined]
    cp.asnumpy = asnumpy  # type: ignore[attr-defined]
    cp.ndarray = DeviceArray  # type: ignore[attr-defined]
    return cp


def test_dequantize_absmax_keeps_the_offset_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The double-quant dequantize passes the offset to the kernel as a device array: no host copy, so
    no wait for the GPU on every QLoRA forward (the host-side offset was the old code path)."""
    ref = Q._double_quantize(Q.QuantState(shape=(64 * 300,), quant_type="nf4", block_size=64,
                                          absmax=np.linspace(0.5, 3, 300, dtype=np.float32)))
    dev = Q.QuantState(
        shape=ref.shape, quant_type="nf4", block_size=64,
        absmax_codes=ref.absmax_codes.view(DeviceArray), absmax_scale=ref.absmax_scale.view(DeviceArray),
        absmax_offset=ref.absmax_offset.view(DeviceArray),
    )
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy())
    monkeypatch.setattr(C, "_tables_cache", {})  # the fake device's tables must not outlive the test
    launches: list[tuple[Any, ...]] = []

    def kernel(*args: Any) -> None:
        raise AssertionError("launched outside _launch")

    monkeypatch.setattr(C, "_kernels", lambda: {"dq_absmax": kernel})
    monkeypatch.setattr(C, "_launch", lambda k, count, *args: launches.append((k, count, *args)))

    out = C.dequantize_absmax(dev)  # raises HostCopy if anything brings an array to the host

    assert isinstance(out, DeviceArray) and out.shape == (300,) and out.dtype == np.float32
    (k, count, codes, nb, gshift, scale, offset, code8, out_arg), = launches
    assert k is kernel and count == nb == 300 and out_arg is out
    assert isinstance(offset, DeviceArray) and offset.shape == (1,) and offset.dtype == np.float32
    assert np.shares_memory(offset, dev.absmax_offset)  # a view of the stored offset, not a copy
    assert isinstance(scale, DeviceArray) and isinstance(codes, DeviceArray) and isinstance(code8, DeviceArray)


# ------------------------------------------------ NUMBA_CUDA_ARRAY_INTERFACE_SYNC set as the backend starts


class _RecordingFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``minitorch_peft.kernels.gpu`` as an empty module, recording the environment when it loads."""

    name = "minitorch_peft.kernels.gpu"

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        return importlib.machinery.ModuleSpec(fullname, self) if fullname == self.name else None

    def create_module(self, spec: Any) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        self.seen.append(os.environ.get(SYNC))


@pytest.fixture
def cupy_backend_loader(monkeypatch: pytest.MonkeyPatch) -> Iterator[_RecordingFinder]:
    """A fake CuPy with one GPU and a stand-in kernels.gpu, so ``get_backend("cupy")`` runs its start-up."""
    import minitorch_peft.kernels as kernels_pkg

    fake = types.SimpleNamespace(
        cuda=types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1)),
        transpose=np.transpose, swapaxes=np.swapaxes,  # what Backend binds when an array-API name is absent
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(backend_module, "_cache", {})
    monkeypatch.setenv(SYNC, "placeholder")
    monkeypatch.delenv(SYNC)  # absent now, restored to what it was after the test
    finder = _RecordingFinder()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    # On a GPU machine the real module may be loaded already: set it aside, and put it back afterwards.
    saved = sys.modules.pop(finder.name, None), kernels_pkg.__dict__.pop("gpu", None)
    try:
        yield finder
    finally:
        sys.modules.pop(finder.name, None)
        kernels_pkg.__dict__.pop("gpu", None)
        if saved[0] is not None:
            sys.modules[finder.name] = saved[0]
        if saved[1] is not None:
            kernels_pkg.gpu = saved[1]  # type: ignore[attr-defined]


def test_cupy_backend_turns_off_the_per_launch_stream_sync_before_loading_its_kernels(
    cupy_backend_loader: _RecordingFinder,
) -> None:
    be = backend_module.get_backend("cupy")
    assert be.name == "cupy"
    assert cupy_backend_loader.seen == ["0"], "the variable must be set before kernels.gpu (and numba.cuda) load"
    assert os.environ[SYNC] == "0"


def test_cupy_backend_keeps_a_sync_setting_the_user_chose(
    cupy_backend_loader: _RecordingFinder, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(SYNC, "1")
    backend_module.get_backend("cupy")
    assert cupy_backend_loader.seen == ["1"] and os.environ[SYNC] == "1"


def test_numpy_backend_leaves_the_numba_cuda_setting_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backend_module, "_cache", {})
    monkeypatch.setenv(SYNC, "placeholder")
    monkeypatch.delenv(SYNC)
    backend_module.get_backend("numpy")
    assert SYNC not in os.environ


# ------------------------------------------------------------------- index_add uses cupy.add.at


def _function(path: Path, name: str) -> ast.FunctionDef:
    tree = ast.parse(path.read_text())
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def test_gpu_index_add_uses_cupy_add_at_not_the_deprecated_scatter_add() -> None:
    source = (ROOT / "kernels" / "gpu.py").read_text()
    assert "scatter_add" not in source.replace("cupyx.scatter_add is deprecated", "")
    calls = [ast.unparse(n.func) for n in ast.walk(_function(ROOT / "kernels" / "gpu.py", "index_add"))
             if isinstance(n, ast.Call)]
    assert "cupy.add.at" in calls, calls


def test_cpu_index_add_is_the_same_operation() -> None:
    """The GPU's cupy.add.at mirrors the CPU's unbuffered np.add.at: repeated indices accumulate."""
    from minitorch_peft.kernels import cpu

    assert "np.add.at" in inspect.getsource(cpu.index_add) or "numpy.add.at" in inspect.getsource(cpu.index_add)
    t = np.zeros(4)
    np.testing.assert_array_equal(cpu.index_add(t, np.array([1, 1, 3]), np.ones(3)), [0, 2, 0, 1])
