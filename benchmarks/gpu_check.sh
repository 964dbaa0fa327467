#!/usr/bin/env bash
# Checks a GPU machine end to end in about 8 minutes (an H100/H200 with 16 cores):
#   build against the torch present, the CUDA tests, a compute-sanitizer memcheck subset, the CUDA
#   benchmarks with few rounds, CPU-vs-CUDA learning parity, train + evaluate + predict on CUDA,
#   and a search with several workers on one GPU. Prints a short table last.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default OUT_DIR: ./gpu-check)
#
# Writes OUT_DIR/gpu_check.md (the table and every figure), OUT_DIR/gpu_check.json (the figures),
# OUT_DIR/gpu_check.log (every step's output) and OUT_DIR/bench_cuda.json (pytest-benchmark).
# Needs python3 with a CUDA build of torch, numpy, scipy, rich, pytest, pytest-benchmark, nvcc and
# compute-sanitizer; no package registry (the build uses --no-build-isolation's logic: setup.py
# build_ext --inplace against the torch present).
#
# Environment:
#   PYTHON                 the interpreter (default python3)
#   GPU_CHECK_DEVICE       cuda (default) or cpu: a dry run of every step's plumbing without a GPU
#                          (CUDA-only steps are skipped, budgets are tiny)
#   GPU_CHECK_SKIP         steps to leave out, e.g. "racecheck bench"
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
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT_DIR/gpu_check.log
STEPS=$OUT_DIR/steps.tsv
: > "$LOG"; : > "$STEPS"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XMCNAS_CACHE=$WORK/cache
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
XMC=("$PY" -m xmcnas_fast)

# step NAME SECONDS CMD...: run CMD with a time limit, its output appended to the log under a header;
# record pass/fail and seconds. A failed step does not stop the check.
step() {
  local name=$1 limit=$2; shift 2
  if [[ "$SKIP" == *" $name "* ]]; then printf '%s\tskipped\t0\n' "$name" >> "$STEPS"; return 0; fi
  echo "== $name: $*" | tee -a "$LOG"
  local t0 rc
  t0=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  local secs
  secs=$("$PY" -c "print(round($(date +%s.%N) - $t0, 1))")
  local status=pass
  [ "$rc" = 0 ] || status="FAIL(rc=$rc)"
  [ "$rc" = 124 ] && status="FAIL(timeout ${limit}s)"
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
step build 600 "$PY" setup.py -q build_ext --inplace
"$PY" -c "from xmcnas_fast import ops; print('kernels:', ops.extension_status())" 2>&1 | tee -a "$LOG"

# ---- 2. every CUDA test; the build check, the device-path and precision tests ---------------------
if cuda_only tests; then
  step tests 420 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests
fi
step host_paths 420 "$PY" -m pytest -q -p no:cacheprovider tests/test_build.py tests/test_device_paths.py \
  tests/test_precision.py

# ---- 3. memory and shared-memory hazards in the kernels: compute-sanitizer on subsets -------------
KERNEL_TESTS=(tests/test_label_attention.py tests/test_label_attention_gemm.py tests/test_layer_sum.py tests/test_dropout.py tests/test_cuda_ops.py)
if cuda_only sanitizer; then
  step sanitizer 240 compute-sanitizer --tool memcheck --error-exitcode 3 --print-limit 20 \
    "$PY" -m pytest -q -x -p no:cacheprovider -m cuda "${KERNEL_TESTS[@]}" \
    -k "not float64 and not eurlex and not many_rows and not large and not gradcheck and not opcheck"
fi
if cuda_only racecheck; then   # the tensor-core kernels' shared-memory tiles, bf16 with and without values;
  # the cuBLAS path's softmax, whose token groups meet in shared memory
  step racecheck 180 compute-sanitizer --tool racecheck --error-exitcode 3 --print-limit 20 \
    "$PY" -m pytest -q -x -p no:cacheprovider -m cuda tests/test_label_attention.py tests/test_label_attention_gemm.py \
    -k "(values_and_gradients and bfloat16 and (5x37x24x50 or 3x65x520x40)) or (any_block and float32)"
fi

# ---- 4. the CUDA benchmarks, few rounds ----------------------------------------------------------
if cuda_only bench; then
  step bench 300 "$PY" -m pytest -q -p no:cacheprovider benchmarks/bench_cuda.py --benchmark-enable \
    --benchmark-min-rounds=3 --benchmark-max-time=0.05 --benchmark-warmup=on \
    --benchmark-columns=min,median,rounds --benchmark-sort=name --benchmark-json="$OUT_DIR/bench_cuda.json"
fi

# ---- 5. learning parity: the same preset, steps and seed on CPU and CUDA -------------------------
if cuda_only parity; then
  step parity 420 "$PY" -m pytest -q -s -p no:cacheprovider --run-slow tests/test_learning_parity.py
fi

# ---- 6. train, evaluate and predict on the device ------------------------------------------------
BUNDLE=$WORK/models/axml
if [ "$DEVICE" = cuda ]; then TRAIN_ARGS=(--max-minutes "$TRAIN_MIN"); else TRAIN_ARGS=(--max-steps 20 --eval-every 10 --width 32 --emb-dim 32); fi
step train $(( ${TRAIN_MIN%.*} * 60 + 240 )) "${XMC[@]}" train --arch attentionxml --device "$DEVICE" --out "$BUNDLE" \
  --quiet "${TRAIN_ARGS[@]}"
step evaluate 180 "${XMC[@]}" evaluate "$BUNDLE" --device "$DEVICE" --json
step predict 120 "${XMC[@]}" predict "$BUNDLE" \
  "a text editor for the terminal, written in C" "python library to parse xml documents" --device "$DEVICE" -k 5 --json

# ---- 7. a search with several workers on one GPU -------------------------------------------------
for w in $WORKERS; do
  if [ "$DEVICE" = cuda ]; then DEVS="cuda:0x$w"; SEARCH_ARGS=(--population 4 --cycles 4 --epochs 1);
  else DEVS="cpu:$w"; SEARCH_ARGS=(--population 2 --cycles 2 --sample 2 --max-steps 10 --eval-every 5 --width 16 --emb-dim 16); fi
  step "search_x$w" 420 "${XMC[@]}" search --devices "$DEVS" --name "gpu-check-x$w" --runs-dir "$WORK/runs" --plain \
    "${SEARCH_ARGS[@]}"
done

# ---- the table -----------------------------------------------------------------------------------
"$PY" benchmarks/gpu_check_report.py --steps "$STEPS" --log "$LOG" --bundle "$BUNDLE" --runs "$WORK/runs" \
  --bench "$OUT_DIR/bench_cuda.json" --out "$OUT_DIR" --device "$DEVICE"
rc=$?
rm -f "$STEPS"
exit $rc
