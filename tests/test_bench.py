"""cli.py bench: the JSON's shape and the invariants that hold whatever the timing; the references it
compares against (hand-written step, PyTorch models) compute what our engine computes. No timing thresholds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minitorch_peft.backend import get_backend
from minitorch_peft.bench import numpy_ref, runner, variants
from minitorch_peft.bench.timing import Stats, interleaved
from minitorch_peft.peft.model import lora_layers

from conftest import ROOT, assert_one_line_error, run_cli

SMALL = [784, 512, 256, 10]


def have(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------ the real command


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str]:
    """One `bench --quick --models small --json` run (with --compare torch when PyTorch is installed)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = ["bench", "--quick", "--models", "small", "--json", str(out)]
    if have("torch"):
        args += ["--compare", "torch"]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_params_are_counted_exactly(quick: tuple[dict, str]) -> None:
    p = quick[0]["models"]["small"]["params"]
    assert p == {"full": 535_818, "lora_total": 535_818 + 18_640, "lora_trainable": 18_640, "lora_frozen": 535_818}
    assert p["lora_trainable"] < p["lora_total"]


@pytest.mark.slow
def test_memory_invariants(quick: tuple[dict, str]) -> None:
    m = quick[0]["models"]["small"]["memory_bytes"]
    for key in ("full_fp32", "lora_total", "lora_trainable", "grad_full", "grad_lora", "optimizer_full",
                "optimizer_lora", "base_nf4", "base_nf4_dq", "peak_step_full", "peak_step_lora", "peak_step_qlora"):
        assert key in m, key
    assert m["full_fp32"] == 535_818 * 4 and m["lora_trainable"] == 18_640 * 4
    assert m["lora_total"] == m["full_fp32"] + m["lora_trainable"]
    assert m["grad_full"] == m["full_fp32"]  # every parameter got a float32 gradient
    assert m["grad_lora"] == m["lora_trainable"] < m["grad_full"]  # only the adapters did
    assert m["optimizer_full"] == 2 * m["grad_full"] and m["optimizer_lora"] == 2 * m["grad_lora"]  # Adam: m and v
    assert m["base_nf4_dq"] < m["base_nf4"] < m["full_fp32"]
    assert 0 < m["peak_step_lora"] < m["peak_step_full"]
    if m["peak_step_qlora"] is not None:
        assert m["peak_step_qlora"] > 0
        assert m["base_nf4_dq"] < m["qlora_total"] < m["full_fp32"] / 4  # live 4-bit model: base + biases + adapters


def _is_stats(s: object) -> bool:
    return (isinstance(s, dict) and set(s) == {"median", "min", "max"}
            and 0 < s["min"] <= s["median"] <= s["max"])


@pytest.mark.slow
def test_timing_maps(quick: tuple[dict, str]) -> None:
    res = quick[0]
    m = res["models"]["small"]
    skipped = m.get("skipped", {})
    for k in ("full", "lora_unmerged", "lora_merged", "dora", "qlora"):
        src = {"lora_unmerged": "lora", "lora_merged": "lora"}.get(k, k)
        assert _is_stats(m["forward_ms"][k]) if src not in skipped else k not in m["forward_ms"], k
    for k in ("full", "lora", "dora", "qlora"):
        assert _is_stats(m["train_step_ms"][k]) if k not in skipped else k not in m["train_step_ms"], k
    assert all(_is_stats(s) for s in m["reference_step_ms"].values()) and set(m["reference_step_ms"]) == {"hand_full", "hand_lora"}
    assert m["ratios"]["forward_vs_full"]["full"] == 1.0
    assert m["engine_overhead"]["full_step_engine_over_hand"] > 0
    q = res["quant"]
    for op in ("quantize_gbps", "dequantize_gbps"):
        assert set(q[op]) == {"4096x4096", "2048x784"} and all(_is_stats(s) for s in q[op].values())
    env = res["environment"]
    assert env["backend"] == "numpy" and env["threads"] >= 1 and env["cpu"] and env["numpy"] and env["blas"]
    assert any(t["what"].startswith("engine full step") for t in res["targets"])


@pytest.mark.skipif(not have("torch"), reason="PyTorch not installed")
@pytest.mark.slow
def test_compare_torch_maps(quick: tuple[dict, str]) -> None:
    res, stdout = quick
    t = res["compare"]["torch"]
    assert t["threads"] == res["environment"]["threads"]
    s = t["models"]["small"]
    assert set(s["forward_ms"]) == {"full", "lora_unmerged", "lora_merged", "dora"} - set(res["models"]["small"].get("skipped", {}))
    assert set(s["train_step_ms"]) == {"full", "lora", "dora"} - set(res["models"]["small"].get("skipped", {}))
    assert all(_is_stats(v) for v in list(s["forward_ms"].values()) + list(s["train_step_ms"].values()))
    for kind in ("forward_ms", "train_step_ms"):
        assert set(s["ratio"][kind]) == set(s[kind]) and all(r > 0 for r in s["ratio"][kind].values())
    assert "ours/torch" in stdout


@pytest.mark.slow
def test_report_sections(quick: tuple[dict, str]) -> None:
    out = quick[1]
    for needle in ("Parameters", "Memory", "Forward pass", "Training step", "Engine overhead", "NF4 quantization",
                   "535,818", "18,640", "Speed targets"):
        assert needle in out, needle


@pytest.mark.slow
def test_each_step_target_reads_its_own_measured_ratio(quick: tuple[dict, str]) -> None:
    res = quick[0]
    m = res["models"]["small"]
    got = {t["what"]: t["value"] for t in res["targets"] if t["model"] == "small"}
    assert got["QLoRA forward / full forward"] == m["ratios"]["forward_vs_full"]["qlora"]
    assert got["QLoRA step / LoRA step"] == m["ratios"]["train_step_vs_lora"]["qlora"]
    assert got["LoRA unmerged forward / full forward"] == m["ratios"]["forward_vs_full"]["lora_unmerged"]
    assert len({t["what"] for t in res["targets"]}) == len(res["targets"])  # no row twice for one model
    # every target finds its value in a real run's results (the PyTorch ones where PyTorch is installed)
    missing = [t["what"] for t in res["targets"] if t["value"] is None and (have("torch") or "PyTorch" not in t["what"])]
    assert missing == []
    # and the middle half of its rounds, around it
    for t in res["targets"]:
        if t["value"] is not None:
            q1, q3 = t["quartiles"]
            assert q1 <= t["value"] <= q3, t
            assert t["close"] == (q1 <= t["limit"] <= q3)
    assert "rounds' middle half" in quick[1]


# ------------------------------------------------------------------------------------ errors


@pytest.mark.slow
def test_compare_torch_without_torch_is_one_line(tmp_path: Path) -> None:
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('No module named torch')\n")
    proc = run_cli("bench", "--quick", "--models", "small", "--compare", "torch",
                   env={"PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert_one_line_error(proc, "needs PyTorch")


@pytest.mark.skipif(not have("torch"), reason="PyTorch not installed")
def test_gpu_backend_with_cpu_only_torch_skips_the_comparison() -> None:
    import torch

    from minitorch_peft.bench import report, torch_ref

    device, why = torch_ref.torch_device("cuda")
    if torch.cuda.is_available():
        assert (device, why) == ("cuda", None)
        return
    assert device is None and "no CUDA" in why
    res = {"compare": {"torch": {"skipped": why}}, "config": {"rounds": 1, "forward_iterations": 1, "step_iterations": 1},
           "environment": {"backend": "cupy", "numpy": "x", "blas": {}, "threads": 1, "threads_source": "t", "cpu": "c"}}
    assert any("comparison skipped" in line for line in report.header(res))


@pytest.mark.slow
def test_bad_flags_are_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("bench", "--models", "huge"), "unknown model")
    assert_one_line_error(run_cli("bench", "--epoch", "--data-dir", str(tmp_path)), "not found")  # before any timing
    assert_one_line_error(run_cli("bench", "--compare", "jax"), "--compare")
    assert_one_line_error(run_cli("bench", "--rounds", "0"), "--rounds")
    assert_one_line_error(run_cli("bench", "--threads", "0"), "--threads")
    assert_one_line_error(run_cli("bench", "--load", "-1"), "--load")
    assert_one_line_error(run_cli("bench", "--baseline", str(tmp_path / "none.json")), "none.json")


@pytest.mark.skipif(have("matplotlib"), reason="matplotlib is installed")
@pytest.mark.slow
def test_plot_without_matplotlib_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("bench", "--quick", "--plot", str(tmp_path / "b.png")), "matplotlib")


@pytest.mark.skipif(not have("matplotlib"), reason="matplotlib not installed")
def test_plot_writes_png(tmp_path: Path) -> None:
    from minitorch_peft.bench.report import plot

    s = {"median": 1.0, "min": 0.9, "max": 1.2}
    res = {"models": {"small": {"dims": SMALL, "forward_ms": {"full": s, "lora_unmerged": s},
                                "train_step_ms": {"full": s, "lora": s}}},
           "compare": {"torch": {"models": {"small": {"forward_ms": {"full": s}, "train_step_ms": {"lora": s}}}}}}
    plot(res, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ the references


def _engine_and_hand(kind: str) -> tuple[variants.Variant, numpy_ref.HandMLP]:
    be = get_backend("numpy")
    v = variants.build(kind, SMALL, be, seed=3)
    full = variants.build("full", SMALL, be, seed=3).model
    hands = runner._hand_models(full, v.model if kind == "lora" else variants.build("lora", SMALL, be, 3).model, be)
    return v, hands[kind]


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_hand_written_step_does_the_engines_arithmetic(kind: str) -> None:
    v, hand = _engine_and_hand(kind)
    x, y, xh, yh = variants.batch(SMALL, 64, get_backend("numpy"), seed=5)
    step = variants.step_call(v, x, y)
    for _ in range(3):
        loss = step()
        hand_loss = hand.step(xh, yh)
        np.testing.assert_allclose(float(loss.data), float(hand_loss), rtol=1e-5)
    ours = [p.data for p in v.optimizer.param_groups[0]["params"]]
    assert len(ours) == len(hand.opt.params)
    for a, b in zip(ours, hand.opt.params):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # Adam turns tiny gradient rounding into up to lr-sized steps
    np.testing.assert_allclose(variants.forward_call(v.model, x)().data, hand.forward(xh), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not have("torch"), reason="PyTorch not installed")
@pytest.mark.parametrize("kind", ["full", "lora", "lora_merged", "dora"])
@pytest.mark.slow
def test_torch_models_compute_what_ours_compute(kind: str) -> None:
    import torch

    from minitorch_peft.bench import torch_ref

    be = get_backend("numpy")
    v = variants.build("lora" if kind == "lora_merged" else kind, SMALL, be, seed=7)
    if not v.available:
        pytest.skip(v.note)
    x, y, xh, yh = variants.batch(SMALL, 16, be, seed=1)
    tmodel, topt = torch_ref.build_model(v.model, kind, "cpu")
    ours = variants.forward_call(v.model, x)().data
    with torch.no_grad():
        theirs = tmodel(torch.from_numpy(xh)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    if kind == "lora_merged":
        return
    loss = variants.step_call(v, x, y)()  # one training step each: same loss, same updated outputs
    tloss = torch_ref.step_call(tmodel, topt, torch.from_numpy(xh), torch.from_numpy(yh))()
    np.testing.assert_allclose(float(loss.data), float(tloss.detach()), rtol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(variants.forward_call(v.model, x)().data, tmodel(torch.from_numpy(xh)).numpy(),
                                   rtol=1e-3, atol=1e-4)
    n_ours = sum(p.size for p in v.model.parameters() if p.requires_grad)
    assert n_ours == sum(p.numel() for p in tmodel.parameters() if p.requires_grad)


def test_a_missing_method_is_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    real = variants.inject_adapters

    def no_qlora(model, config, **kw):
        if kw.get("quantize"):
            raise ModuleNotFoundError("No module named 'minitorch_peft.peft.qlora'")
        return real(model, config, **kw)

    monkeypatch.setattr(variants, "inject_adapters", no_qlora)
    v = variants.build("qlora", SMALL, get_backend("numpy"), 0)
    assert not v.available and v.note == "not available: No module named 'minitorch_peft.peft.qlora'"
    assert variants.build("lora", SMALL, get_backend("numpy"), 0).available
    with pytest.raises(ModuleNotFoundError):  # the methods every section needs are never skipped
        monkeypatch.setattr(variants, "inject_adapters", lambda *a, **k: (_ for _ in ()).throw(ModuleNotFoundError("x")))
        variants.build("lora", SMALL, get_backend("numpy"), 0)


def test_merged_variant_matches_unmerged() -> None:
    be = get_backend("numpy")
    x, *_ = variants.batch(SMALL, 8, be, seed=2)
    a = variants.forward_call(variants.build("lora", SMALL, be, 4).model, x)().data
    b = variants.forward_call(variants.build("lora_merged", SMALL, be, 4).model, x)().data
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    layer = next(lora_layers(variants.build("lora", SMALL, be, 4).model))[1]
    assert np.abs(layer.lora_B[layer.active_adapter].data).max() > 0  # adapters really act in the benchmark


# ------------------------------------------------------------------------------------ timing


def test_interleaved_runs_every_case_the_same_number_of_times() -> None:
    calls: list[str] = []
    stats = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                        iterations=12, rounds=3, warmup=2)
    assert calls.count("a") == calls.count("b") == 2 + 12
    assert calls[4:8] == ["a"] * 4 and calls[8:12] == ["b"] * 4  # round 0: a then b
    assert calls[12:16] == ["b"] * 4  # round 1 starts with b: the order rotates
    assert all(isinstance(s, Stats) and len(s.rounds) == 3 and s.min <= s.median <= s.max for s in stats.values())


def test_interleaved_pauses_only_when_the_thread_pool_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from minitorch_peft.bench import timing

    pauses: list[float] = []
    monkeypatch.setattr(timing.time, "sleep", pauses.append)
    cases = {"a": lambda: None, "b": lambda: None, "t": lambda: None}
    interleaved(cases, iterations=3, rounds=3, warmup=0, pools={"a": "np", "b": "np", "t": "torch"}, switch_pause=0.5)
    # blocks: a b t | b t a | t a b -> a pool switch before t; b, t, a; t, a
    assert pauses == [0.5] * 6


def test_ratio_pairs_rounds() -> None:
    from minitorch_peft.bench.timing import ratio

    a, b = Stats.of([1.0, 10.0, 10.0]), Stats.of([2.0, 2.0, 20.0])  # round 2 was busy for a, round 3 for both
    assert ratio(a, b) == 0.5  # per-round ratios 0.5, 5, 0.5; the ratio of medians would say 5
    assert ratio(a, Stats.of([4.0])) == 2.5  # rounds that do not pair: ratio of medians
    assert ratio(a, None) is None


def test_ratio_quartiles_are_the_middle_half_of_the_per_round_ratios() -> None:
    from minitorch_peft.bench.timing import ratio, ratio_quartiles

    a, b = Stats.of([1.0, 2.0, 3.0, 4.0, 5.0]), Stats.of([1.0, 1.0, 1.0, 1.0, 1.0])
    assert ratio_quartiles(a, b) == (2.0, 4.0) and ratio(a, b) == 3.0
    a = Stats.of([10.0, 1.0, 6.0, 3.0, 8.0])  # order of rounds does not matter, their pairing does
    assert ratio_quartiles(a, Stats.of([2.0, 1.0, 2.0, 1.0, 2.0])) == (3.0, 4.0)  # ratios 5 1 3 3 4
    assert ratio_quartiles(a, Stats.of([4.0])) is None  # rounds that do not pair: no spread to give
    assert ratio_quartiles(Stats.of([1.0]), Stats.of([2.0])) is None  # one round
    assert ratio_quartiles(a, None) is None


def test_a_target_whose_limit_lies_inside_its_rounds_is_marked_close() -> None:
    from minitorch_peft.bench import report

    near = report._target("small", "x / y", 1.3, 1.28, [1.22, 1.35])
    far = report._target("small", "x / y", 1.3, 1.1, [1.05, 1.15])
    assert near["met"] and near["close"] and far["met"] and not far["close"]
    assert report._target("small", "x / y", 1.3, 1.28)["close"] is None  # no rounds to judge by


def test_each_target_is_held_for_the_models_it_was_set_for() -> None:
    """The ours / PyTorch step targets were set for the small MLP; the rest hold for every model benchmarked."""
    from minitorch_peft.bench import report

    rows = {(t["model"], t["what"]) for t in report.targets({"models": {"small": {}, "medium": {}}, "config": {}})}
    small_only = {t.what for t in report.TARGETS if t.models == ("small",)}
    assert small_only == {"LoRA step / PyTorch LoRA step", "full step / PyTorch full step"}
    for t in report.TARGETS:
        assert ("small", t.what) in rows
        assert (("medium", t.what) in rows) == (t.what not in small_only)


def test_peak_step_bytes_counts_numpy_allocations() -> None:
    be = get_backend("numpy")
    n = variants.peak_step_bytes(lambda: np.ones(1 << 20, dtype=np.float32).sum(), be)
    assert 4 << 20 <= n < 5 << 20


# ------------------------------------------------------------------------------------ worker processes


@pytest.mark.slow
def test_worker_protocol(tmp_path: Path) -> None:
    from minitorch_peft.bench.worker import Worker, WorkerCrash

    with Worker("ours") as w:
        hello = w.call("hello")
        assert hello["side"] == "ours" and hello["pid"] == w.pid != os.getpid() and not hello["torch_imported"]
        res = w.call("model", name="small", batch_size=8, seed=0, spec_dir=str(tmp_path))
        assert res["params"]["full"] == 535_818 and res["dims"] == SMALL
        assert {"fwd:full", "fwd:lora_unmerged", "step:full", "step:lora", "hand:full", "hand:lora"} <= set(res["cases"])
        w.call("warmup", case="step:lora", n=1)
        ms = w.call("run", case="step:lora", n=2)
        assert isinstance(ms, float) and ms > 0
        # the weights and the batch for the PyTorch worker, as files
        assert {"batch.npz", "full.npz", "lora.npz"} <= {p.name for p in tmp_path.iterdir()}
        with pytest.raises(WorkerCrash, match="KeyError"):
            w.call("run", case="no-such-case", n=1)
        with pytest.raises(WorkerCrash, match="op_nope"):
            w.call("nope")
        assert w.call("hello")["pid"] == w.pid  # a failed request leaves the worker serving
    assert w.proc.returncode == 0  # "exit" ends it cleanly


@pytest.mark.slow
def test_worker_reports_project_errors_as_one_line(tmp_path: Path) -> None:
    from minitorch_peft.bench.worker import Worker, WorkerError

    with Worker("ours") as w, pytest.raises(WorkerError, match="not found"):
        w.call("epoch", method="lora", batch_size=64, data_dir=str(tmp_path))


def _blas_threads(hello: dict) -> set[int]:
    return {p["num_threads"] for p in hello["threadpools"] if p["user_api"] == "blas"}


@pytest.mark.slow
def test_threads_are_applied_inside_the_worker() -> None:
    from minitorch_peft.bench.worker import Worker

    with Worker("ours", threads=1) as w:
        hello = w.call("hello")
    assert _blas_threads(hello) == {1} and hello["blas_policy"]["threads"] == 1


@pytest.mark.skipif(not have("torch"), reason="PyTorch not installed")
@pytest.mark.slow
def test_torch_worker_threads_and_models(tmp_path: Path) -> None:
    from minitorch_peft.bench.worker import Worker

    with Worker("ours") as ours:
        kinds = ours.call("model", name="small", batch_size=8, seed=0, spec_dir=str(tmp_path))["torch_kinds"]
    with Worker("torch", threads=1) as w:
        hello = w.call("hello")
        assert hello["threads"] == 1 and {p["num_threads"] for p in hello["threadpools"]} == {1}
        cases = w.call("model", spec_dir=str(tmp_path), kinds=kinds)
        assert {"fwd:full", "fwd:lora_unmerged", "fwd:lora_merged", "step:full", "step:lora"} <= set(cases)
        assert w.call("run", case="step:full", n=2) > 0


@pytest.mark.slow
def test_the_parent_never_imports_torch(tmp_path: Path) -> None:
    """The coordinating process stays free of PyTorch's thread pool, with or without --compare torch."""
    compare = "['torch']" if have("torch") else "[]"
    code = (
        "import sys\n"
        "from minitorch_peft.bench import BenchConfig, run\n"
        f"res = run(BenchConfig(models=['small'], quick=True, compare={compare}, forward_iters=2, step_iters=2,"
        " rounds=1), log=lambda _l: None)\n"
        "assert 'torch' not in sys.modules, 'the parent imported torch'\n"
        "w = res['workers']\n"
        "assert w['ours']['pid'] != w.get('torch', {}).get('pid')\n"
        "print('ok', sorted(w))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and ("'torch'" in proc.stdout) == have("torch")


@pytest.mark.slow
def test_quick_json_records_the_workers_and_the_policy(quick: tuple[dict, str]) -> None:
    res = quick[0]
    assert res["version"] == 2 and res["config"]["load"] == 0 and res["environment"]["load"] is None
    ours = res["workers"]["ours"]
    assert not ours["torch_imported"] and ours["blas_policy"]["threads"] == res["environment"]["threads"]
    if have("torch"):
        assert res["workers"]["torch"]["pid"] != ours["pid"] and res["workers"]["torch"]["torch_imported"]
    spread = res["models"]["small"]["worst_round_over_median"]
    assert set(spread["train_step"]) == set(res["models"]["small"]["train_step_ms"])
    assert all(v >= 1.0 for v in spread["train_step"].values())


# ------------------------------------------------------------------------------------ --load


def test_busy_load_is_stopped_however_the_block_ends() -> None:
    from minitorch_peft.bench.load import BusyLoad, alive

    with BusyLoad(2) as load:
        pids = load.pids
        assert len(pids) == 2 and alive(pids, wait=0) == pids
        assert len({os.getpgid(p) for p in pids}) == 1  # one process group of their own
    assert alive(pids) == []
    with pytest.raises(RuntimeError), BusyLoad(1) as load:
        pids = load.pids
        raise RuntimeError("boom")
    assert alive(pids) == []


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
@pytest.mark.slow
def test_busy_load_does_not_survive_its_parent(how: str) -> None:
    """Ctrl-C and SIGTERM unwind and stop the load; after SIGKILL each load process notices and exits."""
    import signal

    from minitorch_peft.bench.load import alive

    code = ("import sys, time\nfrom minitorch_peft.bench.load import BusyLoad\n"
            "with BusyLoad(2) as load:\n    print(*load.pids, flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout is not None
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and alive(pids, wait=0) == pids
    proc.send_signal(getattr(signal, how))
    proc.wait(timeout=30)
    assert alive(pids, wait=10) == []


@pytest.mark.slow
def test_bench_under_load_says_so_and_cleans_up(tmp_path: Path) -> None:
    from minitorch_peft.bench.load import alive

    out = tmp_path / "b.json"
    proc = run_cli("bench", "--quick", "--models", "small", "--load", "1", "--forward-iters", "2", "--step-iters", "2",
                   "--rounds", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    load = res["environment"]["load"]
    assert load["processes"] == 1 and len(load["pids"]) == 1 and res["config"]["load"] == 1
    from minitorch_peft.bench.env import cpu_count

    # both sides get the CPUs the load leaves (the worker reports what it really set)
    assert res["environment"]["threads"] == max(1, cpu_count() - 1), res["environment"]
    assert "--load 1" in res["environment"]["threads_source"]
    assert "UNDER LOAD: 1 competing" in proc.stdout and "under a load of 1" in proc.stdout
    assert alive(load["pids"], wait=5) == []
    assert any(t["what"].startswith("slowest round / median, ours train step") for t in res["targets"])


def test_threads_under_load_are_the_cpus_the_load_leaves() -> None:
    from minitorch_peft.bench.runner import BenchConfig

    assert BenchConfig().threads_for(8) == (None, "threadpoolctl, in the worker")
    assert BenchConfig(load=3).threads_for(8)[0] == 5
    assert BenchConfig(load=2).threads_for(2)[0] == 1  # never below one thread
    assert BenchConfig(load=1, threads=2).threads_for(2) == (2, "--threads")  # the user's word wins


def test_busy_header_suggests_one_thread_only_where_more_are_used() -> None:
    from minitorch_peft.bench import report

    def header(threads: int) -> str:
        env = {"backend": "numpy", "numpy": "2", "threads": threads, "threads_source": "test", "cpu": "cpu",
               "cpu_count": 2, "load_average_start": [1.9, 1.0, 1.0]}
        cfg = {"rounds": 1, "forward_iterations": 1, "step_iterations": 1}
        return "\n".join(report.header({"environment": env, "config": cfg}))

    assert "the machine is busy" in header(1) and "--threads 1 avoids that" not in header(1)
    assert "--threads 1 avoids that" in header(2)


# ------------------------------------------------------------------------------------ --check


def _fake_results(value: float) -> dict:
    s = {"median": 1.0, "min": 1.0, "max": 1.0}
    m = {"ratios": {"forward_vs_full": {"lora_unmerged": value, "lora_merged": value},
                    "train_step_vs_lora": {"dora": value, "qlora": value}},
         "engine_overhead": {"full_step_engine_over_hand": value}, "forward_ms": {"full": s}, "train_step_ms": {"full": s}}
    return {"format": "minitorch_peft-bench", "config": {"load": 0}, "environment": {}, "models": {"small": m}}


@pytest.mark.parametrize("limit, code", [(0.5, 1), (2.0, 0)])
def test_check_exits_non_zero_when_a_target_is_missed(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                      limit: float, code: int) -> None:
    import minitorch_peft.bench as bench_pkg
    from minitorch_peft.bench import report

    from conftest import cli_main

    for table in ("TARGETS", "EPOCH_TARGETS"):  # a stubbed table
        monkeypatch.setattr(report, table, tuple(t._replace(limit=limit) for t in getattr(report, table)))

    def fake_run(cfg, log=print):
        res = _fake_results(1.0)
        res["targets"] = report.targets(res)
        return res

    monkeypatch.setattr(bench_pkg, "run", fake_run)
    rc, out, err = cli_main(capsys, "bench", "--check")
    assert rc == code
    assert ("target(s) missed" in err) == (code == 1) and ("every measured target met" in out) == (code == 0)
    rc, out, err = cli_main(capsys, "bench")  # without --check it stays a report
    assert rc == 0


def test_check_says_when_a_missed_limit_lies_inside_the_rounds(monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    import minitorch_peft.bench as bench_pkg
    from minitorch_peft.bench import report

    from conftest import cli_main

    def fake_run(cfg, log=print):
        res = _fake_results(1.0)
        res["models"]["small"]["ratios"]["train_step_vs_lora"]["qlora"] = 1.32
        res["models"]["small"]["ratio_quartiles"] = {"train_step_vs_lora": {"qlora": [1.25, 1.36]}}
        res["targets"] = report.targets(res)
        return res

    monkeypatch.setattr(bench_pkg, "run", fake_run)
    rc, out, err = cli_main(capsys, "bench", "--check")
    assert rc == 1
    assert "QLoRA step / LoRA step 1.320x > 1.3x (the limit lies inside its rounds' middle half: rerun to tell)" in err
    shown = "\n".join(report.targets_section(fake_run(None)))
    assert "✗ [small] QLoRA step / LoRA step: 1.320x (rounds' middle half 1.250-1.360, the limit inside it)" in shown


def test_baseline_holds_ratios_under_load_against_the_quiet_run() -> None:
    from minitorch_peft.bench import report

    def with_torch(r: float) -> dict:
        res = _fake_results(1.0)
        res["compare"] = {"torch": {"models": {"small": {"ratio": {"train_step_ms": {"lora": r, "full": r}}}}}}
        return res

    loaded = with_torch(0.65)
    loaded["config"]["load"] = 1
    loaded["models"]["small"]["worst_round_over_median"] = {"train_step": {"lora": 4.0}}
    ts = {t["what"]: t for t in report.targets(loaded, baseline=with_torch(0.5))}
    drift = ts["LoRA step / PyTorch LoRA step: under load / quiet (0.500)"]
    assert drift["value"] == 1.3 and drift["met"] is False  # 0.65 / 0.5 > 1.25
    assert ts["slowest round / median, ours train step lora"]["met"] is False  # 4x > 3x


@pytest.mark.parametrize("drift, code", [(0.6, 0), (0.7, 1)])
def test_check_under_load_holds_the_load_criteria_not_the_quiet_targets(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], drift: float, code: int) -> None:
    """Under --load the quiet targets are reported but not held: only drift from the quiet run fails --check."""
    import minitorch_peft.bench as bench_pkg
    from minitorch_peft.bench import report

    from conftest import cli_main

    for table in ("TARGETS", "EPOCH_TARGETS"):  # every quiet one missed
        monkeypatch.setattr(report, table, tuple(t._replace(limit=0.5) for t in getattr(report, table)))

    def with_torch(r: float) -> dict:
        res = _fake_results(1.0)
        res["compare"] = {"torch": {"models": {"small": {"ratio": {"train_step_ms": {"lora": r, "full": r}}}}}}
        return res

    def fake_run(cfg, log=print):
        res = with_torch(drift)
        res["config"]["load"] = 1
        res["targets"] = report.targets(res, baseline=with_torch(0.5))
        return res

    monkeypatch.setattr(bench_pkg, "run", fake_run)
    rc, out, err = cli_main(capsys, "bench", "--check")
    assert rc == code  # 0.6 / 0.5 = 1.2 is within 1.25x; 0.7 / 0.5 = 1.4 is not
    assert ("under load / quiet" in err) == (code == 1) and ("every measured load criterion met" in out) == (code == 0)
    assert "> 0.5x" not in err  # no quiet target among the failures


# ------------------------------------------------------------------------------------ thread control


def test_small_matmuls_run_on_one_thread_only_with_the_size_policy() -> None:
    from threadpoolctl import threadpool_info

    from minitorch_peft.kernels import threads

    def blas() -> set[int]:
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    assert threads.policy()["small_gemm"] is None  # off by default: measured slower (kernels/threads.py)
    with threads.limit(2):
        threads.for_gemm(64, 10, 256)
        assert blas() == {2}  # by default every product gets the budget
        threads.set_threads(2, size_policy=True)
        threads.for_gemm(64, 10, 256)
        assert blas() == {1}  # with the size policy a small product runs on one thread
        threads.for_gemm(64, 512, 784)
        assert blas() == {2}
    assert threads.policy()["small_gemm"] is None  # restored


def test_train_threads_flag_limits_blas_during_the_run(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from threadpoolctl import threadpool_info

    import minitorch_peft.train as train_mod

    from conftest import cli_main

    seen: list[set[int]] = []

    def fake_train(cfg, log=print, **kw):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return {}

    monkeypatch.setattr(train_mod, "train", fake_train)
    before = {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}
    rc, _, err = cli_main(capsys, "train", "--threads", "1")
    assert rc == 0, err
    assert seen == [{1}]
    assert {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} == before
    assert_one_line_error(cli_main(capsys, "train", "--threads", "0"), "--threads")


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (read from /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            kids.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc to find the child processes")
@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
@pytest.mark.slow
def test_ctrl_c_or_kill_ends_the_workers_and_the_load(how: str) -> None:
    """Ctrl-C unwinds (exit status 130); after SIGKILL the kernel ends the workers and the load processes
    notice their parent is gone."""
    import signal

    from minitorch_peft.bench.load import alive

    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "bench", "--models", "small", "--load", "1",
                             "--rounds", "50", "--step-iters", "5000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    assert proc.stdout is not None
    for line in proc.stdout:  # the header is printed once the workers run and the load has started
        if "UNDER LOAD" in line:
            break
    children = _children(proc.pid)
    assert len(children) >= 2  # the ours worker and the load process (and what they started)
    proc.send_signal(getattr(signal, how))
    _, err = proc.communicate(timeout=60)
    if how == "SIGINT":
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert alive(children, wait=10) == []
