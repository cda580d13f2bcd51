#!/usr/bin/env bash
# gpu_check.sh - the whole CuPy backend check on a machine with an NVIDIA GPU, in one run, offline.
#
# What it does (about 5 minutes, at most 8), writing everything to $OUT:
#   1. env.txt          GPU, driver, Python and package versions
#   2. pytest-cupy.log  the test suite's GPU cases (every test run through the `backend` fixture, id
#                       "cupy"), plus the numba.cuda quantization kernels under the simulator
#   3. train-cupy.*     one epoch of `cli.py train --backend cupy` on MNIST (LoRA, batch 64) ...
#      train-numpy.*    ... and the same epoch on NumPy (run alongside, on the CPU); the test
#                       accuracies must agree within 0.3 points
#   4. bench-b64.*      `cli.py bench --backend cupy --compare torch --quick` at batch 64 and
#      bench-b4096.*    4096 (skipped with a note while `cli.py bench --help` does not work)
#   5. summary.txt      one line per step, PASS / FAIL / SKIP; the exit status is 0 only if no step failed
#
# Nothing is downloaded and nothing is read from outside the repository. Before the run, on a
# machine with the data and a network:
#   mkdir -p .gpu-data && cp -r ../shared/data/mnist .gpu-data/          # MNIST (.gpu-data/ is git-ignored)
#   pip download --no-deps -d .whl click hypothesis attrs sortedcontainers array-api-strict
#                                                                         # pure-Python wheels (.whl/ is git-ignored)
# then carry both folders to the GPU machine with the working tree and run, from the repository root:
#   OUT=/some/folder bash scripts/gpu_check.sh
# The GPU machine must already have numpy, cupy (cupy-cuda12x or -cuda13x), numba (with numba-cuda),
# pytest and, for the comparison, a CUDA build of torch. Wheels in .whl/ are installed (pip
# --no-index --no-deps, into a private folder; or unpacked if pip is missing) only when a module is
# missing; a module that is missing and has no wheel stops the run with a line naming it.
#
# Environment: OUT (required) output folder; PYTHON (default python3).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
: "${OUT:?set OUT to the folder that receives the logs}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
BUDGET=480  # seconds for the whole run; later steps are skipped rather than overrun it

note() { echo "$*" | tee -a "$SUMMARY"; }
fail() { note "FAIL $*"; FAILED=1; }
left() { echo $((BUDGET - SECONDS)); }

# ---------------------------------------------------------------------------------------- setup
SITE="${TMPDIR:-/tmp}/minitorch_peft-gpu-site"
export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export MINITORCH_PEFT_DATA="$ROOT/.gpu-data"
export PYTHONDONTWRITEBYTECODE=1

missing_modules() {
    "$PY" - <<'EOF'
import importlib.util
need = ["numpy", "cupy", "numba", "click", "pytest", "hypothesis", "array_api_strict"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
}

MISSING="$(missing_modules)"
if [ -n "$MISSING" ] && compgen -G ".whl/*.whl" > /dev/null; then
    mkdir -p "$SITE"
    if ! "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" .whl/*.whl > "$OUT/wheels.log" 2>&1; then
        echo "pip unavailable or failed (see wheels.log); unpacking the wheels instead" >> "$OUT/wheels.log"
        "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" "$SITE" .whl/*.whl \
            >> "$OUT/wheels.log" 2>&1
    fi
    MISSING="$(missing_modules)"
fi
if [ -n "$MISSING" ]; then
    note "FAIL setup: missing Python module(s): $MISSING - put their wheels in .whl/ (see the header of $0)"
    exit 2
fi
if [ ! -f .gpu-data/mnist/train-images-idx3-ubyte.gz ] && [ ! -f .gpu-data/mnist/train-images-idx3-ubyte ]; then
    note "FAIL setup: no MNIST in .gpu-data/mnist - run: mkdir -p .gpu-data && cp -r ../shared/data/mnist .gpu-data/"
    exit 2
fi

{
    echo "date: $(date -u +%FT%TZ)"
    if command -v nvidia-smi > /dev/null; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    else echo "nvidia-smi: not found"; fi
    "$PY" - <<'EOF'
import platform, importlib
print("python", platform.python_version())
for m in ("numpy", "cupy", "numba", "torch", "click", "pytest", "hypothesis", "array_api_strict"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "unavailable:", e.__class__.__name__)
try:
    import cupy
    print("cuda devices:", cupy.cuda.runtime.getDeviceCount(), "runtime", cupy.cuda.runtime.runtimeGetVersion())
except Exception as e:
    print("cupy device check failed:", e)
EOF
} > "$OUT/env.txt" 2>&1
if ! "$PY" -c "from minitorch_peft import get_backend; get_backend('cupy')" >> "$OUT/env.txt" 2>&1; then
    note "FAIL setup: the cupy backend cannot start here (see env.txt)"
    exit 2
fi

# ------------------------------------------------------- numpy epoch, in the background, on the CPU
TRAIN_ARGS=(--epochs 1 --batch-size 64 --seed 42)
timeout 240 "$PY" cli.py train --backend numpy "${TRAIN_ARGS[@]}" --output "$OUT/model-numpy" \
    --json "$OUT/train-numpy.json" > "$OUT/train-numpy.log" 2>&1 &
NUMPY_PID=$!

# ------------------------------------------------------------------------------ tests on the GPU
# -k cupy: the backend fixture's GPU cases (ids end in "cupy"); the simulator test is added by name.
timeout 200 "$PY" -m pytest -q -rs -p no:cacheprovider -k "cupy or simulator" \
    --junitxml="$OUT/pytest-cupy.xml" tests > "$OUT/pytest-cupy.log" 2>&1
rc=$?
tail_line="$(grep -E '(passed|failed|error)' "$OUT/pytest-cupy.log" | tail -1)"
if [ $rc -eq 0 ]; then note "PASS tests on cupy: $tail_line"; else fail "tests on cupy (rc $rc): $tail_line"; fi

# ------------------------------------------------------------------------- one epoch on the GPU
timeout 120 "$PY" cli.py train --backend cupy "${TRAIN_ARGS[@]}" --output "$OUT/model-cupy" \
    --json "$OUT/train-cupy.json" > "$OUT/train-cupy.log" 2>&1
rc=$?
if [ $rc -eq 0 ]; then note "PASS train --backend cupy: $(grep -E 'Training time' "$OUT/train-cupy.log" | sed 's/^ *//')"
else fail "train --backend cupy (rc $rc): $(tail -1 "$OUT/train-cupy.log")"; fi

if [ $rc -eq 0 ]; then
    timeout 60 "$PY" cli.py infer --backend cupy --model-dir "$OUT/model-cupy" --samples 5 > "$OUT/infer-cupy.log" 2>&1 \
        && note "PASS infer --backend cupy: $(grep 'whole test set' "$OUT/infer-cupy.log")" \
        || fail "infer --backend cupy: $(tail -1 "$OUT/infer-cupy.log")"
    timeout 60 "$PY" cli.py infer --backend numpy --model-dir "$OUT/model-cupy" --samples 5 > "$OUT/infer-numpy-from-cupy.log" 2>&1 \
        && note "PASS GPU checkpoint read on numpy: $(grep 'whole test set' "$OUT/infer-numpy-from-cupy.log")" \
        || fail "GPU checkpoint read on numpy: $(tail -1 "$OUT/infer-numpy-from-cupy.log")"
fi

wait "$NUMPY_PID"
rc=$?
if [ $rc -ne 0 ]; then
    fail "train --backend numpy (rc $rc): $(tail -1 "$OUT/train-numpy.log")"
else
    note "PASS train --backend numpy: $(grep -E 'Training time' "$OUT/train-numpy.log" | sed 's/^ *//')"
fi
if [ $rc -eq 0 ] && [ -f "$OUT/train-cupy.json" ]; then
    if "$PY" - "$OUT/train-numpy.json" "$OUT/train-cupy.json" >> "$SUMMARY" 2>&1 <<'EOF'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
diff = abs(a["final_test_accuracy"] - b["final_test_accuracy"]) * 100
speed = b["samples_per_second"] / a["samples_per_second"]
ok = diff <= 0.3
print(f"{'PASS' if ok else 'FAIL'} accuracy numpy {a['final_test_accuracy']:.2%} vs cupy {b['final_test_accuracy']:.2%} "
      f"(|diff| {diff:.2f} points, limit 0.3); cupy {b['samples_per_second']:,.0f} vs numpy {a['samples_per_second']:,.0f} samples/s ({speed:.1f}x)")
sys.exit(0 if ok else 1)
EOF
    then :; else FAILED=1; fi
fi

# ---------------------------------------------------------------------------------------- bench
if ! "$PY" cli.py bench --help > /dev/null 2>&1; then
    note "SKIP bench: 'cli.py bench --help' does not work in this tree"
else
    for bs in 64 4096; do
        limit=$(( bs == 64 ? 150 : 100 ))
        if [ "$(left)" -lt "$limit" ]; then note "SKIP bench batch $bs: $(left) s left of the $BUDGET s budget"; continue; fi
        models=$([ "$bs" = 64 ] && echo "small,medium" || echo "small")
        timeout "$limit" "$PY" cli.py bench --backend cupy --compare torch --quick --batch-size "$bs" --models "$models" \
            --json "$OUT/bench-b$bs.json" > "$OUT/bench-b$bs.log" 2>&1
        rc=$?
        if [ $rc -eq 0 ]; then note "PASS bench --backend cupy --compare torch, batch $bs (see bench-b$bs.log)"
        else fail "bench batch $bs (rc $rc): $(tail -1 "$OUT/bench-b$bs.log")"; fi
    done
fi

note "total ${SECONDS} s"
exit $FAILED
