#!/usr/bin/env bash
# The GPU check of the cupy backend, in one go, on a machine with an NVIDIA GPU (written for a lent H200: 16 cores,
# maybe no internet). From the repository root:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # OUT_DIR defaults to $OUT, else ./gpu_check_out
#
# Stages, each with its own time limit, none stopping the others (at most ~8.5 minutes in all, usually less, so
# that a rerun fits in a 15-minute GPU lease):
#   1. env      nvidia-smi, python, what is installed                                   (15 s)
#   2. install  a venv that sees the system's packages (CuPy, torch, numba, pytest may already be there: on the
#               H200 image they are, in the venv python3 comes from, hence the .pth file below), then
#               `pip install -e .[cudaNN,test,numba]` (NN from the driver's CUDA version); offline, or if that
#               fails, the checkout alone without dependencies; if even that fails, a copy of the checkout with
#               backends/ placed inside tinymoe/ (what the install does) run from /tmp  (20 + 45 + 30 s)
#   3. tests    tests/test_cupy_backend.py, tests/test_cupy_bench.py and the cupy cases of tests/test_backends.py
#               (property tests against the NumPy reference, bitwise reruns, a GPU training step vs the CPU) (150 s)
#   4. bench    tinymoe bench --backend cupy: float32 (with the whole tm.nn.MoE layer on the device, --layer),
#               then TF32 (fewer repeats)                                                 (100 s + 60 s)
#   5. step     benchmarks/train_step.py gpu: a d512/E8/4-layer training step, cupy beside numba (60 s)
# Files written to OUT_DIR (at most 8, as the lending tool returns): summary.txt (each stage's exit status and the
# key lines), gpu_check.log (everything), tests.xml, bench_fp32.json, bench_tf32.json, train_step.json.
set -u
OUT_DIR="${1:-${OUT:-./gpu_check_out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG="$OUT_DIR/gpu_check.log"
SUMMARY="$OUT_DIR/summary.txt"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore::UserWarning
: >"$LOG"
: >"$SUMMARY"
START=$(date +%s)

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, log it, record the exit status; never abort
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*" >>"$LOG"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    local note=""
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && note=" (timed out)"
    echo "$name: exit $rc$note in $(( $(date +%s) - t0 )) s" | tee -a "$SUMMARY" >>"$LOG"
    return $rc
}

cd "$ROOT"
PY=python3
# ---- 1. env
stage env 15 bash -c "nvidia-smi; $PY --version; $PY -m pip list 2>/dev/null | grep -i -E '^(cupy|numpy|numba|scipy|torch|pytest|hypothesis|safetensors|threadpoolctl|setuptools) '"
CUDA_MAJOR=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -1)
EXTRA="cuda${CUDA_MAJOR:-12}"
[ "$EXTRA" = cuda12 ] || [ "$EXTRA" = cuda13 ] || EXTRA=cuda12

# ---- 2. install
VENV=/tmp/tinymoe_gpu_venv
WORK="$ROOT"
if stage venv 20 $PY -m venv --system-site-packages "$VENV"; then
    # the system python may itself be a venv (the H200 image's is): make its packages visible through a .pth
    SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    $PY -c "import site, sys; print('\n'.join(p for p in site.getsitepackages() + [site.getusersitepackages()]))" \
        >"$SITE/_system_site.pth" 2>>"$LOG"
    PY="$VENV/bin/python"
    if ! stage install 45 "$PY" -m pip install --retries 0 --timeout 10 -q -e ".[$EXTRA,test,numba]"; then
        stage install-no-deps 30 "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e . || true
    fi
fi
if ! (cd /tmp && "$PY" -c "import tinymoe.backends.cupy" >>"$LOG" 2>&1); then
    # no install worked: a copy of the checkout with backends/ inside tinymoe/, which is where the install puts it
    echo "install: falling back to a copy of the checkout in /tmp/tinymoe_tree" | tee -a "$SUMMARY" >>"$LOG"
    rm -rf /tmp/tinymoe_tree && mkdir -p /tmp/tinymoe_tree
    cp -r "$ROOT"/tinymoe "$ROOT"/tests "$ROOT"/benchmarks "$ROOT"/pyproject.toml /tmp/tinymoe_tree/
    rm -rf /tmp/tinymoe_tree/tinymoe/backends && cp -r "$ROOT"/backends /tmp/tinymoe_tree/tinymoe/backends
    WORK=/tmp/tinymoe_tree
    export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"
fi
cd "$WORK"
stage check 20 "$PY" -c "import tinymoe as tm; print('backends:', tm.backends.available()); print('unavailable:', tm.backends.unavailable())"
grep -E "^(backends|unavailable):" "$LOG" | tail -2 >>"$SUMMARY"

# ---- 3. tests (numba kernels compile once for test_backends' fixtures: a cold cache costs ~30 s)
stage tests 150 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT_DIR/tests.xml" \
    tests/test_cupy_backend.py tests/test_cupy_bench.py "tests/test_backends.py" -k "cupy or Cupy"
grep -E "passed|failed|error" "$LOG" | tail -1 >>"$SUMMARY"

# ---- 4. benchmarks: the MoE layer against its dense equivalent and eager PyTorch CUDA
stage bench-fp32 100 "$PY" -m benchmarks.moe_layer --backend cupy --repeat 5 --layer --json "$OUT_DIR/bench_fp32.json"
grep -E "^targets \[cupy, GPU\]" "$LOG" | tail -1 | sed 's/^/fp32 /' >>"$SUMMARY"
stage bench-tf32 60 "$PY" -m benchmarks.moe_layer --backend cupy --repeat 3 --tf32 --json "$OUT_DIR/bench_tf32.json"
grep -E "^targets \[cupy, GPU\]" "$LOG" | tail -1 | sed 's/^/tf32 /' >>"$SUMMARY"

# ---- 5. a whole training step, cupy beside numba
stage train-step 60 "$PY" benchmarks/train_step.py gpu --steps 10 --numba-steps 2 --warmup 2 \
    --json "$OUT_DIR/train_step.json"
grep -E "^(cupy|numba|numba / cupy):" "$LOG" | tail -3 >>"$SUMMARY"

echo "total: $(( $(date +%s) - START )) s; files in $OUT_DIR" | tee -a "$SUMMARY"
cat "$SUMMARY"
