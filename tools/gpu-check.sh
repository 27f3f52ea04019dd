#!/usr/bin/env bash
# gpu-check: on a machine with an NVIDIA GPU, builds the CUDA preset (the CUDA backend, its
# tests and its benchmark), runs the GPU tests (ctest -L gpu) and the grouped-GEMM benchmark,
# and prints a summary table. Sized for one H200 in under 8 minutes (16 cores to build).
#   tools/gpu-check.sh               # everything
#   QUICK=1 tools/gpu-check.sh       # benchmark on fewer batch sizes
#   BUILD=build/x JOBS=8 tools/gpu-check.sh
# Exit status: 0 when every step passed, 1 otherwise, 2 when no GPU is visible.
set -uo pipefail
cd "$(dirname "$0")/.."

BUILD=${BUILD:-build/gpu-check}
JOBS=${JOBS:-$(nproc)}
LOGS="$BUILD/gpu-check-logs"
mkdir -p "$LOGS"
declare -a STEPS=() RESULTS=() SECONDS_TAKEN=()

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  echo "== $name: $*"
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  STEPS+=("$name")
  SECONDS_TAKEN+=($((SECONDS - t0)))
  if [[ $rc -eq 0 ]]; then RESULTS+=("ok"); elif [[ $rc -eq 124 ]]; then RESULTS+=("TIMEOUT"); else RESULTS+=("FAIL($rc)"); fi
  tail -n 5 "$LOGS/$name.log"
  return $rc
}

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU visible (nvidia-smi -L failed)" >&2
  exit 2
fi
nvidia-smi -L

step configure 120 cmake --preset cuda -B "$BUILD" -DEXPERTMESH_SERVICES=OFF \
  -DEXPERTMESH_BENCHMARKS=ON "-DCMAKE_CUDA_FLAGS=--threads=4"
step build 300 cmake --build "$BUILD" -j "$JOBS" \
  --target cuda_host_test cuda_kernels_test bench_grouped_gemm
step unit-tests 60 ctest --test-dir "$BUILD" -R '^cuda_host_test$' --output-on-failure
step gpu-tests 240 ctest --test-dir "$BUILD" -L gpu --output-on-failure -V
BENCH_ARGS=(--iters 10)
[[ -n "${QUICK:-}" ]] && BENCH_ARGS+=(--quick)
step benchmark 240 "$BUILD/core/cuda/bench/bench_grouped_gemm" "${BENCH_ARGS[@]}"

echo
echo "================ gpu-check summary ================"
printf '%-12s %-10s %8s\n' step result seconds
status=0
for i in "${!STEPS[@]}"; do
  printf '%-12s %-10s %8s\n' "${STEPS[$i]}" "${RESULTS[$i]}" "${SECONDS_TAKEN[$i]}"
  [[ ${RESULTS[$i]} == ok ]] || status=1
done
echo
echo "-- kernel accuracy (measured by the GPU tests)"
grep -h '\[measured\]' "$LOGS/gpu-tests.log" 2>/dev/null | sed 's/^[0-9]*: //' || true
grep -hE '^\[  (FAILED|SKIPPED) ' "$LOGS/gpu-tests.log" 2>/dev/null | sort -u || true
echo
echo "-- benchmark"
sed -n '/^device:/,$p' "$LOGS/benchmark.log" 2>/dev/null || true
echo
echo "logs: $LOGS"
exit $status
