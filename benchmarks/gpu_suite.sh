#!/usr/bin/env bash
# The whole measurement on a lent GPU (H100/H200), in one command and about 10 minutes:
# build the extension, run the GPU tests, then every benchmark (edit, statistics,
# covariance, update, linalg), the verdict on each issue target (targets.py), and plot.
# CSV + markdown + PNG go to $OUT, or to
# benchmarks/results/ when $OUT is unset.
#
#   bash benchmarks/gpu_suite.sh                 # the real run (needs torch with CUDA)
#   bash benchmarks/gpu_suite.sh --dry-run       # tiny sizes, CPU allowed, no build/tests
#   bash benchmarks/gpu_suite.sh --dry-run --with-build --with-tests
#
# Options:
#   --dry-run       small sizes; runs on the CPU when no GPU is there (tests/test_gpu_suite_dryrun.py)
#   --with-build    in a dry run, also build the extension (always done in a real run)
#   --with-tests    in a dry run, also run the GPU test files (always done in a real run)
#   --budget S      seconds for the whole suite (default 590; 120 in a dry run)
#   --pack          at the end, pack every result into gpu_suite_results.tar.gz (for
#                   transports that bring back few files); suite.md and suite.log stay loose
#
# Environment: PYTHON (default python3), MAX_JOBS (extension build, default 12),
# KERNEL_BENCHES (default "covariance update"), UPDATE_ARGS (extra bench_update.py options),
# PYTEST_ARGS (extra pytest options of the test steps), CHECK_EXT (0 skips the exception
# probe builds of check_ext_exceptions.py),
# EDIT_MODES (bench_edit.py --modes, default fast,published),
# TRITON_TESTS / EXT_TESTS (test files before / after the build; empty skips), TUNE_S (seconds of the
# kernel config sweep, 0 skips it), EDIT_MODELS (default "llama-2-7b gpt-j-6b gpt2-xl";
# empty skips), STATS_MODEL (default llama-2-7b; empty skips), LINALG_DK / LINALG_N (default
# 16384 / 100,10000), LINALG_UPDATE_BLOCKS / LINALG_UPDATE_METHODS (cholesky_update also
# timed at these block widths, 0 the default, by these methods; default 0,128,256,1024 and
# qr,chol,product; empty skips), LINALG_TRSM (the update and layer solve timed again with
# the extension's triangular solves forced to library and/or blocked; default library, the
# alternative to the CUDA default; empty skips), PROFILE_TRSM (the trsm choices of the
# profile_linalg.py step, default library,blocked; PROFILE_LINALG=0 skips the step), TARGETS_MODEL / TARGETS_CHUNKS (the target phase timed at
# these chunk sizes on this random architecture; default llama-2-7b / 32,64,128,256; an
# empty TARGETS_MODEL skips; on an 80 GB H100 keep the chunks to 128: 256 requests of
# llama-2-7b need about 79 GiB), STATS_VARIANTS (bench_stats.py --variants), SDPA_AB (1, the
# default: the target and statistics steps again without cuDNN attention, in processes of
# their own; 0 skips).
# Every step runs under its own time limit; a failing step is reported and the suite goes
# on; the exit status is non-zero if any step failed.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
DRY=0
WITH_BUILD=0
WITH_TESTS=0
PACK=0
BUDGET=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --with-build) WITH_BUILD=1 ;;
    --with-tests) WITH_TESTS=1 ;;
    --pack) PACK=1 ;;
    --budget)
      [ $# -ge 2 ] || { echo "gpu_suite.sh: --budget needs a number of seconds" >&2; exit 2; }
      BUDGET=$2; shift ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$BUDGET" ]; then
  if [ $DRY = 1 ]; then BUDGET=120; else BUDGET=590; fi
fi

OUT_GIVEN=${OUT:+1}                      # --pack clears only a folder the caller named
RESULTS=${OUT:-$REPO/benchmarks/results}
mkdir -p "$RESULTS"
export OUT=$RESULTS                      # the benchmarks' harness writes CSV rows here
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
LOG=$RESULTS/suite.log
MD=$RESULTS/suite.md
STEPS=$RESULTS/.steps.txt
START=$(date +%s)
START_ISO=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)   # targets.py reads this run's rows only
FAILED=()
: > "$STEPS"

HAS_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$HAS_CUDA" = 1 ]; then DEVICE=cuda; else DEVICE=cpu; fi
if [ $DRY = 0 ] && [ "$DEVICE" != cuda ]; then
  echo "gpu_suite.sh: no CUDA device visible to $PYTHON; use --dry-run on the CPU" >&2
  exit 2
fi

{
  echo "# GPU suite — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), device $DEVICE,"\
       "dry run $DRY, budget ${BUDGET}s"
  if [ "$DEVICE" = cuda ]; then
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
    "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    echo '```'
  fi
  echo
} > "$MD"
: > "$LOG"

remaining() { echo $(( BUDGET - ($(date +%s) - START) )); }

# step NAME LIMIT_S CMD... : run under min(LIMIT, remaining budget) seconds; the output
# goes to the log and to $STEP_OUT (read by bench_nomd).
STEP_OUT=$RESULTS/.step_output.txt
step() {
  local name=$1 limit=$2; shift 2
  local left; left=$(remaining)
  : > "$STEP_OUT"
  if [ "$left" -le 5 ]; then
    echo "SKIP $name: the suite's budget is spent" | tee -a "$LOG"
    echo "- $name: skipped (budget spent)" >> "$STEPS"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$STEP_OUT" 2>&1
  local rc=$?
  cat "$STEP_OUT" >> "$LOG"
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    echo "--- $name ok (${dt}s)" | tee -a "$LOG"
    echo "- $name: ok (${dt}s)" >> "$STEPS"
  else
    local why="exit $rc"
    [ $rc -eq 124 ] && why="timed out"
    echo "--- $name FAILED: $why (${dt}s)" | tee -a "$LOG"
    tail -n 15 "$STEP_OUT"
    echo "- $name: FAILED, $why (${dt}s)" >> "$STEPS"
    FAILED+=("$name")
  fi
}

bench() {  # bench SCRIPT LIMIT ARGS... : run a benchmark script if it exists
  local script=$1 limit=$2; shift 2
  if [ ! -f "benchmarks/$script" ]; then
    echo "SKIP $script: not in this checkout" | tee -a "$LOG"
    echo "- $script: not in this checkout" >> "$STEPS"
    return 0
  fi
  step "$script $*" "$limit" "$PYTHON" "benchmarks/$script" "$@" --md "$MD"
}

bench_nomd() {  # for scripts without --md: their markdown tables are copied from the output
  local script=$1 limit=$2; shift 2
  if [ ! -f "benchmarks/$script" ]; then
    echo "SKIP $script: not in this checkout" | tee -a "$LOG"
    echo "- $script: not in this checkout" >> "$STEPS"
    return 0
  fi
  step "$script $*" "$limit" "$PYTHON" "benchmarks/$script" "$@"
  { echo "### $script $*"; echo; grep -E '^\|' "$STEP_OUT" || echo "(no table)"; echo; } >> "$MD"
}


# 0. A plain checkout (no pip install): memit_fast.kernels is the top-level kernels/ folder,
#    mapped by setup.py at install time; link it in place so the checkout imports as installed.
if ! "$PYTHON" -c "import memit_fast.kernels" 2>/dev/null; then
  [ -e memit_fast/kernels ] || ln -s ../kernels memit_fast/kernels
fi

# 1. Build the extension (in place, so the benchmarks import it from the checkout). In a real
#    run it builds in the background while the Triton tests and benchmarks (which do not
#    need it) run on the GPU; the steps that use it wait for it.
BUILD_PID=""
BUILD_LOG=$RESULTS/build.log
BUILD_T0=$(date +%s)
if [ $DRY = 0 ]; then
  ( timeout --kill-after=10 300 env MAX_JOBS="${MAX_JOBS:-12}" "$PYTHON" setup.py build_ext \
      --inplace > "$BUILD_LOG" 2>&1 ) &
  BUILD_PID=$!
elif [ $WITH_BUILD = 1 ]; then
  step "build extension" 150 env MAX_JOBS="${MAX_JOBS:-16}" "$PYTHON" setup.py build_ext --inplace
fi

wait_build() {  # the background build's result, as a step of its own
  [ -z "$BUILD_PID" ] && return 0
  wait "$BUILD_PID"
  local rc=$? dt=$(( $(date +%s) - BUILD_T0 ))
  BUILD_PID=""
  cat "$BUILD_LOG" >> "$LOG"
  if [ $rc -eq 0 ]; then
    echo "--- build extension ok (${dt}s, in the background)" | tee -a "$LOG"
    echo "- build extension: ok (${dt}s, in the background)" >> "$STEPS"
  else
    echo "--- build extension FAILED: exit $rc (${dt}s)" | tee -a "$LOG"
    tail -n 30 "$BUILD_LOG"
    echo "- build extension: FAILED, exit $rc (${dt}s)" >> "$STEPS"
    FAILED+=("build extension")
  fi
}

run_tests() {  # run_tests NAME LIMIT FILES... : the files that exist, one pytest step
  local name=$1 limit=$2; shift 2
  local files=()
  for f in "$@"; do [ -f "$f" ] && files+=("$f"); done
  [ ${#files[@]} -eq 0 ] && return 0
  step "$name" "$limit" "$PYTHON" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} "${files[@]}" \
    --junitxml="$RESULTS/$(echo "$name" | tr ' ' '_').xml"
}

# 2. GPU tests (files that exist; kernels and extension against their references). The
#    Triton kernels first (no extension needed), the extension and the whole engine after
#    the build. (The nvcc compile test is left to CI: the build above compiles the .cu.)
TRITON_TESTS=${TRITON_TESTS-"tests/test_kernels_covariance.py tests/test_kernels_update.py tests/test_kernels_dispatch.py"}
EXT_TESTS=${EXT_TESTS-"tests/test_ext_cuda.py tests/test_linalg.py tests/test_engine_cuda.py tests/test_published_mode.py"}
if [ $DRY = 0 ] || [ $WITH_TESTS = 1 ]; then
  run_tests "gpu tests triton" 120 $TRITON_TESTS
fi

# 3. Benchmarks: in a real run the kernels and the extension first (no model needed, the
#    extension's tests between them), then the edit end to end on the published architectures.
EDIT_MODELS=${EDIT_MODELS-"llama-2-7b gpt-j-6b gpt2-xl"}
KERNEL_BENCHES=${KERNEL_BENCHES-"covariance update"}
STATS_MODEL=${STATS_MODEL-llama-2-7b}
if [ $DRY = 1 ]; then
  # Miniatures of every architecture (one process), a few requests and steps, one thread.
  models=$(echo $EDIT_MODELS | tr ' ' ',')
  bench bench_edit.py 120 --model "$models" --tiny --device "$DEVICE" --n 2,4 \
    --published-max-n 2 --stats-samples 40 --stats-max-length 32 --steps 3 --threads 1
  bench bench_stats.py 30 --model llama-2-7b --tiny --device "$DEVICE" --samples 8 \
    --max-length 24 --threads 1
  bench_nomd bench_covariance.py 30 --device "$DEVICE" --small --small-d 64 --small-t 256
  bench_nomd bench_update.py 30 --device "$DEVICE" --small --small-dk 64 --small-dh 32 --small-n 8
  bench_nomd bench_linalg.py 30 --device "$DEVICE" --dk 64 --n 8 --rep 1 --trsm library,blocked
  bench bench_targets.py 60 --model mistral-7b --tiny --device "$DEVICE" --n 4 --chunks 2,4 \
    --steps 2 --threads 1 --profile 4 --whole
  bench bench_targets.py 30 --model mistral-7b --tiny --device "$DEVICE" --n 4 --chunks 4 \
    --steps 2 --threads 1 --sdpa no-cudnn
  if [ $WITH_TESTS = 1 ]; then
    wait_build
    run_tests "gpu tests extension and engine" 120 $EXT_TESTS
  fi
else
  # The kernels (no extension needed), then the extension and the engine end to end.
  case " $KERNEL_BENCHES " in *" covariance "*)
    bench_nomd bench_covariance.py 45 --device cuda ;; esac
  case " $KERNEL_BENCHES " in *" update "*)
    bench_nomd bench_update.py 90 --device cuda ${UPDATE_ARGS:-} ;; esac
  wait_build
  # A C++ error of the extension must arrive as a Python exception (some toolchains crash).
  [ "${CHECK_EXT:-1}" = 1 ] && bench_nomd check_ext_exceptions.py 150 --timeout 120
  # One step per file: a fatal error in one names its file and spares the others.
  for f in $EXT_TESTS; do run_tests "gpu tests $(basename "$f" .py)" 90 "$f"; done
  # The acceptance sizes first (dk 16384: n 100 for the update, n 10,000 for the solve).
  bench_nomd bench_linalg.py 120 --device cuda --dk "${LINALG_DK:-16384}" \
    --n "${LINALG_N:-100,10000}" --update-blocks "${LINALG_UPDATE_BLOCKS-0,128,256,1024}" \
    --update-methods "${LINALG_UPDATE_METHODS-qr,chol,product}" --trsm "${LINALG_TRSM-library}"
  if [ "${PROFILE_LINALG:-1}" = 1 ] && [ -f benchmarks/profile_linalg.py ]; then
    step "profile_linalg.py" 60 "$PYTHON" benchmarks/profile_linalg.py --device cuda \
      --dk "${LINALG_DK:-16384}" --n 100 --trsm "${PROFILE_TRSM:-library,blocked}" \
      --out "$RESULTS/profile_linalg.md"
  fi
  # The statistics pass (its rows reach the CSV variant by variant), then the same one pass
  # without cuDNN attention: does a graph per shape cost what llama's pass lost?
  if [ -n "$STATS_MODEL" ]; then
    bench bench_stats.py 90 --model "$STATS_MODEL" --device cuda --samples 1000 \
      --max-length 256 --batch-size 16 --variants "${STATS_VARIANTS:-one_pass,per_layer_stop,per_layer_full}"
    [ "${SDPA_AB:-1}" = 1 ] && bench bench_stats.py 40 --model "$STATS_MODEL" --device cuda \
      --samples 1000 --max-length 256 --batch-size 16 --variants one_pass --sdpa no-cudnn
  fi
  # The target phase by chunk size: does a larger chunk pay on this device, and what does a
  # request cost in memory (the engine's default chunk is 64)? And what prefix reuse saves.
  if [ -n "${TARGETS_MODEL-llama-2-7b}" ]; then
    bench bench_targets.py 100 --model "${TARGETS_MODEL-llama-2-7b}" --device cuda \
      --dtype bfloat16 --n 256 --chunks "${TARGETS_CHUNKS:-32,64,128,256}" --steps 5 --budget-s 80 \
      --profile 64 --whole
    # The same without cuDNN attention (a graph per new shape): is that the per-chunk cost?
    [ "${SDPA_AB:-1}" = 1 ] && bench bench_targets.py 60 --model "${TARGETS_MODEL-llama-2-7b}" \
      --device cuda --dtype bfloat16 --n 256 --chunks 32,64 --steps 5 --budget-s 50 --sdpa no-cudnn
  fi
  if [ "${TUNE_S:-90}" -gt 0 ]; then
    bench_nomd tune_kernels.py $(( ${TUNE_S:-90} + 30 )) --budget-s "${TUNE_S:-90}"
  fi
  # N = 100 in both modes (the side-by-side ratio), then the fast path up the sizes until
  # the step's budget would be overrun (bench_edit.py --budget-s extrapolates).
  # Target chunks sized for about 50 GB of saved activations (the engine halves a chunk
  # that runs out of memory, at the cost of a retry).
  for m in $EDIT_MODELS; do
    n="100,1000,10000"
    chunk=64
    [ "$m" = gpt2-xl ] && { n="100,1000,10000,100000"; chunk=128; }
    bench bench_edit.py 80 --model "$m" --device cuda --dtype bfloat16 --n "$n" \
      --modes "${EDIT_MODES:-fast,published}" --published-max-n 100 --stats-samples 1000 --stats-max-length 256 \
      --target-chunk "$chunk" --key-chunk 256 --budget-s 70
  done
fi

# 4. The issues' GPU targets from this run's rows (met / missed / not measured), then plots
#    from every CSV in the results folder.
if [ $DRY = 1 ]; then TARGET_DEVICE=(--device "$DEVICE"); else TARGET_DEVICE=(); fi
bench_nomd targets.py 30 --results "$RESULTS" --since "$START_ISO" "${TARGET_DEVICE[@]}"
step "plot" 60 "$PYTHON" benchmarks/plot.py --results "$RESULTS" --out "$RESULTS"

{
  echo "## Steps"
  echo
  cat "$STEPS"
  echo
  echo "Total $(( $(date +%s) - START ))s."
} >> "$MD"
rm -f "$STEPS" "$STEP_OUT"

if [ $PACK = 1 ]; then
  # Written beside the folder, then moved in (tar refuses a folder that grows as it reads).
  # The loose files are deleted only from a folder named by $OUT (never the checkout's
  # benchmarks/results, whose files are tracked).
  PACKED=$(mktemp -d)/gpu_suite_results.tar.gz
  (cd "$RESULTS" && tar czf "$PACKED" --exclude suite.md --exclude suite.log . && \
    if [ -n "$OUT_GIVEN" ]; then
      find . -maxdepth 1 -type f ! -name suite.md ! -name suite.log -delete
    fi && \
    mv "$PACKED" gpu_suite_results.tar.gz)
fi

echo "results in $RESULTS ($(( $(date +%s) - START ))s)"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED steps: ${FAILED[*]}" >&2
  exit 1
fi
exit 0
