#!/usr/bin/env bash
# gpu_check.sh - the CuPy backend's check on a GPU machine: offline, in one call that ends within 300 s.
#
# A GPU is lent for about 15 minutes in all (start-up included), so this check must work the first time,
# fail fast with one line naming what is missing, and leave room for a fix and a rerun.
#
# ---- Exact commands --------------------------------------------------------------------------------
# 1. HERE, after `pip install -e ".[test]"` into .venv (a few seconds; no network, no GPU):
#        bash scripts/gpu_check.sh --prepare
#    builds .whl/ (pure-Python wheels of pytest, pluggy, iniconfig, packaging, pygments, click and
#    array-api-strict, made from the versions installed in .venv, so any Python 3.10+ can import them)
#    and .gpu-data/mnist/ (MNIST, checksums verified; from $MINITORCH_PEFT_DATA, else ../shared/data),
#    and prints the carry list and its size. Both folders are git-ignored: they travel only if carried.
# 2. ON THE GPU MACHINE, with the `run` tool:
#        command:   bash scripts/gpu_check.sh
#        carry:     [".whl", ".gpu-data"]
#        timeout_s: 360   (the script stops itself at 300 s; the rest is margin)
#    It writes to $OUT (7 files; the tool returns at most 8): summary.txt (one line per phase, then
#    the total), summary.json, env.txt, smoke.log, pytest-cupy.log, train.log, logs.tar.gz.
# 3. OPTIONAL, a second call (the machine stays warm 30 s after the first): same carry, timeout_s 300,
#        command:   bash scripts/gpu_check.sh --bench
#    `cli.py bench --backend cupy --compare torch --quick` at batch 64 and 4096, within 240 s:
#    summary.txt, env.txt, bench-b64.log/.json, bench-b4096.log/.json.
#
# ---- Phases of the check, each under `timeout` (a phase gets its budget or what is left of 300 s) ----
#   setup    60 s  the machine's numpy, cupy and numba (numba-cuda) are there; the carried wheels are
#                  installed into a private folder (pip --no-index, or unzipped where pip is missing);
#                  every module the check uses imports, and so does every test module
#                  (pytest --collect-only); hypothesis is optional (tests importing it are not
#                  collected, with the reason shown; none of them has a GPU case); MNIST is present
#   smoke    45 s  scripts/gpu_smoke.py (expected under 30 s): a CUDA device, the cupy backend's
#                  start-up, NVVM/libdevice, a cuBLAS matmul, custom CuPy kernels (NVRTC + headers), a
#                  cuRAND draw, a numba.cuda launch on a CuPy array, a CuPy<->NumPy round trip. The
#                  first failure ends the whole run with one line: FAIL smoke: <piece>: <error>
#   tests   120 s  pytest -k "cupy or simulator": every test run through the backend fixture's cupy
#                  case, QLoRA on cupy, and the numba.cuda 4-bit kernels under Numba's simulator;
#                  meanwhile one NumPy epoch trains on the CPU (in the background, 200 s at most)
#   train    75 s  one epoch of `cli.py train --backend cupy` (LoRA, MNIST, batch 64, seed 42), then
#                  `infer` on cupy and on numpy from the GPU checkpoint
#   compare  10 s  the NumPy and CuPy test accuracies agree within 0.3 points; samples/s of both
#
# Environment: OUT (output folder; default ./tmp/gpu-check), PYTHON (default python3; for --prepare,
# .venv/bin/python when present), GPU_CHECK_BUDGET (seconds, default 300).
# Exit status: 0 when no phase failed, 1 when one did, 2 for a usage or preparation error.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

CARRIED_WHEELS="pytest pluggy iniconfig packaging pygments click array-api-strict"  # distributions
CARRIED_MODULES="pytest pluggy iniconfig packaging pygments click array_api_strict"   # their import names
DEVICE_MODULES="numpy cupy numba"        # the GPU machine's own (numba.cuda from numba-cuda)
PROJECT_MODULES="minitorch_peft minitorch_peft.cli minitorch_peft.bench minitorch_peft.kernels.quant minitorch_peft.kernels.quant_cuda"
CARRY='[".whl", ".gpu-data"]'

MODE="check"
case "${1:-}" in
    "") ;;
    --prepare) MODE="prepare" ;;
    --bench) MODE="bench" ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "usage: $0 [--prepare | --bench]   (no option: the check)" >&2; exit 2 ;;
esac

# ======================================================================================== --prepare
if [ "$MODE" = prepare ]; then
    PY="${PYTHON:-}"
    if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
    SECONDS=0
    rm -rf .whl.new
    # shellcheck disable=SC2086
    if ! "$PY" scripts/wheels_from_installed.py .whl.new $CARRIED_WHEELS; then rm -rf .whl.new; exit 2; fi
    rm -rf .whl && mv .whl.new .whl
    SRC="${MINITORCH_PEFT_DATA:-$ROOT/../shared/data}/mnist"
    for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
        if [ ! -f "$SRC/$f" ]; then
            echo "FAIL prepare: no MNIST file $SRC/$f - set MINITORCH_PEFT_DATA to the folder holding mnist/"
            exit 2
        fi
    done
    rm -rf .gpu-data && mkdir -p .gpu-data/mnist && cp "$SRC"/*.gz .gpu-data/mnist/ || exit 2
    if [ -f "$SRC/SHA256SUMS" ]; then
        cp "$SRC/SHA256SUMS" .gpu-data/mnist/
        if ! (cd .gpu-data/mnist && sha256sum --quiet -c SHA256SUMS); then
            echo "FAIL prepare: MNIST in $SRC does not match its SHA256SUMS"; exit 2
        fi
    fi
    if command -v git > /dev/null && git rev-parse --is-inside-work-tree > /dev/null 2>&1; then
        for d in .whl .gpu-data; do
            git check-ignore -q "$d/x" || { echo "FAIL prepare: $d/ is not git-ignored (it must travel as a carried path)"; exit 2; }
        done
        tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2> /dev/null | tail -1 | cut -f1)
    else
        tree=0
    fi
    carried=$(du -cb .whl .gpu-data | tail -1 | cut -f1)
    mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
    echo "prepared in ${SECONDS} s with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    echo "carry: $CARRY  ($(mib "$carried"): .whl $(mib "$(du -sb .whl | cut -f1)"), .gpu-data $(mib "$(du -sb .gpu-data | cut -f1)"))"
    echo "working tree that travels besides: $(mib "$tree"); limit 64 MiB in all"
    if [ $((carried + tree)) -gt $((64 * 1048576)) ]; then echo "FAIL prepare: over the 64 MiB the run tool carries"; exit 2; fi
    echo "run:   bash scripts/gpu_check.sh          (timeout_s 360; optional second call: bash scripts/gpu_check.sh --bench, timeout_s 300)"
    exit 0
fi

# ============================================================================ the check and --bench
OUT="${OUT:-$ROOT/tmp/gpu-check}"
mkdir -p "$OUT" || exit 2
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-300}"
[ "$MODE" = bench ] && BUDGET="${GPU_CHECK_BUDGET:-240}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/minitorch_peft-gpu-check.XXXXXX")" || exit 2
SITE="$WORK/site"
SUMMARY="$OUT/summary.txt"
PHASES="$WORK/phases.tsv"
rm -f "$OUT"/summary.txt "$OUT"/summary.json "$OUT"/env.txt "$OUT"/smoke.log "$OUT"/pytest-cupy.log "$OUT"/train.log \
    "$OUT"/logs.tar.gz "$OUT"/bench-b*.log "$OUT"/bench-b*.json  # this script's own files from an earlier run
: > "$SUMMARY"
: > "$PHASES"
FAILED=0
SECONDS=0

export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export MINITORCH_PEFT_DATA="$ROOT/.gpu-data"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1  # the machine's own pytest plugins may not fit the carried pytest

left() { echo $((BUDGET - SECONDS)); }
# record STATUS PHASE SECONDS DETAIL: one line in summary.txt (and on stdout), one row for summary.json
record() {
    local line="$1 $2 ($3 s): $4"
    echo "$line" | tee -a "$SUMMARY"
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$PHASES"
    [ "$1" = FAIL ] && FAILED=1
    return 0
}
# limit BUDGET: the seconds a phase may take (its budget, or what is left of the run's)
limit() { local l; l=$(left); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt 1 ] && l=1; echo "$l"; }  # never 0: timeout 0 waits forever
first_line() { grep -m1 -E "$1" "$2" 2> /dev/null | cut -c1-300; }

finish() {
    record INFO total "$SECONDS" "budget $BUDGET s; $([ $FAILED = 0 ] && echo 'no phase failed' || echo 'a phase failed')"
    "$PY" - "$PHASES" "$OUT/summary.json" "$MODE" "$BUDGET" <<'EOF' 2> /dev/null
import json, sys
rows = [dict(zip(("status", "phase", "seconds", "detail"), l.rstrip("\n").split("\t", 3))) for l in open(sys.argv[1])]
for r in rows:
    r["seconds"] = int(r["seconds"])
json.dump({"mode": sys.argv[3], "budget_s": int(sys.argv[4]), "phases": rows,
           "ok": all(r["status"] != "FAIL" for r in rows)}, open(sys.argv[2], "w"), indent=1)
EOF
    if [ "$MODE" = check ]; then
        tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude=./site --exclude='./model-*' . 2> /dev/null
    fi
    rm -rf "$WORK"
    exit "$FAILED"
}

# --------------------------------------------------------------------------------------------- setup
# within SECS: a setup step's timeout, so that the whole setup stays within its SETUP_BUDGET
SETUP_BUDGET=60
within() { local l=$((SETUP_END - SECONDS)); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt "$(left)" ] || l=$(left); [ "$l" -lt 1 ] && l=1; echo "$l"; }
# setup_failed DETAIL: the setup fails (its seconds counted from setup's t0) and the run stops
setup_failed() { record FAIL setup $((SECONDS - t0)) "$1"; finish; }

setup() {
    local t0=$SECONDS missing bad
    SETUP_END=$((SECONDS + SETUP_BUDGET))
    if ! command -v "$PY" > /dev/null; then record FAIL setup 0 "no Python: $PY not found (set PYTHON)"; finish; fi
    # 1. what the GPU machine itself must have (never carried: compiled against its CUDA)
    # shellcheck disable=SC2086
    missing=$(timeout "$(within 20)" "$PY" - $DEVICE_MODULES <<'EOF'
import importlib.util, sys
miss = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
if "numba" not in miss and importlib.util.find_spec("numba.cuda") is None:
    miss.append("numba.cuda (numba-cuda)")
print(" ".join(miss))
EOF
    ) || missing="(the module check itself failed: $PY)"
    if [ -n "$missing" ]; then
        setup_failed "missing on this machine (not carried; install cupy-cuda13x, numba, numba-cuda there): $missing"
    fi
    # 2. the carried pure-Python wheels, into a private folder first on sys.path (the versions tested here)
    if compgen -G ".whl/*.whl" > /dev/null; then
        mkdir -p "$SITE"
        if ! timeout "$(within 30)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
                --target "$SITE" .whl/*.whl > "$WORK/wheels.log" 2>&1; then
            echo "pip missing or failed (above); unzipping the wheels instead" >> "$WORK/wheels.log"
            "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$SITE" .whl/*.whl \
                >> "$WORK/wheels.log" 2>&1
        fi
    fi
    # 3. every module the check imports, imported for real (a wheel for another Python fails here, not later)
    # shellcheck disable=SC2086
    bad=$(timeout "$(within 30)" "$PY" - $CARRIED_MODULES $PROJECT_MODULES <<'EOF' 2>> "$WORK/imports.log"
import importlib, sys
bad = []
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except Exception as e:
        bad.append(f"{m} ({e.__class__.__name__}: {e})")
print("; ".join(bad))
EOF
    ) || bad="(the import check itself failed; see imports.log in logs.tar.gz)"
    if [ -n "$bad" ]; then
        setup_failed "cannot import: $bad - run 'bash scripts/gpu_check.sh --prepare' where the tests pass and carry $CARRY"
    fi
    HYPOTHESIS="ok"
    if ! hyp=$(timeout "$(within 15)" "$PY" -c "import hypothesis" 2>&1); then
        HYPOTHESIS="hypothesis cannot import here ($(echo "$hyp" | tail -1 | cut -c1-120)): the test files that import it are not collected"
        export MINITORCH_PEFT_TESTS_WITHOUT_HYPOTHESIS=1  # tests/conftest.py: skip those files, and say so
    fi
    # 4. the data the training phase reads
    local f
    for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
        if [ ! -f ".gpu-data/mnist/$f" ]; then
            setup_failed "no .gpu-data/mnist/$f - run 'bash scripts/gpu_check.sh --prepare' here and carry $CARRY"
        fi
    done
    # 5. every test module imports with what is here (pytest itself, its plugins, hypothesis or not)
    if ! timeout "$(within 40)" "$PY" -m pytest --collect-only -q -p no:cacheprovider tests > "$WORK/collect.log" 2>&1; then
        cp "$WORK/collect.log" "$OUT/pytest-cupy.log" 2> /dev/null
        setup_failed "test collection: $(first_line 'ERROR|Error|error' "$WORK/collect.log") (collect.log in logs.tar.gz)"
    fi
    # 6. what runs where, for the note
    {
        echo "date: $(date -u +%FT%TZ)  mode: $MODE"
        if command -v nvidia-smi > /dev/null; then
            nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1
        else echo "nvidia-smi: not found"; fi
        echo "hypothesis: $HYPOTHESIS"
        echo "NUMBA_CUDA_ARRAY_INTERFACE_SYNC before the backend starts: ${NUMBA_CUDA_ARRAY_INTERFACE_SYNC:-(unset)}"
        timeout "$(within 20)" "$PY" - <<'EOF'
import platform, sys
from importlib import metadata
print("python", platform.python_version(), sys.executable)
for d in ("numpy", "cupy-cuda13x", "cupy-cuda12x", "numba", "numba-cuda", "llvmlite", "torch", "click", "pytest",
          "hypothesis", "array-api-strict", "cuda-python", "cuda-bindings", "nvidia-cuda-nvrtc", "nvidia-cublas",
          "nvidia-curand", "nvidia-cuda-runtime", "nvidia-nvjitlink"):
    try:
        print(f"{d} {metadata.version(d)}")
    except metadata.PackageNotFoundError:
        pass
try:
    import cupy
    cupy.show_config()
except Exception as e:
    print("cupy.show_config() failed:", e.__class__.__name__, e)
EOF
    } > "$OUT/env.txt" 2>&1
    local n
    n=$(grep -Eo '^[0-9]+ tests? collected|[0-9]+ tests? collected' "$WORK/collect.log" | tail -1)
    record PASS setup $((SECONDS - t0)) "modules import, ${n:-tests collected}; hypothesis: $HYPOTHESIS"
}

# --------------------------------------------------------------------------------------------- smoke
smoke() {
    local t0=$SECONDS t rc
    t=$(limit 45)
    timeout -k 5 "$t" "$PY" scripts/gpu_smoke.py > "$OUT/smoke.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        record PASS smoke $((SECONDS - t0)) "$(grep -c '^ok ' "$OUT/smoke.log") pieces ok (smoke.log)"
    else
        local why
        why=$(first_line '^FAIL smoke' "$OUT/smoke.log")
        why=${why#FAIL smoke: }
        if [ -z "$why" ] && [ $rc -ge 124 ]; then
            why="timed out after $t s; last piece ok: $(grep '^ok ' "$OUT/smoke.log" | tail -1 | cut -c4-120)"
        elif [ -z "$why" ]; then
            why="exit $rc: $(tail -1 "$OUT/smoke.log" | cut -c1-200)"
        fi
        record FAIL smoke $((SECONDS - t0)) "$why"
        finish
    fi
}

if [ "$MODE" = bench ]; then
    setup
    smoke
    if ! "$PY" -c "import torch" > /dev/null 2>&1; then record INFO bench 0 "PyTorch does not import: the benchmark runs without --compare torch"; CMP=(); else CMP=(--compare torch); fi
    for bs in 64 4096; do
        t0=$SECONDS
        if [ "$bs" = 64 ]; then budget=150; models=small,medium; else budget=80; models=small; fi
        t=$(limit $budget)
        if [ "$t" -lt 20 ]; then record SKIP "bench-b$bs" 0 "$(left) s left of $BUDGET"; continue; fi
        timeout -k 5 "$t" "$PY" cli.py bench --backend cupy "${CMP[@]}" --quick --batch-size "$bs" --models "$models" \
            --json "$OUT/bench-b$bs.json" > "$OUT/bench-b$bs.log" 2>&1
        rc=$?
        if [ $rc -eq 0 ]; then record PASS "bench-b$bs" $((SECONDS - t0)) "bench --backend cupy ${CMP[*]} --quick --batch-size $bs --models $models (bench-b$bs.log)"
        else record FAIL "bench-b$bs" $((SECONDS - t0)) "exit $rc$([ $rc -ge 124 ] && echo " (timed out at $t s)"): $(tail -1 "$OUT/bench-b$bs.log" | cut -c1-200)"; fi
    done
    finish
fi

setup
smoke

# ----------------------------------------------------------- tests on the GPU, one NumPy epoch beside
TRAIN_ARGS=(--epochs 1 --batch-size 64 --seed 42)
timeout -k 5 "$(limit 200)" "$PY" cli.py train --backend numpy "${TRAIN_ARGS[@]}" --output "$WORK/model-numpy" \
    --json "$WORK/train-numpy.json" > "$WORK/train-numpy.log" 2>&1 &
NUMPY_PID=$!  # timeout's: stopping it stops the epoch
NP_T0=$SECONDS

t0=$SECONDS
t=$(limit 120)
timeout -k 5 "$t" "$PY" -m pytest -q -rs --durations=15 -p no:cacheprovider -k "cupy or simulator" \
    --junitxml="$WORK/pytest-cupy.xml" tests > "$OUT/pytest-cupy.log" 2>&1
rc=$?
tally="$(grep -E '(passed|failed|error)' "$OUT/pytest-cupy.log" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//')"
if [ $rc -eq 0 ]; then record PASS tests $((SECONDS - t0)) "pytest -k 'cupy or simulator': $tally"
elif [ $rc -ge 124 ]; then record FAIL tests $((SECONDS - t0)) "timed out at $t s (pytest-cupy.log shows how far it got)"
else record FAIL tests $((SECONDS - t0)) "exit $rc: $tally; first: $(first_line '^(FAILED|ERROR)' "$OUT/pytest-cupy.log")"; fi

# ------------------------------------------------------------------------------ one epoch on the GPU
t0=$SECONDS
t=$(limit 60)
if [ "$t" -lt 10 ]; then
    record SKIP train 0 "$(left) s left of $BUDGET"
else
    timeout -k 5 "$t" "$PY" cli.py train --backend cupy "${TRAIN_ARGS[@]}" --output "$WORK/model-cupy" \
        --json "$WORK/train-cupy.json" > "$WORK/train-cupy.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        record PASS train-cupy $((SECONDS - t0)) "$(grep -E 'Training time' "$WORK/train-cupy.log" | sed 's/^ *//')"
        t0=$SECONDS
        t=$(limit 15)
        if timeout -k 5 "$t" "$PY" cli.py infer --backend cupy --model-dir "$WORK/model-cupy" --samples 5 > "$WORK/infer-cupy.log" 2>&1; then
            record PASS infer-cupy $((SECONDS - t0)) "$(grep 'whole test set' "$WORK/infer-cupy.log")"
        else record FAIL infer-cupy $((SECONDS - t0)) "$(tail -1 "$WORK/infer-cupy.log" | cut -c1-200)"; fi
        t0=$SECONDS
        t=$(limit 15)
        if timeout -k 5 "$t" "$PY" cli.py infer --backend numpy --model-dir "$WORK/model-cupy" --samples 5 > "$WORK/infer-numpy-from-cupy.log" 2>&1; then
            record PASS infer-numpy-from-gpu-checkpoint $((SECONDS - t0)) "$(grep 'whole test set' "$WORK/infer-numpy-from-cupy.log")"
        else record FAIL infer-numpy-from-gpu-checkpoint $((SECONDS - t0)) "$(tail -1 "$WORK/infer-numpy-from-cupy.log" | cut -c1-200)"; fi
    else
        record FAIL train-cupy $((SECONDS - t0)) "exit $rc$([ $rc -ge 124 ] && echo " (timed out at $t s)"): $(tail -1 "$WORK/train-cupy.log" | cut -c1-200)"
    fi
fi

# --------------------------------------------------------------------- the NumPy epoch, and compare
while kill -0 "$NUMPY_PID" 2> /dev/null && [ "$(left)" -gt 3 ]; do sleep 1; done
if kill -0 "$NUMPY_PID" 2> /dev/null; then
    kill "$NUMPY_PID" 2> /dev/null
    wait "$NUMPY_PID" 2> /dev/null
    record FAIL train-numpy $((SECONDS - NP_T0)) "not done within the run's $BUDGET s (stopped)"
else
    wait "$NUMPY_PID"
    rc=$?
    if [ "$rc" = 0 ]; then record PASS train-numpy $((SECONDS - NP_T0)) "(on the CPU, beside the tests) $(grep -E 'Training time' "$WORK/train-numpy.log" | sed 's/^ *//')"
    else record FAIL train-numpy $((SECONDS - NP_T0)) "exit $rc: $(tail -1 "$WORK/train-numpy.log" | cut -c1-200)"; fi
fi
if [ -f "$WORK/train-numpy.json" ] && [ -f "$WORK/train-cupy.json" ]; then
    line=$("$PY" - "$WORK/train-numpy.json" "$WORK/train-cupy.json" <<'EOF' 2>&1
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
diff = abs(a["final_test_accuracy"] - b["final_test_accuracy"]) * 100
speed = b["samples_per_second"] / a["samples_per_second"]
print(f"{'PASS' if diff <= 0.3 else 'FAIL'}\ttest accuracy numpy {a['final_test_accuracy']:.2%} vs cupy "
      f"{b['final_test_accuracy']:.2%} (|diff| {diff:.2f} points, limit 0.3); cupy {b['samples_per_second']:,.0f} "
      f"vs numpy {a['samples_per_second']:,.0f} samples/s ({speed:.1f}x)")
EOF
    )
    case "$line" in
        PASS$'\t'*|FAIL$'\t'*) record "${line%%$'\t'*}" compare 0 "${line#*$'\t'}" ;;
        *) record FAIL compare 0 "$(echo "$line" | tail -1 | cut -c1-200)" ;;
    esac
else
    record SKIP compare 0 "no result from the$([ -f "$WORK/train-numpy.json" ] || echo ' numpy')$([ -f "$WORK/train-cupy.json" ] || echo ' cupy') epoch"
fi
{
    for f in train-cupy train-numpy infer-cupy infer-numpy-from-cupy; do
        [ -f "$WORK/$f.log" ] && { echo "===== $f.log"; cat "$WORK/$f.log"; }
    done
} > "$OUT/train.log"
finish
