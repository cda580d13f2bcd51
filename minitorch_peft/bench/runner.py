"""Run the benchmark: build every variant, measure it, print each section as it finishes, return the results.

Each runtime is measured in a worker process of its own (``worker``): ours in one, PyTorch's in another,
alternating block by block in the same rounds; this process only coordinates and never imports PyTorch.
With ``load`` K, K competing CPU-bound processes (``load.BusyLoad``) run for the whole benchmark, and unless
``--threads`` says otherwise both sides get the CPUs the load leaves (``threads_for``).

The result is a plain JSON-able dict (``report`` renders it, ``--json`` writes it). Every figure in it is
measured on live arrays or timed; nothing is estimated from a formula.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..backend import get_backend
from ..errors import ConfigError
from . import numpy_ref, report, variants
from .env import cpu_count, environment, load_average
from .timing import Stats, interleaved_blocks, ratio, ratio_quartiles

FORWARD_VARIANTS = ("full", "lora_unmerged", "lora_merged", "dora", "qlora")
STEP_VARIANTS = ("full", "lora", "dora", "qlora")
TORCH_KINDS = ("full", "lora", "lora_merged", "dora")
QUANT_SHAPES = ((4096, 4096), (2048, 784))

Log = Callable[[str], None]


#: The most competing processes ``--load`` starts.
MAX_LOAD = 64

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
    threads: int | None = None
    load: int = 0
    baseline: dict[str, Any] | None = None  # a quiet run's results: under --load, ratios are held against it

    def validate(self) -> None:
        unknown = [m for m in self.models if m not in variants.MODELS]
        if not self.models or unknown:
            raise ConfigError(f"unknown model(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(variants.MODELS)}")
        bad = [c for c in self.compare if c != "torch"]
        if bad:
            raise ConfigError(f"--compare knows only 'torch', got {', '.join(bad)}")
        for name in ("batch_size", "forward_iters", "step_iters", "rounds", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if not 0 <= self.load <= MAX_LOAD:  # each is a process spinning a core: past a few per CPU it only thrashes
            raise ConfigError(f"--load must be from 0 to {MAX_LOAD}, got {self.load}")

    def threads_for(self, cpus: int) -> tuple[int | None, str]:
        """The BLAS / PyTorch thread count of both workers and where it came from.

        Under ``--load K`` without ``--threads``: the ``cpus - K`` CPUs the load leaves (at least 1). A BLAS pool
        wider than the free cores waits, at every matmul, for a worker thread the load has taken off its core:
        on the 2-CPU machine one thread was 3-17x faster under --load 1 (thread table, kernels/threads.py).
        The benchmark knows its own load for certain, so this is a choice made from the flags, not a guess."""
        if self.threads is not None:
            return self.threads, "--threads"
        if self.load:
            return max(1, cpus - self.load), f"the {cpus} CPU(s) less the --load {self.load}"
        return None, "threadpoolctl, in the worker"

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
    from .load import BusyLoad
    from .worker import Worker

    cfg.validate()
    backend = get_backend(cfg.backend)
    n_train = None
    if cfg.epoch:
        from ..data import load_mnist_like

        n_train = int(len(load_mnist_like("mnist", "train", cfg.data_dir)[1]))  # missing data fails here, before any work
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="minitorch_peft_bench_"))
        threads, source = cfg.threads_for(cpu_count())
        ours = stack.enter_context(Worker("ours", threads, backend.name))
        theirs = stack.enter_context(Worker("torch", threads, backend.name)) if "torch" in cfg.compare else None
        return _run(cfg, backend, ours, theirs, tmp, n_train, log, lambda: stack.enter_context(BusyLoad(cfg.load)),
                    source)
    raise AssertionError("unreachable")  # pragma: no cover


def _run(cfg: BenchConfig, backend: Any, ours: Any, theirs: Any | None, tmp: str, n_train: int | None, log: Log,
         start_load: Callable[[], Any], source: str) -> dict[str, Any]:
    """``source``: where the workers' thread count came from (``BenchConfig.threads_for``)."""
    hello = ours.call("hello")
    threads = hello["blas_policy"]["threads"] or 1
    results: dict[str, Any] = {
        "format": report.BENCH_FORMAT,
        "version": 2,
        "config": {
            "backend": backend.name, "models": list(cfg.models), "batch_size": cfg.batch_size, "quick": cfg.quick,
            "forward_iterations": cfg.n_forward, "step_iterations": cfg.n_step, "rounds": cfg.n_rounds,
            "warmup": cfg.warmup, "rank": variants.RANK, "alpha": variants.ALPHA, "dtype": "float32",
            "seed": cfg.seed, "threads": cfg.threads, "load": cfg.load,
        },
        "environment": environment(backend, threads, source),
        "workers": {"ours": _worker_info(hello)},
        "models": {},
    }
    compare: dict[str, Any] | None = None
    if theirs is not None:
        th = theirs.call("hello")
        results["workers"]["torch"] = _worker_info(th)
        if th["skipped"]:
            results["compare"] = {"torch": {"skipped": th["skipped"]}}
            theirs.close()
            theirs = None
        else:
            tthreads = theirs.call("set_threads", n=threads)  # the same thread count on both sides
            results["workers"]["torch"]["threads"] = tthreads
            compare = {"version": th["version"], "device": th["device"], "threads": tthreads, "models": {}}
            results["compare"] = {"torch": compare}
    results["environment"]["load"] = start_load().describe()
    for line in report.header(results):
        log(line)

    for name in cfg.models:
        model_res, torch_res = _bench_model(name, cfg, ours, theirs, tmp)
        results["models"][name] = model_res
        if compare is not None:
            compare["models"][name] = torch_res
        for line in report.model_section(name, results):
            log(line)

    results["quant"] = _bench_quant(cfg, ours)
    for line in report.quant_section(results):
        log(line)

    if cfg.epoch:
        from .epoch import bench_epoch

        results["epoch"] = bench_epoch(cfg, ours, theirs, tmp, n_train)
        for line in report.epoch_section(results):
            log(line)

    results["environment"]["load_average_end"] = load_average()
    results["environment"]["numba_threading_layer"] = ours.call("numba_layer")
    results["targets"] = report.targets(results, cfg.baseline)
    for line in report.targets_section(results):
        log(line)
    return results


def _worker_info(hello: dict[str, Any]) -> dict[str, Any]:
    pools = [{k: p.get(k) for k in ("user_api", "internal_api", "num_threads")} for p in hello["threadpools"]]
    info = {"pid": hello["pid"], "threadpools": pools, "torch_imported": hello["torch_imported"]}
    if "blas_policy" in hello:
        info["blas_policy"] = hello["blas_policy"]
    return info


# ------------------------------------------------------------------------------------------ one model


def _bench_model(name: str, cfg: BenchConfig, ours: Any, theirs: Any | None, tmp: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time one model: ours in the ``ours`` worker, PyTorch's in ``theirs``, in the same interleaved rounds."""
    from .worker import remote_block

    spec_dir = os.path.join(tmp, name)
    res = ours.call("model", name=name, batch_size=cfg.batch_size, seed=cfg.seed,
                    spec_dir=spec_dir if theirs is not None else None)
    cases = set(res.pop("cases"))
    torch_cases: set[str] = set()
    if theirs is not None:
        torch_cases = set(theirs.call("model", spec_dir=spec_dir, kinds=res.pop("torch_kinds")))

    # ---- forward: every variant (and PyTorch's) in one interleaved run
    fwd_blocks = {k: remote_block(ours, f"fwd:{k}", cfg.warmup * 2) for k in FORWARD_VARIANTS if f"fwd:{k}" in cases}
    fwd_blocks.update({f"torch:{k}": remote_block(theirs, f"fwd:{k}", cfg.warmup * 2)
                       for k in FORWARD_VARIANTS if f"fwd:{k}" in torch_cases})
    fwd = interleaved_blocks(fwd_blocks, cfg.n_forward, cfg.n_rounds)

    # ---- training step: ours, the hand-written reference, PyTorch's, in one interleaved run
    step_blocks = {k: remote_block(ours, f"step:{k}", cfg.warmup) for k in STEP_VARIANTS if f"step:{k}" in cases}
    step_blocks.update({f"hand:{k}": remote_block(ours, f"hand:{k}", cfg.warmup) for k in ("full", "lora")})
    step_blocks.update({f"torch:{k}": remote_block(theirs, f"step:{k}", cfg.warmup)
                        for k in STEP_VARIANTS if f"step:{k}" in torch_cases})
    step = interleaved_blocks(step_blocks, cfg.n_step, cfg.n_rounds)

    res["forward_ms"] = {k: fwd[k].to_dict() for k in FORWARD_VARIANTS if k in fwd}
    res["train_step_ms"] = {k: step[k].to_dict() for k in STEP_VARIANTS if k in step}
    res["reference_step_ms"] = {f"hand_{k}": step[f"hand:{k}"].to_dict() for k in ("full", "lora")}
    res["worst_round_over_median"] = {
        "forward": {k: _spread(fwd[k]) for k in res["forward_ms"]},
        "train_step": {k: _spread(step[k]) for k in res["train_step_ms"]},
    }
    # each ratio as (numerator, denominator) stats: its median and the middle half of its rounds come from them
    pairs = {
        "forward_vs_full": {k: (fwd.get(k), fwd["full"]) for k in res["forward_ms"]},
        "train_step_vs_full": {k: (step.get(k), step["full"]) for k in res["train_step_ms"]},
        "train_step_vs_lora": {k: (step.get(k), step["lora"]) for k in res["train_step_ms"]},
    }
    engine = {"full_step_engine_over_hand": (step["full"], step["hand:full"]),
              "lora_step_engine_over_hand": (step["lora"], step["hand:lora"])}
    res["ratios"] = _each(pairs, _r)
    res["engine_overhead"] = {k: _r(*ab) for k, ab in engine.items()}
    res["ratio_quartiles"] = _each({**pairs, "engine_overhead": engine}, _q)
    if not res.get("skipped"):
        res.pop("skipped", None)
    torch_res: dict[str, Any] = {}
    if theirs is not None:
        tf = {k: fwd[f"torch:{k}"] for k in FORWARD_VARIANTS if f"torch:{k}" in fwd}
        ts = {k: step[f"torch:{k}"] for k in STEP_VARIANTS if f"torch:{k}" in step}
        vs_torch = {"forward_ms": {k: (fwd[k], s) for k, s in tf.items() if k in fwd},
                    "train_step_ms": {k: (step[k], s) for k, s in ts.items() if k in step}}
        torch_res = {
            "forward_ms": {k: s.to_dict() for k, s in tf.items()},
            "train_step_ms": {k: s.to_dict() for k, s in ts.items()},
            "ratio": _each(vs_torch, _r),
            "ratio_quartiles": _each(vs_torch, _q),
            "skipped": {"qlora": "not compared: PyTorch has no 4-bit NF4 Linear without bitsandbytes"},
        }
    return res, torch_res


def _spread(s: Stats) -> float:
    """The slowest round over the median: how far one disturbed round strayed."""
    return round(s.max / s.median, 3) if s.median > 0 else 0.0


def prepare_model(name: str, batch_size: int, seed: int, backend: Any,
                  spec_dir: str | None) -> tuple[dict[str, Any], dict[str, Callable[[], Any]], dict[str, Any]]:
    """In the ours worker: build every variant of model ``name``, measure its parameters and memory, and
    return (results so far, the timing cases by name, their syncs). With ``spec_dir`` the starting weights
    of each variant PyTorch runs and the batch are written there for the PyTorch worker."""
    dims = variants.MODELS[name]
    built = {k: variants.build(k, dims, backend, seed) for k in ("full", "lora", "lora_merged", "dora", "qlora")}
    full, lora = built["full"], built["lora"]
    assert full.model is not None and lora.model is not None
    x, y, x_host, y_host = variants.batch(dims, batch_size, backend, seed)
    skipped = {k: v.note for k, v in built.items() if not v.available}

    res: dict[str, Any] = {"dims": dims, "batch_size": batch_size}
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
    res["skipped"] = skipped

    source = {"full": "full", "lora_unmerged": "lora", "lora_merged": "lora_merged", "dora": "dora", "qlora": "qlora"}
    cases: dict[str, Callable[[], Any]] = {}
    for k in FORWARD_VARIANTS:
        if built[source[k]].available:
            cases[f"fwd:{k}"] = variants.forward_call(built[source[k]].model, x)
    cases.update({f"step:{k}": call for k, call in steps.items()})
    for k, m in _hand_models(full.model, lora.model, backend).items():
        cases[f"hand:{k}"] = (lambda m=m: m.step(x.data, y.data))
    sync = variants.sync_for(backend)
    if spec_dir is not None:
        from .torch_ref import model_spec, save_spec

        os.makedirs(spec_dir, exist_ok=True)
        np.savez(os.path.join(spec_dir, "batch.npz"), x=x_host, y=y_host)
        kinds = [k for k in TORCH_KINDS if built["lora" if k == "lora_merged" else k].available]
        for k in {("lora" if k == "lora_merged" else k) for k in kinds}:
            save_spec(model_spec(_fresh(built[k], k, dims, backend, seed)), os.path.join(spec_dir, f"{k}.npz"))
        res["torch_kinds"] = kinds
    res["cases"] = sorted(cases)
    return res, cases, {k: sync for k in cases}


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


def _q(a: Stats | None, b: Stats | None) -> list[float] | None:
    q = ratio_quartiles(a, b)
    return None if q is None else [round(q[0], 4), round(q[1], 4)]


def _each(sections: dict[str, dict[str, tuple[Any, Any]]], fn: Callable[[Any, Any], Any]) -> dict[str, dict[str, Any]]:
    """{section: {key: fn(a, b)}} for the (a, b) pairs of each section."""
    return {name: {k: fn(*ab) for k, ab in pairs.items()} for name, pairs in sections.items()}


# ------------------------------------------------------------------------------------------ quantization


def _bench_quant(cfg: BenchConfig, ours: Any) -> dict[str, Any]:
    """NF4 (block 64, double quant) throughput in GB/s of float32 input (quantize) or output (dequantize)."""
    from .worker import remote_block

    res = ours.call("quant", seed=cfg.seed)
    if "skipped" in res:
        return res
    sizes = res.pop("sizes")
    iters = 2 if cfg.quick else 10
    blocks = {k: remote_block(ours, k, 1) for k in res.pop("cases")}
    stats = interleaved_blocks(blocks, iters * min(cfg.n_rounds, 5), min(cfg.n_rounds, 5))
    res.update({"quantize_gbps": {}, "dequantize_gbps": {}, "quantize_ms": {}, "dequantize_ms": {}})
    for key, s in stats.items():
        op, label = key.split(":")
        gb = sizes[label] / 1e9
        res[f"{op}_ms"][label] = s.to_dict()
        res[f"{op}_gbps"][label] = {"median": round(gb / (s.median / 1e3), 3), "min": round(gb / (s.max / 1e3), 3),
                                    "max": round(gb / (s.min / 1e3), 3)}
    return res


def prepare_quant(seed: int, backend: Any) -> tuple[dict[str, Any], dict[str, Callable[[], Any]], Any]:
    """In the ours worker: the NF4 quantize / dequantize cases of every shape in QUANT_SHAPES."""
    quantize, dequantize = backend.kernels.quantize_4bit, backend.kernels.dequantize_4bit
    rng = np.random.default_rng(seed)
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
    res = {"quant_type": "nf4", "block_size": variants.QUANT["block_size"], "double_quant": True,
           "sizes": sizes, "cases": list(cases)}
    return res, cases, variants.sync_for(backend)
