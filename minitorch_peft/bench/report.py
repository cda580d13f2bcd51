"""Text (and optional PNG) rendering of benchmark results. Works on the JSON-able results dict only, so a
saved ``--json`` file renders the same way."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, NamedTuple

FORWARD_LABELS = {"full": "Full", "lora_unmerged": "LoRA (unmerged)", "lora_merged": "LoRA (merged)",
                  "dora": "DoRA", "qlora": "QLoRA (NF4+DQ)"}
STEP_LABELS = {"full": "Full fine-tuning", "lora": "LoRA", "dora": "DoRA", "qlora": "QLoRA (NF4+DQ)"}
BENCH_FORMAT = "minitorch_peft-bench"  # the "format" of every bench --json file (what --baseline reads back)

class Target(NamedTuple):
    """A speed target: the row it is shown as, its limit, and where its measured value lies.

    ``path`` is a chain of keys into one model's results, where "torch" leads into that model's ours /
    PyTorch comparison (for ``EPOCH_TARGETS``: into the epoch section's methods). A missing key anywhere on
    the way means "not measured", never a wrong pairing: each value is read from its own place.
    ``quartiles`` is the path to the middle half of the same per-round ratios. ``models``: the models the
    target was set for (None: every model benchmarked).
    """

    what: str
    limit: float
    path: tuple[str, ...]
    quartiles: tuple[str, ...]
    models: tuple[str, ...] | None = None


# The speed targets at batch 64 on 2 threads: the ours / PyTorch ones were set for the small MLP (the issues
# that set them measured that model), the others for every model. Ours / PyTorch ratios come from the two
# runtimes measured in separate processes, in the same rounds.
TARGETS = (
    Target("LoRA step / PyTorch LoRA step", 0.7, ("torch", "ratio", "train_step_ms", "lora"),
           ("torch", "ratio_quartiles", "train_step_ms", "lora"), ("small",)),
    Target("full step / PyTorch full step", 0.8, ("torch", "ratio", "train_step_ms", "full"),
           ("torch", "ratio_quartiles", "train_step_ms", "full"), ("small",)),
    Target("LoRA unmerged forward / full forward", 1.3, ("ratios", "forward_vs_full", "lora_unmerged"),
           ("ratio_quartiles", "forward_vs_full", "lora_unmerged")),
    Target("LoRA merged forward / full forward", 1.05, ("ratios", "forward_vs_full", "lora_merged"),
           ("ratio_quartiles", "forward_vs_full", "lora_merged")),
    Target("DoRA step / LoRA step", 1.5, ("ratios", "train_step_vs_lora", "dora"),
           ("ratio_quartiles", "train_step_vs_lora", "dora")),
    Target("QLoRA step / LoRA step", 1.3, ("ratios", "train_step_vs_lora", "qlora"),
           ("ratio_quartiles", "train_step_vs_lora", "qlora")),
    Target("QLoRA forward / full forward", 1.5, ("ratios", "forward_vs_full", "qlora"),
           ("ratio_quartiles", "forward_vs_full", "qlora")),
    Target("engine full step / hand-written NumPy full step", 1.15, ("engine_overhead", "full_step_engine_over_hand"),
           ("ratio_quartiles", "engine_overhead", "full_step_engine_over_hand")),
)
# One epoch of `cli.py train` is the small MLP's, whichever models the step tables cover.
EPOCH_TARGETS = (
    Target("one training epoch (LoRA) / PyTorch", 0.65, ("lora", "ratio"), ("lora", "ratio_quartiles")),
    Target("one training epoch (full) / PyTorch", 0.6, ("full", "ratio"), ("full", "ratio_quartiles")),
)
# under --load: no round of ours slower than this many times our own median for that row, and (against a
# quiet --baseline run) every ours / PyTorch ratio within this factor of its quiet value
LOAD_WORST_ROUND = 3.0
LOAD_RATIO_DRIFT = 1.25


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.2f} MiB"
    return f"{n / 1024:.1f} KiB"


def fmt_stats(s: dict[str, float] | None, unit: str = "ms") -> str:
    if not s:
        return "-"
    return f"{_num(s['median'])} {unit} [{_num(s['min'])}-{_num(s['max'])}]"


def _num(v: float) -> str:
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def header(res: dict[str, Any]) -> list[str]:
    env, cfg = res["environment"], res["config"]
    blas = env.get("blas", {})
    blas_name = " ".join(str(blas[k]) for k in ("name", "version") if blas.get(k)) or "unknown BLAS"
    lines = [
        "🔥 minitorch_peft benchmark: LoRA vs full fine-tuning (every figure measured)",
        "=" * 76,
        f"backend {env['backend']} · NumPy {env['numpy']} · {blas_name} · {env['threads']} thread(s) "
        f"({env['threads_source']}) · {env['cpu']}",
    ]
    if env.get("gpu"):
        lines.append(f"GPU: {env['gpu']}")
    policy = res.get("workers", {}).get("ours", {}).get("blas_policy")
    if policy and policy.get("small_gemm"):
        lines.append(f"BLAS threads: {policy['threads']} for a large matmul, 1 below {policy['small_gemm']:,} "
                     "multiply-adds (kernels/threads.py)")
    load = env.get("load")
    if load:
        lines.append(f"⚙  UNDER LOAD: {load['processes']} competing CPU-bound process(es) started by the benchmark "
                     "run through every table and target below")
    load = env.get("load_average_start")
    if load:
        lines.append(f"machine load average at start: {' '.join(map(str, load))} on {env['cpu_count']} CPU(s)")
        if load[0] > 0.75 * env["cpu_count"]:
            hint = "" if env["threads"] == 1 else " (multi-threaded BLAS suffers most when a core is taken; --threads 1 avoids that)"
            lines.append(f"⚠  the machine is busy: absolute times are inflated and noisy{hint}; "
                         "ratios of interleaved medians remain comparable")
    torch = res.get("compare", {}).get("torch")
    if torch and "skipped" in torch:
        lines.append(f"PyTorch comparison skipped: {torch['skipped']}")
    elif torch:
        lines.append(f"compared with PyTorch {torch['version']} on {torch['device']}, {torch['threads']} thread(s), "
                     "same weights, batch and Adam settings; each runtime in its own worker process, "
                     "alternating block by block")
    lines.append(
        f"timings: median [min-max] per call over {cfg['rounds']} interleaved rounds after warm-up "
        f"(forward {cfg['forward_iterations']} calls, step {cfg['step_iterations']} calls per variant); "
        "a ratio is the median over rounds of the two variants' per-round ratio (same round, same machine load)"
    )
    return lines


def model_section(name: str, res: dict[str, Any]) -> list[str]:
    m = res["models"][name]
    torch = res.get("compare", {}).get("torch", {}).get("models", {}).get(name)
    p, mem = m["params"], m["memory_bytes"]
    full = p["full"]
    lines = ["", f"📊 {name.capitalize()} model: {' → '.join(map(str, m['dims']))} "
                 f"(batch {m['batch_size']}, float32, LoRA r={res['config']['rank']} alpha={res['config']['alpha']:g} "
                 "on every Linear)", ""]
    lines += [
        "  Parameters (counted from the live arrays):",
        f"    Full model:           {full:>11,}",
        f"    LoRA total:           {p['lora_total']:>11,}",
        f"    LoRA trainable:       {p['lora_trainable']:>11,}  ({p['lora_trainable'] / full:.2%} of full)",
        f"    LoRA frozen:          {p['lora_frozen']:>11,}  ({p['lora_frozen'] / full:.2%} of full)",
        "",
        "  Memory (read from the arrays):",
        f"    Full model (fp32):    {fmt_bytes(mem['full_fp32']):>11}",
        f"    LoRA total:           {fmt_bytes(mem['lora_total']):>11}",
        f"    LoRA trainable:       {fmt_bytes(mem['lora_trainable']):>11}  (only these get gradients)",
        "    Gradients after a backward pass:",
        f"      Full fine-tuning:   {fmt_bytes(mem['grad_full']):>11}",
        f"      LoRA:               {fmt_bytes(mem['grad_lora']):>11}  ({_saving(mem['grad_lora'], mem['grad_full'])})",
        "    Adam state:",
        f"      Full fine-tuning:   {fmt_bytes(mem['optimizer_full']):>11}",
        f"      LoRA:               {fmt_bytes(mem['optimizer_lora']):>11}  ({_saving(mem['optimizer_lora'], mem['optimizer_full'])})",
        f"    Peak of one training step ({m['peak_method']}; activations, gradients, temporaries):",
    ]
    for k in ("full", "lora", "dora", "qlora"):
        v = mem.get(f"peak_step_{k}")
        note = m.get("skipped", {}).get(k)
        lines.append(f"      {STEP_LABELS[k] + ':':<19} {fmt_bytes(v) if v is not None else '(' + str(note) + ')':>11}")
    lines.append("    Frozen base in 4 bits (NF4, block 64; biases stay fp32):")
    if mem.get("base_nf4") is None:
        lines.append("      (not in these results)")  # a --json file written without them
    else:
        lines.append(f"      NF4:                {fmt_bytes(mem['base_nf4']):>11}  ({mem['base_nf4'] / mem['full_fp32']:.1%} of fp32)")
        lines.append(f"      NF4 + double quant: {fmt_bytes(mem['base_nf4_dq']):>11}  ({mem['base_nf4_dq'] / mem['full_fp32']:.1%} of fp32)")
        lines.append(f"      + LoRA adapters:    {fmt_bytes(mem['base_nf4_dq'] + mem['lora_trainable']):>11}  "
                     f"({1 - (mem['base_nf4_dq'] + mem['lora_trainable']) / mem['full_fp32']:.1%} "
                     "smaller than the fp32 model)")
        if mem.get("qlora_total") is not None:
            lines.append(f"      QLoRA model, live:  {fmt_bytes(mem['qlora_total']):>11}  (every parameter and buffer "
                         "of the built QLoRA model)")
    cfg = res["config"]
    lines += ["", f"  Forward pass, inference ({cfg['forward_iterations']} calls per variant):"]
    lines += _timing_rows(m["forward_ms"], m["ratios"]["forward_vs_full"], FORWARD_LABELS, m.get("skipped", {}),
                          torch and torch["forward_ms"], torch and torch["ratio"]["forward_ms"], source=_FWD_SOURCE)
    lines += ["", f"  Training step: forward + loss + backward + Adam ({cfg['step_iterations']} steps per variant):"]
    lines += _timing_rows(m["train_step_ms"], m["ratios"]["train_step_vs_full"], STEP_LABELS, m.get("skipped", {}),
                          torch and torch["train_step_ms"], torch and torch["ratio"]["train_step_ms"])
    lora = m["train_step_ms"]["lora"]["median"]
    for k in ("dora", "qlora"):
        if k in m["train_step_ms"]:
            lines.append(f"    {STEP_LABELS[k]} step / LoRA step: {m['ratios']['train_step_vs_lora'][k]:.2f}x")
    ref, eo = m["reference_step_ms"], m["engine_overhead"]
    lines += [
        "",
        "  Engine overhead: the same steps written by hand in plain array code (no autograd), interleaved above:",
        f"    Full step, engine:            {fmt_stats(m['train_step_ms']['full'])}",
        f"    Full step, by hand:           {fmt_stats(ref['hand_full'])}   engine / hand: "
        f"{fmt_ratio(eo['full_step_engine_over_hand'])}  (target <= 1.15)",
        f"    LoRA step, by hand (floor):   {fmt_stats(ref['hand_lora'])}   engine LoRA step / floor: "
        f"{fmt_ratio(eo['lora_step_engine_over_hand'])}  ({lora:.3f} ms)",
    ]
    return lines


_FWD_SOURCE = {"lora_unmerged": "lora", "lora_merged": "lora"}


def _timing_rows(ours: dict[str, Any], vs_full: dict[str, Any], labels: dict[str, str], skipped: dict[str, str],
                 torch: dict[str, Any] | None, vs_torch: dict[str, Any] | None,
                 source: dict[str, str] | None = None) -> list[str]:
    head = f"    {'':<20} {'ours (ms)':<26} {'vs full':>7}"
    if torch is not None:
        head += f"   {'PyTorch (ms)':<26} {'ours/torch':>10}"
    rows = [head]
    for k, label in labels.items():
        if k not in ours:
            note = skipped.get((source or {}).get(k, k)) or skipped.get(k) or "not measured"
            rows.append(f"    {label + ':':<20} ({note})")
            continue
        row = f"    {label + ':':<20} {fmt_stats(ours[k], ''):<26} {fmt_ratio(vs_full.get(k)):>7}"
        if torch is not None:
            if k in torch:
                row += f"   {fmt_stats(torch[k], ''):<26} {fmt_ratio(vs_torch.get(k)):>10}"
            else:
                row += "   (not compared)"
        rows.append(row)
    return rows


def _saving(small: int, big: int) -> str:
    if not big:
        return "n/a"
    return f"{1 - small / big:.1%} less"


def quant_section(res: dict[str, Any]) -> list[str]:
    q = res["quant"]
    lines = ["", "🧮 NF4 quantization throughput (block 64, double quant; GB/s of float32 weights):"]
    if "skipped" in q:
        return lines + [f"    ({q['skipped']})"]
    lines.append(f"    {'shape':<12} {'quantize (GB/s)':<28} {'dequantize (GB/s)':<28}")
    for label in q["quantize_gbps"]:
        lines.append(f"    {label:<12} {fmt_stats(q['quantize_gbps'][label], ''):<28} "
                     f"{fmt_stats(q['dequantize_gbps'][label], ''):<28}")
    return lines


def epoch_section(res: dict[str, Any]) -> list[str]:
    e = res["epoch"]
    lines = ["", f"⏱  One epoch of `cli.py train` ({e['samples']:,} MNIST images, batch {e['batch_size']}, Adam lr "
                 f"{e['lr']:g}; the real training loop, evaluation excluded; {e['rounds']} interleaved round(s)):"]
    head = f"    {'method':<8} {'ours (s)':<24}"
    has_torch = any("torch_s" in v for v in e["methods"].values())
    if has_torch:
        head += f" {'PyTorch (s)':<24} {'ours/torch':>10}"
    lines.append(head)
    for method, v in e["methods"].items():
        row = f"    {method:<8} {fmt_stats(v['ours_s'], ''):<24}"
        if "torch_s" in v:
            row += f" {fmt_stats(v['torch_s'], ''):<24} {fmt_ratio(v['ratio']):>10}"
        lines.append(row)
    return lines


def targets(res: dict[str, Any], baseline: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each speed target with its measured value, for each model it was set for.

    Under ``--load`` two more kinds: the slowest round of each of our rows over that row's median, and,
    given the ``baseline`` results of a quiet run, each ours / PyTorch ratio over its quiet value.
    """
    out: list[dict[str, Any]] = []
    torch = res.get("compare", {}).get("torch", {}).get("models", {})
    for name, m in res["models"].items():
        here = {**m, "torch": torch.get(name, {})}
        out.extend(_target(name, t.what, t.limit, _dig(here, t.path), _dig(here, t.quartiles))
                   for t in TARGETS if t.models is None or name in t.models)
    e = res.get("epoch", {}).get("methods", {})
    for t in EPOCH_TARGETS:
        v = _dig(e, t.path)
        if v is not None:
            out.append(_target("small", t.what, t.limit, v, _dig(e, t.quartiles)))
    if res.get("config", {}).get("load"):
        for name, m in res["models"].items():
            for section, rows in m.get("worst_round_over_median", {}).items():
                for k, v in rows.items():
                    out.append(_target(name, f"slowest round / median, ours {section.replace('_', ' ')} {k}",
                                       LOAD_WORST_ROUND, v, kind="load"))
        for method, v in e.items():
            rounds = v.get("ours_rounds") or []
            if rounds:
                med = statistics.median(rounds)
                out.append(_target("small", f"slowest round / median, ours epoch {method}", LOAD_WORST_ROUND,
                                   round(max(rounds) / med, 3), kind="load"))
        if baseline is not None:
            quiet = quiet_ratios(baseline)
            for t in list(out):
                q = quiet.get((t["model"], t["what"]))
                if "PyTorch" in t["what"] and t["value"] is not None and q:
                    out.append(_target(t["model"], f"{t['what']}: under load / quiet ({q:.3f})", LOAD_RATIO_DRIFT,
                                       round(t["value"] / q, 4), kind="load"))
    return out


def quiet_ratios(baseline: dict[str, Any]) -> dict[tuple[str, str], Any]:
    """(model, what) -> the value of each ours / PyTorch target in a quiet run's results (``--baseline``).

    Reads the same places ``targets`` reads, and only those: ``baseline_problem`` checks exactly them.
    """
    out: dict[tuple[str, str], Any] = {}
    torch = baseline.get("compare", {}).get("torch", {}).get("models", {})
    for name, m in baseline["models"].items():
        here = {**m, "torch": torch.get(name, {})}
        for t in TARGETS:
            if "PyTorch" in t.what and (t.models is None or name in t.models):
                out[(name, t.what)] = _dig(here, t.path)
    e = baseline.get("epoch", {}).get("methods", {})
    for t in EPOCH_TARGETS:
        if "PyTorch" in t.what:
            out[("small", t.what)] = _dig(e, t.path)
    return out


def baseline_problem(baseline: Any) -> str | None:
    """Why ``baseline`` (a user's file, parsed) cannot serve as ``--baseline``, or None when it can.

    Checked when the file is read, before the run: every section ``quiet_ratios`` reads is an object and every
    ratio it finds a positive finite number (or absent), so nothing about the file can fail after the run.
    """
    if not isinstance(baseline, dict) or baseline.get("format") != BENCH_FORMAT:
        return "not a bench --json file"
    models = baseline.get("models")
    if not isinstance(models, dict) or not models or not all(isinstance(m, dict) for m in models.values()):
        return "'models' must map each benchmarked model to its results"
    compare = baseline.get("compare", {})
    torch = compare.get("torch", {}) if isinstance(compare, dict) else None
    torch_models = torch.get("models", {}) if isinstance(torch, dict) else None
    for where, section in (("compare", compare), ("compare.torch", torch), ("compare.torch.models", torch_models),
                           ("epoch", baseline.get("epoch", {}))):
        if not isinstance(section, dict):
            return f"'{where}' must be an object"
    for (model, what), value in quiet_ratios(baseline).items():
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and value > 0):
            return f"[{model}] {what}: the ratio must be a positive number, got {value!r}"
    return None


def _dig(tree: Any, path: tuple[str, ...]) -> float | None:
    """tree[path[0]][path[1]]...; None where a key (or a whole section) is missing."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _target(model: str, what: str, limit: float, value: float | None, quartiles: list[float] | None = None,
            kind: str = "quiet") -> dict[str, Any]:
    """One target: ``kind`` "quiet" (set for a quiet machine) or "load" (what a busy machine must still keep).

    ``met`` is judged on the value (a median); ``quartiles``, where measured, are the middle half of the
    rounds behind it, and ``close`` says the limit lies inside them: another run may well judge the other way.
    """
    close = None if not quartiles else bool(quartiles[0] <= limit <= quartiles[1])
    return {"model": model, "what": what, "limit": limit, "value": value, "kind": kind,
            "met": None if value is None else bool(value <= limit), "quartiles": quartiles, "close": close}


def missed(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets measured and not met: what ``bench --check`` fails on.

    Under ``--load`` only the load criteria count (each ratio within 1.25x of its quiet value, no round past
    3x its median): the quiet targets are then reported, but a machine made busy on purpose is not expected
    to meet them, and a guard that always fails guards nothing."""
    ts = res.get("targets", [])
    if res.get("config", {}).get("load"):
        ts = [t for t in ts if t.get("kind") == "load"]
    return [t for t in ts if t["met"] is False]


def targets_section(res: dict[str, Any]) -> list[str]:
    load = res["environment"].get("load")
    under = f", under a load of {load['processes']} CPU-bound process(es)" if load else ""
    lines = ["", f"🎯 Speed targets (ratios measured side by side in this run{under}):"]
    if load:
        lines.append("    (the quiet targets are shown for reference; under --load, --check holds the load criteria only)")
    for t in res["targets"]:
        if t["value"] is None:
            mark, value = "·", "not measured" + (" (needs --compare torch)" if "PyTorch" in t["what"] else "")
        else:
            mark, value = ("✓" if t["met"] else "✗"), f"{t['value']:.3f}x"
            q = t.get("quartiles")
            if q:
                value += f" (rounds' middle half {q[0]:.3f}-{q[1]:.3f}{', the limit inside it' if t.get('close') else ''})"
        lines.append(f"    {mark} [{t['model']}] {t['what']}: {value} (target <= {t['limit']:g}x)")
    end = res["environment"].get("load_average_end")
    if end:
        lines.append(f"machine load average at end: {' '.join(map(str, end))}")
    layer = res["environment"].get("numba_threading_layer")
    if layer:
        lines.append(f"Numba parallel kernels ran on: {layer}")
    return lines


def plot(res: dict[str, Any], path: str) -> None:
    """Bar charts of the forward and training-step medians (min-max as error bars), PyTorch beside ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in res.get("config", {}).get("models", []) if n in res["models"]] or list(res["models"])
    torch = res.get("compare", {}).get("torch", {}).get("models", {})
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 3.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        m = res["models"][name]
        for col, (key, labels, title) in enumerate((("forward_ms", FORWARD_LABELS, "forward"),
                                                    ("train_step_ms", STEP_LABELS, "training step"))):
            ax = axes[row][col]
            ks = [k for k in labels if k in m[key]]
            xs = list(range(len(ks)))
            series = [("minitorch_peft", m[key])]
            if name in torch:
                series.append(("PyTorch", torch[name][key]))
            width = 0.8 / len(series)
            tallest = max((d[k]["median"] for _, d in series for k in ks if k in d), default=1.0)
            for i, (label, data) in enumerate(series):
                med = [data[k]["median"] if k in data else 0.0 for k in ks]
                lo = [data[k]["median"] - data[k]["min"] if k in data else 0.0 for k in ks]
                hi = [data[k]["max"] - data[k]["median"] if k in data else 0.0 for k in ks]
                ax.bar([x + i * width for x in xs], med, width, yerr=[lo, hi], capsize=3, label=label)
            ax.set_xticks([x + width * (len(series) - 1) / 2 for x in xs])
            ax.set_xticklabels([labels[k] for k in ks], rotation=15)
            ax.set_ylabel("ms per call (median, min-max)")
            ax.set_ylim(0, 2.5 * tallest)  # a busy moment's max would flatten every bar; its whisker is clipped
            ax.set_title(f"{name} {' → '.join(map(str, m['dims']))}: {title}")
            ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # as --json and --output do (outputs.check_output_file)
    fig.savefig(path, dpi=110)
    plt.close(fig)
