#!/usr/bin/env bash
# Checks a GPU machine end to end within a time budget (default 8 minutes on the GPU): build against
# the torch present, every CUDA test over both kernel paths, compute-sanitizer (memcheck per test file,
# racecheck per 16-bit dtype, synccheck), the host-side build, device-path and precision tests, the
# CUDA benchmarks with few rounds, train + evaluate + predict on CUDA, a search with several workers
# on one GPU, and CPU-vs-CUDA learning parity. Prints a short table last, and which steps were cut
# short.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default OUT_DIR: ./gpu-check)
#
# Writes OUT_DIR/gpu_check.md (the table and every figure), OUT_DIR/gpu_check.json (the figures),
# OUT_DIR/gpu_check.log (every step's output) and OUT_DIR/bench_cuda.json (pytest-benchmark).
# Needs python3 with a CUDA build of torch, numpy, scipy, rich, pytest, pytest-benchmark, nvcc and
# compute-sanitizer; no package registry (the build uses --no-build-isolation's logic: setup.py
# build_ext --inplace against the torch present).
#
# Time: every step has its own limit, so a slow step cannot starve the others, and the steps share
# one budget: a step gets at most what is left of it, and a step with nothing left is not started.
# The kernel checks come first; the figures of the tool (bench, train, search, parity) take what
# remains. A step stopped by its limit, or never started, is "cut short": the table says which, and
# the check exits 2 when steps were cut short and none failed (1 when one failed).
#
# Environment:
#   PYTHON                 the interpreter (default python3)
#   GPU_CHECK_DEVICE       cuda (default) or cpu: a dry run of every step's plumbing without a GPU
#                          (CUDA-only steps are skipped, budgets are tiny)
#   GPU_CHECK_BUDGET       seconds for all the steps together (default 480 on cuda, 3600 on cpu);
#                          GPU_CHECK_BUDGET=1500 leaves the tool's figures room enough
#   GPU_CHECK_SKIP         steps to leave out, e.g. "racecheck_bf16 bench parity"
#   GPU_CHECK_TRAIN_MIN    minutes of `train --arch attentionxml` (default 1; RESULTS.md quotes 5)
#   GPU_CHECK_WORKERS      workers on one GPU for the search, one search each (default "4"; "1 2 4"
#                          gives the candidates-per-hour comparison)
#   TORCH_CUDA_ARCH_LIST   default: the GPU's own compute capability
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${1:-gpu-check}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SKIP=" ${GPU_CHECK_SKIP:-} "
TRAIN_MIN=${GPU_CHECK_TRAIN_MIN:-1}
WORKERS=${GPU_CHECK_WORKERS:-4}
if [ "$DEVICE" = cuda ]; then BUDGET=${GPU_CHECK_BUDGET:-480}; else BUDGET=${GPU_CHECK_BUDGET:-3600}; fi
START=$(date +%s)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT_DIR/gpu_check.log
STEPS=$OUT_DIR/steps.tsv
: > "$LOG"; : > "$STEPS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XMCNAS_CACHE=$WORK/cache
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
unset XMCNAS_CUDA_SIMPLE_KERNELS  # the steps that force the simple kernels say so
XMC=("$PY" -m xmcnas_fast)

# lim CUDA CPU: a step's own limit in seconds, on the GPU or in the CPU dry run.
lim() { if [ "$DEVICE" = cuda ]; then echo "$1"; else echo "$2"; fi; }

# step NAME SECONDS CMD...: run CMD with a time limit (at most what is left of the budget), its output
# appended to the log under a header; record pass / fail / cut short and seconds. A failed step does
# not stop the check.
step() {
  local name=$1 limit=$2; shift 2
  if [[ "$SKIP" == *" $name "* ]]; then printf '%s\tskipped\t0\n' "$name" >> "$STEPS"; return 0; fi
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 5 ]; then
    printf '%s\tCUT(no time left)\t0\n' "$name" >> "$STEPS"
    echo "== $name: cut short, no time left of the ${BUDGET}s budget" | tee -a "$LOG"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name: $*" | tee -a "$LOG"
  local t0 rc
  t0=$(date +%s.%N)
  timeout --kill-after=5 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  local secs
  secs=$("$PY" -c "print(round($(date +%s.%N) - $t0, 1))")
  local status=pass
  [ "$rc" = 0 ] || status="FAIL(rc=$rc)"
  { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && status="CUT(timeout ${limit}s)"
  printf '%s\t%s\t%s\n' "$name" "$status" "$secs" >> "$STEPS"
  echo "   $status in ${secs}s" | tee -a "$LOG"
  return "$rc"
}
cuda_only() { [ "$DEVICE" = cuda ] || { printf '%s\tskipped (no GPU)\t0\n' "$1" >> "$STEPS"; return 1; }; }

# ---- 1. build against the torch present ----------------------------------------------------------
if [ "$DEVICE" = cuda ]; then
  export FORCE_CUDA=1 XMCNAS_EXPECT_CUDA_BUILD=1
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
  fi
else
  export XMCNAS_NO_CUDA=1
fi
step build "$(lim 90 900)" "$PY" setup.py -q build_ext --inplace
"$PY" -c "from xmcnas_fast import ops; print('kernels:', ops.extension_status())" 2>&1 | tee -a "$LOG"

# ---- 2. every CUDA test, as the kernels are chosen and with the simple kernels forced ---------------
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
if cuda_only tests; then
  step tests 60 "${PYTEST[@]}" -m cuda tests
fi
# The 16-bit shapes the tensor cores take on this GPU, again on the simple kernels (the edge cases of
# tests/test_label_attention_edges.py run on both paths in the step above: `cuda` and `cuda-simple`).
if cuda_only tests_simple; then
  step tests_simple 40 env XMCNAS_CUDA_SIMPLE_KERNELS=1 "${PYTEST[@]}" -m cuda tests/test_label_attention.py
fi

# ---- 3. compute-sanitizer: memory errors per test file, every dtype; shared-memory races of every
# kernel with shared memory, per 16-bit dtype; barrier misuse once ----------------------------------
# memcheck NAME SECONDS FILE: the file's CUDA tests, every dtype (float64 included), stopping at the first failure.
memcheck() {
  local name=$1 limit=$2 file=$3
  cuda_only "$name" && step "$name" "$limit" compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
    "${PYTEST[@]}" -x -m cuda "$file"
}
memcheck memcheck_label_attention 50 tests/test_label_attention.py
memcheck memcheck_edges 45 tests/test_label_attention_edges.py
memcheck memcheck_gemm 25 tests/test_label_attention_gemm.py
memcheck memcheck_layer_sum 15 tests/test_layer_sum.py
memcheck memcheck_dropout 10 tests/test_dropout.py
memcheck memcheck_topk 15 tests/test_cuda_ops.py

# The tests that reach each kernel with shared memory in dtype $1, appended to SEL: the tensor-core
# forward, grad_W and grad_h kernels without and with separate values (L = 129: several label tiles);
# the cuBLAS path's softmax (16-bit probabilities out; the private op, so on any GPU); layer_sum's
# backward; top-k's selection (k = 5: warp lists) and sort (k = 77) paths.
SEL=()
shared_memory_tests() {
  local dt=torch.$1
  SEL+=("tests/test_label_attention_edges.py::test_label_counts_around_the_tiles[cuda-None-129-$dt]"
        "tests/test_label_attention_edges.py::test_label_counts_around_the_tiles[cuda-40-129-$dt]"
        "tests/test_label_attention_gemm.py::test_values_and_gradients_for_any_block_of_labels[cuda-24-7-$dt]"
        "tests/test_layer_sum.py::test_values_and_gradients[cuda-$dt-4-(7, 33, 9)]"
        "tests/test_cuda_ops.py::test_topk_metrics_matches_reference[$dt-5]"
        "tests/test_cuda_ops.py::test_topk_metrics_matches_reference[$dt-77]")
}
for dt in bfloat16 float16; do
  name=racecheck_${dt/bfloat16/bf16}; name=${name/float16/fp16}
  if cuda_only "$name"; then
    SEL=(); shared_memory_tests "$dt"
    step "$name" 25 compute-sanitizer --tool racecheck --error-exitcode 3 --print-limit 20 "${PYTEST[@]}" "${SEL[@]}"
  fi
done
if cuda_only synccheck; then
  SEL=(); shared_memory_tests bfloat16; shared_memory_tests float16
  step synccheck 20 compute-sanitizer --tool synccheck --error-exitcode 3 --print-limit 20 "${PYTEST[@]}" "${SEL[@]}"
fi

# ---- 4. the build check, the device-path and precision tests (host side; CI runs them too) --------
step host_paths "$(lim 60 1800)" "${PYTEST[@]}" tests/test_build.py tests/test_device_paths.py tests/test_precision.py

# ---- 5. the CUDA benchmarks, few rounds ----------------------------------------------------------
if cuda_only bench; then
  step bench 40 "${PYTEST[@]}" benchmarks/bench_cuda.py --benchmark-enable \
    --benchmark-min-rounds=3 --benchmark-max-time=0.05 --benchmark-warmup=on \
    --benchmark-columns=min,median,rounds --benchmark-sort=name --benchmark-json="$OUT_DIR/bench_cuda.json"
fi

# ---- 6. train, evaluate and predict on the device ------------------------------------------------
BUNDLE=$WORK/models/axml
if [ "$DEVICE" = cuda ]; then TRAIN_ARGS=(--max-minutes "$TRAIN_MIN"); else TRAIN_ARGS=(--max-steps 20 --eval-every 10 --width 32 --emb-dim 32); fi
step train $(( ${TRAIN_MIN%.*} * 60 + $(lim 60 240) )) "${XMC[@]}" train --arch attentionxml --device "$DEVICE" \
  --out "$BUNDLE" --quiet "${TRAIN_ARGS[@]}"
step evaluate "$(lim 40 180)" "${XMC[@]}" evaluate "$BUNDLE" --device "$DEVICE" --json
step predict "$(lim 30 120)" "${XMC[@]}" predict "$BUNDLE" \
  "a text editor for the terminal, written in C" "python library to parse xml documents" --device "$DEVICE" -k 5 --json

# ---- 7. a search with several workers on one GPU -------------------------------------------------
# The search fuses its candidates with the lexical stage, which needs napkinXC: a machine without a
# package registry may lack it (install its wheel first: pip install --no-index napkinxc-*.whl), and
# then the search runs with the networks alone, as the log says.
LEXICAL=()
if ! "$PY" -c "import napkinxc" 2>/dev/null; then
  LEXICAL=(--no-lexical)
  echo "napkinXC is not installed: the search steps run without the lexical stage (--no-lexical)" | tee -a "$LOG"
fi
for w in $WORKERS; do
  # The final training of the best candidate: one epoch, at most a minute (the demo budget's default
  # trains it until minute 9).
  FINAL_ARGS=(--final-epochs 1 --final-minutes 1)
  if [ "$DEVICE" = cuda ]; then DEVS="cuda:0x$w"; SEARCH_ARGS=(--population 4 --cycles 4 --epochs 1 "${FINAL_ARGS[@]}");
  else DEVS="cpu:$w"; SEARCH_ARGS=(--population 2 --cycles 2 --sample 2 --max-steps 10 --eval-every 5 --width 16 --emb-dim 16
                                   "${FINAL_ARGS[@]}"); fi
  step "search_x$w" 420 "${XMC[@]}" search --devices "$DEVS" --name "gpu-check-x$w" --runs-dir "$WORK/runs" --plain \
    "${SEARCH_ARGS[@]}" "${LEXICAL[@]}"
done

# ---- 8. learning parity: the same preset, steps and seed on CPU and CUDA (the longest step) -------
if cuda_only parity; then
  step parity 420 "${PYTEST[@]}" -s --run-slow tests/test_learning_parity.py
fi

# ---- the table -----------------------------------------------------------------------------------
"$PY" benchmarks/gpu_check_report.py --steps "$STEPS" --log "$LOG" --bundle "$BUNDLE" --runs "$WORK/runs" \
  --bench "$OUT_DIR/bench_cuda.json" --out "$OUT_DIR" --device "$DEVICE"
rc=$?
rm -f "$STEPS"
exit $rc
