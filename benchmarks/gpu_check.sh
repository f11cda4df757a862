#!/usr/bin/env bash
# The GPU check in one command: build the CUDA extension, run the kernel and operator tests on the
# GPU, run every benchmark suite with --device cuda (JSON in benchmarks/results/<suite>_gpu.json),
# then the main job on the GPU (one seed).
# Written for one H100/H200 and a total of about 8 minutes (each step gets what is left of
# GPU_CHECK_BUDGET_S, capped per step, so a slow step cannot take the others' time).
#
#   bash benchmarks/gpu_check.sh                       # from anywhere; runs in the repository root
#
# Environment (all optional):
#   PYTHON=python3            the interpreter with torch (CUDA build), triton, numpy, scipy, scikit-learn,
#                             pytest, hypothesis, peft, matplotlib, ninja and setuptools >= 77 (checked first);
#                             with pytest-xdist too, the tests run in eight workers
#   GPU_CHECK_BUDGET_S=470    seconds for everything
#   GPU_CHECK_COMPILE=1       also time the torch.compile candidates (slower: compiling takes minutes)
#   GPU_CHECK_OUT=<dir>       copy the JSON results, the logs and the main job's files there at the end
#                             (also when a step before the suites stops the script)
#   TORCH_CUDA_ARCH_LIST=9.0  MAX_JOBS=16   passed to the extension build
#   GPU_CHECK_DRY_RUN=1       the same steps on the CPU, to test the script where no GPU is: no
#                             build (the existing one is used), suites with --device cpu --quick
# Exit status: 0 when every step passed, else 1 (the summary at the end says which failed).
set -uo pipefail
# the caller's relative paths are the caller's: made absolute before the cd into the repository
for var in GPU_CHECK_LOGS GPU_CHECK_OUT; do
    [[ -n ${!var:-} ]] && declare "$var=$(realpath -ms -- "${!var}")"
done
[[ ${PYTHON:-} == */* ]] && PYTHON=$(realpath -ms -- "$PYTHON")
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
# the interpreter's own bin folder first: torch's extension build runs `ninja` from PATH, and without it (a venv
# named by PYTHON but not activated) builds serially, ignoring MAX_JOBS, with only a warning
[[ $PY == */* ]] && PATH="$(dirname "$PY"):$PATH"
DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
DEVICE=cuda
[[ $DRY_RUN == 1 ]] && DEVICE=cpu

BUDGET=${GPU_CHECK_BUDGET_S:-470}
LOGS=${GPU_CHECK_LOGS:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$LOGS"  # a folder given by GPU_CHECK_LOGS may not exist yet
RESULTS=benchmarks/results
[[ $DRY_RUN == 1 ]] && RESULTS=$LOGS/results  # quick CPU numbers must not replace the committed ones
START=$(date +%s)
FAILED=()

# The kernel and operator tests; with a GPU visible their cuda parametrisations (ids containing
# "cuda"), Triton's (compiled for the GPU) and the tests that run every (backend, device) pair inside
# their body (marked every_backend) are the ones selected below.
TESTS=(tests/test_lanczos_step.py tests/test_cubic_secular.py tests/test_softmax_ce.py
       tests/test_softmax_ce_triton.py tests/test_mlp_hvp.py tests/test_mlp_value_grad.py tests/test_lora_linear.py
       tests/test_curvature.py tests/test_fused_conv.py tests/test_lanczos.py tests/test_cubic.py
       tests/test_distributed.py tests/test_weights_fingerprint.py tests/test_checks.py tests/test_graph_ops.py
       tests/test_softmax_double_backward.py tests/test_layer_norm_double_backward.py
       tests/test_gelu_double_backward.py)

left() { echo $((BUDGET - ($(date +%s) - START))); }

# GPU_CHECK_OUT gets this run's JSON results, logs and main job whatever ends the script (an early exit too:
# a failed build kept only 25 lines of its log on the screen)
copy_out() {
    [[ -n ${GPU_CHECK_OUT:-} ]] || return 0
    mkdir -p "$GPU_CHECK_OUT" || return 0
    find "$RESULTS" -maxdepth 1 -name '*_gpu.json' -newermt "@$START" -exec cp {} "$GPU_CHECK_OUT"/ \; 2>/dev/null
    [[ $DRY_RUN == 1 ]] && find "$RESULTS" -maxdepth 1 -name '*_cpu.json' -exec cp {} "$GPU_CHECK_OUT"/ \; 2>/dev/null
    cp "$LOGS"/*.log "$GPU_CHECK_OUT"/ 2>/dev/null
    [[ -d $LOGS/main_job ]] && cp -r "$LOGS/main_job" "$GPU_CHECK_OUT"/ 2>/dev/null
    return 0
}
trap copy_out EXIT

# A step that ignores the timeout's SIGINT (a call hung in the driver) is killed this many seconds later.
GRACE=10

# step NAME CAP_S COMMAND...: runs COMMAND with a timeout of min(CAP_S, time left less GRACE), logs to
# $LOGS/NAME.log; the grace comes out of the time left, so that a killed step still ends within the budget.
step() {
    local name=$1 cap=$2
    shift 2
    local limit
    limit=$(($(left) - GRACE))
    ((limit > cap)) && limit=$cap
    if ((limit < 5)); then
        echo "== $name: skipped, the time budget is spent"
        FAILED+=("$name (no time left)")
        return 1
    fi
    echo "== $name (at most ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=$GRACE "$limit" "$@" >"$LOGS/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$LOGS/$name.log"
    echo "== $name: exit $rc after $((SECONDS - t0))s"
    if ((rc != 0)); then
        # 124: stopped by the timeout; 137: SIGKILL, from the timeout GRACE seconds after its SIGINT (not heeded)
        # or from elsewhere (the kernel's out-of-memory killer)
        local why=""
        ((rc == 124)) && why=", timed out"
        ((rc == 137)) && why=", killed: timed out or out of memory"
        FAILED+=("$name (exit $rc$why)")
    fi
    return $rc
}

echo "gpu_check: logs in $LOGS, budget ${BUDGET}s"
step environment 30 "$PY" -c '
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device is visible to torch"
    print("device:", torch.cuda.get_device_name(), "count", torch.cuda.device_count())
# what the later steps import: the build (setuptools >= 77, ninja), the tests (pytest, hypothesis in their
# conftest, peft in the LoRA ones), the suites (peft for lora) and the main job (matplotlib for its plots)
# found, not imported: importing them (peft brings in transformers) is slow, and this step took 25 s on an H100
from importlib.util import find_spec
missing = [name for name in ("triton", "numpy", "scipy", "sklearn", "pytest", "hypothesis", "peft", "matplotlib",
                             "ninja", "setuptools") if find_spec(name) is None]
if "setuptools" not in missing:
    from importlib.metadata import version
    found = version("setuptools")
    if int(found.split(".")[0]) < 77:
        missing.append(f"setuptools>=77 (found {found})")
print("missing:", missing or "none")
assert not missing, f"install {missing} first"
' "$DEVICE" || { echo "gpu_check: the environment cannot run the check"; exit 1; }
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# The CUDA extension, in place (editable install: it also maps unlearn_kernels.triton_kernels).
[[ $DRY_RUN == 1 ]] || step build 300 env UNLEARN_KERNELS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    MAX_JOBS="${MAX_JOBS:-16}" "$PY" -m pip install --no-build-isolation --no-deps -e . \
    || { echo "gpu_check: the build failed, see $LOGS/build.log"; exit 1; }
# the toolchain behind the build, for a crash inside the library: the compiler, the C++ runtime it loads
if [[ $DRY_RUN != 1 ]]; then
    { c++ --version | head -n 1; ldd unlearn_kernels/_C*.so | grep -E 'libstdc|libgomp|libc10'; } 2>/dev/null || true
fi
step backends 60 "$PY" -c 'import unlearn_kernels; print(unlearn_kernels.backends())'

# With pytest-xdist installed (it is optional), eight workers: each new shape compiles the Triton kernels anew,
# and serially the LoRA tests alone took over 100 s on an H100 machine; a worker that crashes is reported with
# its test and replaced, where a crash ended the serial run (and hid every later file).
PARALLEL=()
"$PY" -c 'import xdist' 2>/dev/null && PARALLEL=(-n 8)
# (the expansion below is empty for an empty array, also under set -u in bash <= 4.3)
step tests 150 "$PY" -m pytest -q -rfEs -p no:cacheprovider ${PARALLEL[@]+"${PARALLEL[@]}"} \
    -k "cuda or triton or every_backend" "${TESTS[@]}"

BENCH_FLAGS=(--device "$DEVICE" --no-compile)
[[ ${GPU_CHECK_COMPILE:-0} == 1 ]] && BENCH_FLAGS=(--device "$DEVICE")
[[ $DRY_RUN == 1 ]] && BENCH_FLAGS+=(--quick)
SUITES=$("$PY" -c 'from benchmarks.__main__ import SUITES; print(" ".join(SUITES))')
[[ -z $SUITES ]] && FAILED+=("suites (the runner's list of suites could not be read: none ran)")
for suite in $SUITES; do
    step "bench_$suite" 120 "$PY" -m benchmarks "$suite" "${BENCH_FLAGS[@]}" --out "$RESULTS"
done

# Last, so that it never takes the suites' time: the main job on the device, end to end (its three
# scenarios and their default methods, one seed; about 25 s on the CPU).
step main_job 90 "$PY" -m unlearn_kernels.cli run --device "$DEVICE" --seeds 0 --no-cache --out "$LOGS/main_job"

echo
echo "gpu_check: $(($(date +%s) - START))s in all; results:"
TAG=gpu
[[ $DRY_RUN == 1 ]] && TAG=cpu
# this run's files only: an older *_$TAG.json of a suite that failed now is not listed as if it were current
mapfile -t WRITTEN < <(find "$RESULTS" -maxdepth 1 -name "*_$TAG.json" -newermt "@$START" 2>/dev/null | sort)
if ((${#WRITTEN[@]})); then ls -l "${WRITTEN[@]}"; else echo "  (no *_$TAG.json written by this run)"; fi
if ((${#FAILED[@]})); then
    printf 'gpu_check: FAILED: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "gpu_check: every step passed"
