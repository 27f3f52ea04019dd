#!/usr/bin/env bash
# gpu-check: the CUDA backend's GPU checks in one go -- build the CUDA preset, run the host-side
# tests, the GPU kernel tests (ctest label gpu), the GPU engine against the reference engine
# (cuda_engine_test: TP 1, and TP 2 where two GPUs are visible) and the grouped-GEMM benchmark,
# then print a summary table. Sized for one H200 in under 8 minutes.
#
#   tools/gpu-check.sh                      # on a GPU machine with the build dependencies
#   tools/gpu-check.sh --bundle DIR         # here (no GPU needed): build, then put the test and
#                                           # benchmark binaries and the non-CUDA shared
#                                           # libraries they need into DIR (~20 MB)
#   tools/gpu-check.sh --prebuilt DIR       # on a GPU machine that lacks the build dependencies
#                                           # (only the CUDA toolkit / driver): run from DIR
# Environment: BUILD (build dir, default build/gpu-check), JOBS, NVCC_THREADS, QUICK=1 (fewer
# benchmark shapes), MEMCHECK=0 (skip compute-sanitizer), GPU_CHECK_LOGS (where the step logs go;
# default $BUILD/gpu-check-logs).
# Exit status: 0 when every step passed, 1 otherwise, 2 when no GPU is visible (run modes).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=full
DIR=""
case "${1:-}" in
  --bundle) MODE=bundle; DIR=${2:?--bundle needs a directory} ;;
  --prebuilt) MODE=prebuilt; DIR=${2:?--prebuilt needs a directory} ;;
  "") ;;
  -h|--help) sed -n '2,/^set /p' "$0" | grep '^#'; exit 0 ;;
  *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 1 ;;
esac

BUILD=${BUILD:-build/gpu-check}
JOBS=${JOBS:-$(nproc)}
# nvcc compiles the four architectures of a file in parallel threads on a GPU machine's many
# cores; a bundle is built on a shared development machine: one thread.
NVCC_THREADS=${NVCC_THREADS:-$([[ $MODE == bundle ]] && echo 1 || echo 4)}
LOGS=${GPU_CHECK_LOGS:-$BUILD/gpu-check-logs}
mkdir -p "$LOGS"
TARGETS=(cuda_host_test cuda_kernels_test cuda_nccl_test cuda_engine_test bench_grouped_gemm)
declare -a STEPS=() RESULTS=() TAKEN=()

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  echo "== $name: $*"
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  STEPS+=("$name")
  TAKEN+=($((SECONDS - t0)))
  if [[ $rc -eq 0 ]]; then RESULTS+=("ok"); elif [[ $rc -eq 124 ]]; then RESULTS+=("TIMEOUT");
  else RESULTS+=("FAIL($rc)"); fi
  tail -n 4 "$LOGS/$name.log"
  return $rc
}

build() {
  step configure 180 cmake --preset cuda -B "$BUILD" -DEXPERTMESH_SERVICES=OFF \
    -DEXPERTMESH_BENCHMARKS=ON "-DCMAKE_CUDA_FLAGS=--threads=${NVCC_THREADS}" || return 1
  # Without NCCL the library builds without NcclGroup and there is no NCCL test.
  if ! grep -q 'cuda_nccl_test:' "$BUILD/build.ninja"; then
    TARGETS=("${TARGETS[@]/cuda_nccl_test/}")
  fi
  step build 420 cmake --build "$BUILD" -j "$JOBS" --target ${TARGETS[@]}
}

summary() {
  echo
  echo "================ gpu-check summary ================"
  printf '%-12s %-10s %8s\n' step result seconds
  local status=0 i
  for i in "${!STEPS[@]}"; do
    printf '%-12s %-10s %8s\n' "${STEPS[$i]}" "${RESULTS[$i]}" "${TAKEN[$i]}"
    [[ ${RESULTS[$i]} == ok || ${RESULTS[$i]} == n/a ]] || status=1
  done
  if [[ -f "$LOGS/gpu-tests.log" ]]; then
    echo
    echo "-- kernel accuracy (measured by the GPU tests)"
    grep -h '\[measured\]' "$LOGS/gpu-tests.log" "$LOGS/engine-test.log" 2>/dev/null |
      sed 's/^[0-9]*: //'
    grep -hE '^\[  (FAILED|SKIPPED) ' "$LOGS/gpu-tests.log" "$LOGS/engine-test.log" 2>/dev/null |
      sort -u
  fi
  if [[ -f "$LOGS/benchmark.log" ]]; then
    echo
    echo "-- benchmark"
    sed -n '/^device:/,$p' "$LOGS/benchmark.log"
  fi
  echo
  echo "logs: $LOGS"
  return $status
}

if [[ $MODE == bundle ]]; then
  build || { summary; exit 1; }
  mkdir -p "$DIR/bin" "$DIR/lib"
  for t in tests/cuda/cuda_host_test tests/cuda/cuda_kernels_test tests/cuda/cuda_nccl_test \
    tests/cuda/cuda_engine_test core/kernels/cuda/bench/bench_grouped_gemm; do
    [[ -f "$BUILD/$t" ]] && cp "$BUILD/$t" "$DIR/bin/"
  done
  # Shared libraries outside glibc / libstdc++ and outside CUDA (the GPU machine has those).
  for bin in "$DIR"/bin/*; do
    ldd "$bin" | awk '$3 ~ /^\// {print $3}'
  done | sort -u | grep -vE '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+)\.so|ld-linux|/cuda' |
    while read -r lib; do cp -L "$lib" "$DIR/lib/"; done
  du -sh "$DIR"
  echo "bundle ready: run 'tools/gpu-check.sh --prebuilt $DIR' on the GPU machine"
  exit 0
fi

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU visible (nvidia-smi -L failed)" >&2
  exit 2
fi
nvidia-smi -L

if [[ $MODE == full ]]; then
  build || { summary; exit 1; }
  BIN_HOST="$BUILD/tests/cuda/cuda_host_test"
  BIN_KERNELS="$BUILD/tests/cuda/cuda_kernels_test"
  BIN_NCCL="$BUILD/tests/cuda/cuda_nccl_test"
  BIN_ENGINE="$BUILD/tests/cuda/cuda_engine_test"
  BIN_BENCH="$BUILD/core/kernels/cuda/bench/bench_grouped_gemm"
else
  # CUDA libraries (cudart, cublasLt, nccl) come from the machine: the toolkit or the Python
  # wheels of its PyTorch.
  libpath="$DIR/lib"
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d $d ]] && libpath+=":$d"
  done
  nvidia_root=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)
  for d in "$nvidia_root"/nvidia/*/lib "$nvidia_root"/nvidia/*/*/lib; do
    [[ -d $d ]] && libpath+=":$d"
  done
  export LD_LIBRARY_PATH="$libpath${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  BIN_HOST="$DIR/bin/cuda_host_test"
  BIN_KERNELS="$DIR/bin/cuda_kernels_test"
  BIN_NCCL="$DIR/bin/cuda_nccl_test"
  BIN_ENGINE="$DIR/bin/cuda_engine_test"
  BIN_BENCH="$DIR/bin/bench_grouped_gemm"
fi

step unit-tests 60 "$BIN_HOST"
step gpu-tests 300 "$BIN_KERNELS"
[[ -x $BIN_NCCL ]] && step nccl-test 60 "$BIN_NCCL"
# The engine test reads the bundled models; point it at this checkout's (a bundle's binary was
# built elsewhere).
export EXPERTMESH_MODELS_DIR="$PWD/models"
step engine-test 300 "$BIN_ENGINE"
# Out-of-bounds and race checks of the kernels on the small shapes (MEMCHECK=0 skips). Where the
# sanitizer cannot attach to the device (some virtualized machines), the step reads "n/a".
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [[ ${MEMCHECK:-1} != 0 && -n $SANITIZER ]]; then
  SMALL='GroupedGemmGpuTest.BundledModelShape:GroupedGemmGpuTest.RaggedEdgesAndLargeGroups:'
  SMALL+='GroupedGemmGpuTest.EmptyBatchAndRowsWithoutExperts:OpsGpuTest.*:CudaExpertsTest.*'
  # racecheck instruments every shared-memory access: the smallest GEMM and the smem-heavy ops.
  RACE='GroupedGemmGpuTest.BundledModelShape:OpsGpuTest.GateTopk*:OpsGpuTest.MlaDecode*'
  for tool in memcheck racecheck; do
    filter=$SMALL
    [[ $tool == racecheck ]] && filter=$RACE
    if ! step "$tool" 180 "$SANITIZER" --tool "$tool" --error-exitcode 1 "$BIN_KERNELS" \
      "--gtest_filter=$filter" &&
      grep -qE 'not supported|Failed to initialize|LibraryNotLoaded|error 999' "$LOGS/$tool.log"; then
      RESULTS[-1]="n/a"
    fi
  done
  # The GPU engine's own kernels and buffer sizes: one TP 1 run of the FP8 model.
  if ! step engine-memcheck 180 "$SANITIZER" --tool memcheck --error-exitcode 1 "$BIN_ENGINE" \
    '--gtest_filter=Bundled/CudaEngineTest.MatchesReferenceEngine/expertmesh_tiny_tp1' &&
    grep -qE 'not supported|Failed to initialize|LibraryNotLoaded|error 999' \
      "$LOGS/engine-memcheck.log"; then
    RESULTS[-1]="n/a"
  fi
fi
BENCH_ARGS=(--iters 10)
[[ -n "${QUICK:-}" ]] && BENCH_ARGS+=(--quick)
step benchmark 240 "$BIN_BENCH" "${BENCH_ARGS[@]}"
summary
