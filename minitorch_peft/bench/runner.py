"""Run the benchmark: build every variant, measure it, print each section as it finishes, return the results.

The result is a plain JSON-able dict (``report`` renders it, ``--json`` writes it). Every figure in it is
measured on live arrays or timed; nothing is estimated from a formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..backend import get_backend
from ..errors import ConfigError
from . import numpy_ref, report, variants
from .env import blas_threads, environment, load_average
from .timing import Stats, interleaved, ratio

FORWARD_VARIANTS = ("full", "lora_unmerged", "lora_merged", "dora", "qlora")
STEP_VARIANTS = ("full", "lora", "dora", "qlora")
QUANT_SHAPES = ((4096, 4096), (2048, 784))

Log = Callable[[str], None]


@dataclass
class BenchConfig:
    """The ``bench`` command's options."""

    backend: str = "numpy"
    models: list[str] = field(default_factory=lambda: ["small", "medium"])
    batch_size: int = 64
    quick: bool = False
    compare: list[str] = field(default_factory=list)
    epoch: bool = False
    data_dir: str | None = None
    seed: int = 0
    forward_iters: int | None = None
    step_iters: int | None = None
    rounds: int | None = None

    def validate(self) -> None:
        unknown = [m for m in self.models if m not in variants.MODELS]
        if not self.models or unknown:
            raise ConfigError(f"unknown model(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(variants.MODELS)}")
        bad = [c for c in self.compare if c != "torch"]
        if bad:
            raise ConfigError(f"--compare knows only 'torch', got {', '.join(bad)}")
        for name in ("batch_size", "forward_iters", "step_iters", "rounds"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")

    # loop sizes: --quick keeps every section but runs short loops
    @property
    def n_forward(self) -> int:
        return self.forward_iters or (100 if self.quick else 1000)

    @property
    def n_step(self) -> int:
        return self.step_iters or (30 if self.quick else 100)

    @property
    def n_rounds(self) -> int:
        # many short rounds: on a machine whose load changes from second to second, every variant then
        # samples the same mix of quiet and busy moments
        return self.rounds or (5 if self.quick else 20)

    @property
    def warmup(self) -> int:
        return 2 if self.quick else 5


def run(cfg: BenchConfig, log: Log = print) -> dict[str, Any]:
    """Measure everything ``cfg`` asks for; print each section through ``log``; return the results."""
    cfg.validate()
    backend = get_backend(cfg.backend)
    torch_device = torch_skipped = None
    if "torch" in cfg.compare:
        from . import torch_ref

        torch_device, torch_skipped = torch_ref.torch_device(backend.kernels.DEVICE)  # a missing PyTorch fails here
    if cfg.epoch:
        from ..data import load_mnist_like

        load_mnist_like("mnist", "train", cfg.data_dir)  # missing data fails here, before any work
    threads, source = blas_threads()
    results: dict[str, Any] = {
        "format": "minitorch_peft-bench",
        "version": 1,
        "config": {
            "backend": backend.name, "models": list(cfg.models), "batch_size": cfg.batch_size, "quick": cfg.quick,
            "forward_iterations": cfg.n_forward, "step_iterations": cfg.n_step, "rounds": cfg.n_rounds,
            "warmup": cfg.warmup, "rank": variants.RANK, "alpha": variants.ALPHA, "dtype": "float32",
            "seed": cfg.seed,
        },
        "environment": environment(backend, threads, source),
        "models": {},
    }
    compare: dict[str, Any] | None = None
    if torch_device is not None:
        from . import torch_ref

        torch = torch_ref.import_torch()
        compare = {"version": torch.__version__, "device": torch_device,
                   "threads": torch_ref.set_threads(threads), "models": {}}
        results["compare"] = {"torch": compare}
    elif torch_skipped:
        results["compare"] = {"torch": {"skipped": torch_skipped}}
    for line in report.header(results):
        log(line)

    for name in cfg.models:
        model_res, torch_res = _bench_model(name, cfg, backend, torch_device)
        results["models"][name] = model_res
        if compare is not None:
            compare["models"][name] = torch_res
        for line in report.model_section(name, results):
            log(line)

    results["quant"] = _bench_quant(cfg, backend)
    for line in report.quant_section(results):
        log(line)

    if cfg.epoch:
        from .epoch import bench_epoch

        results["epoch"] = bench_epoch(cfg, backend, torch_device)
        for line in report.epoch_section(results):
            log(line)

    results["environment"]["load_average_end"] = load_average()
    results["environment"]["numba_threading_layer"] = _numba_layer()
    results["targets"] = report.targets(results)
    for line in report.targets_section(results):
        log(line)
    return results


# ------------------------------------------------------------------------------------------ one model


def _bench_model(name: str, cfg: BenchConfig, backend: Any, torch_device: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    dims = variants.MODELS[name]
    seed = cfg.seed
    built = {k: variants.build(k, dims, backend, seed) for k in ("full", "lora", "lora_merged", "dora", "qlora")}
    full, lora = built["full"], built["lora"]
    assert full.model is not None and lora.model is not None
    x, y, x_host, y_host = variants.batch(dims, cfg.batch_size, backend, seed)
    skipped = {k: v.note for k, v in built.items() if not v.available}

    res: dict[str, Any] = {"dims": dims, "batch_size": cfg.batch_size}
    res["params"] = variants.param_counts(full.model, lora.model)

    # ---- memory: one real step per trained variant, then the arrays it left behind
    steps = {k: variants.step_call(built[k], x, y) for k in STEP_VARIANTS if built[k].available}
    for call in steps.values():
        call()
        call()  # the second step runs with the optimizer state in place, as every later step does
    memory: dict[str, Any] = {
        "full_fp32": variants.param_bytes(full.model),
        "lora_total": variants.param_bytes(lora.model),
        "lora_trainable": variants.param_bytes(lora.model, trainable_only=True),
        "grad_full": variants.grad_bytes(full.model),
        "grad_lora": variants.grad_bytes(lora.model),
        "optimizer_full": full.optimizer.state_nbytes(),
        "optimizer_lora": lora.optimizer.state_nbytes(),
        "base_nf4": variants.quantized_base_bytes(full.model, double_quant=False),
        "base_nf4_dq": variants.quantized_base_bytes(full.model, double_quant=True),
        "qlora_total": built["qlora"].model.nbytes() if built["qlora"].available else None,
    }
    for k in STEP_VARIANTS:
        memory[f"peak_step_{k}"] = variants.peak_step_bytes(steps[k], backend) if k in steps else None
    res["memory_bytes"] = memory
    res["peak_method"] = backend.kernels.PEAK_METHOD

    sync = variants.sync_for(backend)
    torch_res: dict[str, Any] = {}

    # ---- forward: every variant (and PyTorch's) in one interleaved run
    source = {"full": "full", "lora_unmerged": "lora", "lora_merged": "lora_merged", "dora": "dora", "qlora": "qlora"}
    fwd_cases: dict[str, Callable[[], Any]] = {}
    for k in FORWARD_VARIANTS:
        v = built[source[k]]
        if v.available:
            fwd_cases[k] = variants.forward_call(v.model, x)
    syncs: dict[str, Any] = {}
    torch_models: dict[str, Any] = {}
    if torch_device is not None:
        from . import torch_ref

        tsync = torch_ref.sync_for(torch_device)
        tx, ty = torch_ref.batch(x_host, y_host, torch_device)
        for k in ("full", "lora_unmerged", "lora_merged", "dora"):
            src = built["lora" if k == "lora_merged" else source[k]]  # merged in PyTorch from the unmerged adapters
            if not src.available:
                continue
            kind = "lora_merged" if k == "lora_merged" else src.name
            torch_models[k] = torch_ref.build_model(_fresh(src, k, dims, backend, seed), kind, torch_device)
            fwd_cases[f"torch:{k}"] = torch_ref.forward_call(torch_models[k][0], tx)
            syncs[f"torch:{k}"] = tsync
    fwd = interleaved(fwd_cases, cfg.n_forward, cfg.n_rounds, cfg.warmup * 2, sync=sync, syncs=syncs,
                      pools=_pools(fwd_cases))

    # ---- training step: ours, the hand-written reference, PyTorch's, in one interleaved run
    step_cases: dict[str, Callable[[], Any]] = dict(steps)
    hand = _hand_models(full.model, lora.model, backend)
    for k, m in hand.items():
        step_cases[f"hand:{k}"] = (lambda m=m: m.step(x.data, y.data))
    if torch_device is not None:
        from . import torch_ref

        for k in ("full", "lora", "dora"):
            src = built[k]
            if not src.available:
                continue
            tmodel, topt = torch_ref.build_model(_fresh(src, k, dims, backend, seed), k, torch_device)
            step_cases[f"torch:{k}"] = torch_ref.step_call(tmodel, topt, tx, ty)
            syncs[f"torch:{k}"] = tsync
    step = interleaved(step_cases, cfg.n_step, cfg.n_rounds, cfg.warmup, sync=sync, syncs=syncs,
                       pools=_pools(step_cases))

    res["forward_ms"] = {k: fwd[k].to_dict() for k in FORWARD_VARIANTS if k in fwd}
    res["train_step_ms"] = {k: step[k].to_dict() for k in STEP_VARIANTS if k in step}
    res["reference_step_ms"] = {f"hand_{k}": step[f"hand:{k}"].to_dict() for k in hand}
    res["ratios"] = {
        "forward_vs_full": {k: _r(fwd.get(k), fwd["full"]) for k in res["forward_ms"]},
        "train_step_vs_full": {k: _r(step.get(k), step["full"]) for k in res["train_step_ms"]},
        "train_step_vs_lora": {k: _r(step.get(k), step["lora"]) for k in res["train_step_ms"]},
    }
    res["engine_overhead"] = {
        "full_step_engine_over_hand": _r(step["full"], step["hand:full"]),
        "lora_step_engine_over_hand": _r(step["lora"], step["hand:lora"]),
    }
    if skipped:
        res["skipped"] = skipped
    if torch_device is not None:
        tf = {k: fwd[f"torch:{k}"] for k in FORWARD_VARIANTS if f"torch:{k}" in fwd}
        ts = {k: step[f"torch:{k}"] for k in STEP_VARIANTS if f"torch:{k}" in step}
        torch_res = {
            "forward_ms": {k: s.to_dict() for k, s in tf.items()},
            "train_step_ms": {k: s.to_dict() for k, s in ts.items()},
            "ratio": {
                "forward_ms": {k: _r(fwd[k], s) for k, s in tf.items() if k in fwd},
                "train_step_ms": {k: _r(step[k], s) for k, s in ts.items() if k in step},
            },
            "skipped": {"qlora": "not compared: PyTorch has no 4-bit NF4 Linear without bitsandbytes"},
        }
    return res, torch_res


def _pools(cases: dict[str, Any]) -> dict[str, str]:
    """PyTorch's cases run on its own thread pool; ours and the hand-written ones on NumPy's BLAS pool."""
    return {k: ("torch" if k.startswith("torch:") else "numpy") for k in cases}


def _fresh(v: variants.Variant, kind: str, dims: list[int], backend: Any, seed: int) -> Any:
    """Our model of this variant as built (before any training step), for PyTorch to copy its weights."""
    return variants.build(v.name if kind != "lora_merged" else "lora", dims, backend, seed, train=False).model


def _hand_models(full: Any, lora: Any, backend: Any) -> dict[str, numpy_ref.HandMLP]:
    """The hand-written full and LoRA steps, over copies of the same starting weights."""
    from ..peft.model import lora_layers

    xp = backend.xp
    names = full.layer_names
    ws = [full.get_submodule(n).weight.data for n in names]
    bs = [full.get_submodule(n).bias.data for n in names]
    layers = dict(lora_layers(lora))
    a = [layers[n].lora_A[layers[n].active_adapter].data for n in names]
    bm = [layers[n].lora_B[layers[n].active_adapter].data for n in names]
    scaling = layers[names[0]].scaling()
    return {"full": numpy_ref.HandMLP(xp, ws, bs), "lora": numpy_ref.HandMLP(xp, ws, bs, lora=(a, bm, scaling))}


def _r(a: Stats | None, b: Stats | None) -> float | None:
    r = ratio(a, b)
    return None if r is None else round(r, 4)


# ------------------------------------------------------------------------------------------ quantization


def _bench_quant(cfg: BenchConfig, backend: Any) -> dict[str, Any]:
    """NF4 (block 64, double quant) throughput in GB/s of float32 input (quantize) or output (dequantize)."""
    quantize, dequantize = backend.kernels.quantize_4bit, backend.kernels.dequantize_4bit
    rng = np.random.default_rng(cfg.seed)
    cases: dict[str, Callable[[], Any]] = {}
    sizes: dict[str, int] = {}
    for shape in QUANT_SHAPES:
        label = f"{shape[0]}x{shape[1]}"
        w = backend.asarray(rng.standard_normal(shape).astype(np.float32) * 0.02)
        packed, state = quantize(w, "nf4", variants.QUANT["block_size"], True)
        out = backend.xp.empty(shape, dtype=np.float32)
        cases[f"quantize:{label}"] = lambda w=w: quantize(w, "nf4", variants.QUANT["block_size"], True)
        cases[f"dequantize:{label}"] = lambda p=packed, s=state, o=out: dequantize(p, s, o)
        sizes[label] = int(w.nbytes)
    iters = 2 if cfg.quick else 10
    stats = interleaved(cases, iters * min(cfg.n_rounds, 5), min(cfg.n_rounds, 5), warmup=1,
                        sync=variants.sync_for(backend))
    res: dict[str, Any] = {"quant_type": "nf4", "block_size": variants.QUANT["block_size"], "double_quant": True,
                           "quantize_gbps": {}, "dequantize_gbps": {}, "quantize_ms": {}, "dequantize_ms": {}}
    for key, s in stats.items():
        op, label = key.split(":")
        gb = sizes[label] / 1e9
        res[f"{op}_ms"][label] = s.to_dict()
        res[f"{op}_gbps"][label] = {"median": round(gb / (s.median / 1e3), 3), "min": round(gb / (s.max / 1e3), 3),
                                    "max": round(gb / (s.min / 1e3), 3)}
    return res


def _numba_layer() -> str | None:
    """The threading layer Numba's parallel kernels (4-bit quantization) ran on, if any ran."""
    import numba

    try:
        return f"{numba.threading_layer()} ({numba.config.NUMBA_NUM_THREADS} threads)"
    except ValueError:  # no parallel kernel ran in this process
        return None
