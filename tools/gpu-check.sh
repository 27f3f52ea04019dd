#!/usr/bin/env bash
# gpu-check: the CUDA backend's GPU checks in one go -- build the CUDA preset, run the host-side
# tests, the GPU kernel tests (ctest label gpu), the GPU engine against the reference engine
# (cuda_engine_test: TP 1, and TP 2 where two GPUs are visible) and the grouped-GEMM benchmark,
# then print a summary table. Sized for one H200 in under 8 minutes.
#
#   tools/gpu-check.sh                      # on a GPU machine with the build dependencies
#   tools/gpu-check.sh --bundle DIR         # here (no GPU needed): build, then put the test and
#                                           # benchmark binaries and every shared library they
#                                           # need except glibc, libstdc++/libgcc and the CUDA
#                                           # toolkit's own (cudart, cuBLAS) into DIR -- NCCL
#                                           # included -- check with ldd that nothing is missing,
#                                           # and write the glibc / libstdc++ it needs to
#                                           # DIR/REQUIREMENTS
#   tools/gpu-check.sh --check-bundle DIR   # only the ldd check of a bundle (status 1: missing)
#   tools/gpu-check.sh --prebuilt DIR       # on a GPU machine that lacks the build dependencies
#                                           # (only the CUDA toolkit / driver): run from DIR
# Environment: BUILD (build dir, default build/gpu-check; build/ci for --bundle), JOBS, NVCC_THREADS, QUICK=1 (fewer
# benchmark shapes), MEMCHECK=0 (skip compute-sanitizer), GPU_CHECK_LOGS (where the step logs go;
# default $BUILD/gpu-check-logs).
# Exit status: 0 when every step passed, 1 otherwise (also when a test skipped for lack of a GPU
# although nvidia-smi lists one, or when the driver is older than the CUDA 13 runtime needs),
# 2 when no GPU is visible (run modes).
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=full
DIR=""
case "${1:-}" in
  --bundle) MODE=bundle; DIR=${2:?--bundle needs a directory} ;;
  --prebuilt) MODE=prebuilt; DIR=${2:?--prebuilt needs a directory} ;;
  --check-bundle) MODE=check; DIR=${2:?--check-bundle needs a directory} ;;
  "") ;;
  -h|--help) sed -n '2,/^set /p' "$0" | grep '^#'; exit 0 ;;
  *) echo "gpu-check: unknown argument '$1' (see --help)" >&2; exit 1 ;;
esac

# The bundled models, for every test step (a bundle's binaries were built in another checkout).
export EXPERTMESH_MODELS_DIR=${EXPERTMESH_MODELS_DIR:-$PWD/models}
# The CUDA 13 runtime needs an r580 driver (580.65.06 on Linux, CUDA 13.0 GA).
MIN_DRIVER=580.65.06
# Libraries a GPU machine brings itself: glibc, the compiler runtime, the driver, and the CUDA
# toolkit's runtime and cuBLAS (its toolkit or PyTorch's wheels). NCCL is not among them.
SYSTEM_LIBS='/(libc|libm|libdl|libpthread|librt|libresolv|libutil|libgcc_s|libstdc\+\+)\.so|ld-linux|linux-vdso'
TOOLKIT_LIBS='/(libcuda|libcudart|libcublas|libcublasLt|libnvrtc|libnvJitLink)\.so'

# A bundle is built on the development machine in its CI build tree (preset ci, which compiles
# the CUDA backend where nvcc exists); the run modes use a build of their own (preset cuda).
BUILD=${BUILD:-$([[ $MODE == bundle ]] && echo build/ci || echo build/gpu-check)}
JOBS=${JOBS:-$(nproc)}
# nvcc compiles the four architectures of a file in parallel threads on a GPU machine's many
# cores (a bundle uses the CI build's own settings).
NVCC_THREADS=${NVCC_THREADS:-4}
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
  if [[ $MODE == bundle ]]; then
    step configure 180 cmake --preset ci -B "$BUILD" -DEXPERTMESH_BENCHMARKS=ON || return 1
  else
    step configure 180 cmake --preset cuda -B "$BUILD" -DEXPERTMESH_SERVICES=OFF \
      -DEXPERTMESH_BENCHMARKS=ON "-DCMAKE_CUDA_FLAGS=--threads=${NVCC_THREADS}" || return 1
  fi
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

# check_libs DIR: every binary of DIR/bin and library of DIR/lib resolves all its shared
# libraries (with DIR/lib first on the path), and everything outside glibc / libstdc++ and the
# CUDA toolkit resolves into DIR/lib. Prints what is missing; status 1 then.
check_libs() {
  local dir=$1 f out bad=0
  for f in "$dir"/bin/* "$dir"/lib/*; do
    [[ -f $f ]] || continue
    out=$(LD_LIBRARY_PATH="$dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$f" 2>&1)
    if grep -q 'not found' <<<"$out"; then
      echo "gpu-check: $f: $(grep 'not found' <<<"$out" | awk '{print $1}' | tr '\n' ' ')not found" >&2
      bad=1
    fi
    if [[ $MODE == bundle ]]; then
      # Here the toolkit resolves everything; the bundle must not rely on this machine else.
      while read -r lib; do
        [[ $lib == "$dir"/lib/* ]] && continue
        echo "gpu-check: $f: $lib is not in the bundle" >&2
        bad=1
      done < <(awk '$2 == "=>" && $3 ~ /^\// {print $3}' <<<"$out" |
        grep -vE "$SYSTEM_LIBS|$TOOLKIT_LIBS")
    fi
  done
  return $bad
}

# glibc / libstdc++ symbol versions that the bundle's files need: the oldest system it runs on.
requirements() {
  local dir=$1
  local files=("$dir"/bin/* "$dir"/lib/*)
  local glibc glibcxx cxxabi
  glibc=$(strings -a "${files[@]}" | grep -oE '^GLIBC_[0-9]+(\.[0-9]+)*$' | sort -uV | tail -1)
  glibcxx=$(strings -a "${files[@]}" | grep -oE '^GLIBCXX_[0-9]+(\.[0-9]+)*$' | sort -uV | tail -1)
  cxxabi=$(strings -a "${files[@]}" | grep -oE '^CXXABI_[0-9]+(\.[0-9]+)*$' | sort -uV | tail -1)
  echo "glibc: ${glibc#GLIBC_} or newer (built on $(ldd --version | head -1 | awk '{print $NF}'))"
  echo "libstdc++: ${glibcxx:-none} / ${cxxabi:-none} or newer (GCC $(gcc -dumpfullversion 2>/dev/null) runtime)"
  echo "CUDA toolkit libraries from the GPU machine: $(for f in "${files[@]}"; do ldd "$f"; done 2>/dev/null |
    awk '{print $1}' | grep -E "^(libcudart|libcublas|libcublasLt)\.so" | sort -u | tr '\n' ' ')"
  echo "NVIDIA driver: $MIN_DRIVER or newer (CUDA 13 runtime)"
}

if [[ $MODE == check ]]; then
  MODE=bundle check_libs "$DIR" || { echo "gpu-check: bundle $DIR is incomplete" >&2; exit 1; }
  echo "ldd check: every bundled binary and library resolves (toolkit aside)"
  exit 0
fi

if [[ $MODE == bundle ]]; then
  build || { summary; exit 1; }
  mkdir -p "$DIR/bin" "$DIR/lib"
  for t in tests/cuda/cuda_host_test tests/cuda/cuda_kernels_test tests/cuda/cuda_nccl_test \
    tests/cuda/cuda_engine_test core/kernels/cuda/bench/bench_grouped_gemm; do
    [[ -f "$BUILD/$t" ]] && cp "$BUILD/$t" "$DIR/bin/"
  done
  # Every shared library but glibc / libstdc++ and the CUDA toolkit's (the GPU machine has
  # those); NCCL (libnccl.so.2) is copied like the others.
  for bin in "$DIR"/bin/*; do
    ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3}'
  done | sort -u | grep -vE "$SYSTEM_LIBS|$TOOLKIT_LIBS" |
    while read -r lib; do cp -L "$lib" "$DIR/lib/"; done
  if ! check_libs "$DIR"; then
    echo "gpu-check: bundle $DIR is incomplete (ldd above)" >&2
    exit 1
  fi
  echo "ldd check: every bundled binary and library resolves (toolkit aside)"
  requirements "$DIR" | tee "$DIR/REQUIREMENTS"
  du -sh "$DIR"
  echo "bundle ready: run 'tools/gpu-check.sh --prebuilt $DIR' on the GPU machine"
  exit 0
fi

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu-check: no NVIDIA GPU visible (nvidia-smi -L failed)" >&2
  exit 2
fi
nvidia-smi -L
# A driver older than the CUDA 13 runtime makes every CUDA call fail with
# cudaErrorInsufficientDriver: say so before building or running anything.
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
if [[ -n $driver && $(printf '%s\n%s\n' "$MIN_DRIVER" "$driver" | sort -V | head -1) != "$MIN_DRIVER" ]]; then
  echo "gpu-check: NVIDIA driver $driver is older than $MIN_DRIVER, the minimum for the CUDA 13" \
    "runtime of this build (cudaErrorInsufficientDriver); install an r580 or newer driver" >&2
  exit 1
fi

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
  if ! check_libs "$DIR"; then
    echo "gpu-check: shared libraries missing on this machine (above); the bundle needs:" >&2
    cat "$DIR/REQUIREMENTS" >&2 2>/dev/null
    exit 1
  fi
  BIN_HOST="$DIR/bin/cuda_host_test"
  BIN_KERNELS="$DIR/bin/cuda_kernels_test"
  BIN_NCCL="$DIR/bin/cuda_nccl_test"
  BIN_ENGINE="$DIR/bin/cuda_engine_test"
  BIN_BENCH="$DIR/bin/bench_grouped_gemm"
fi

step unit-tests 60 "$BIN_HOST"
step gpu-tests 300 "$BIN_KERNELS"
[[ -x $BIN_NCCL ]] && step nccl-test 60 "$BIN_NCCL"
step engine-test 300 "$BIN_ENGINE"
# nvidia-smi lists a GPU: a test that skipped for lack of one is a failure, not a pass.
step no-skips 10 bash -c 'if grep -sH "no CUDA device present" "$@"; then
  echo "nvidia-smi -L lists a GPU, yet the tests above skipped for lack of one"; exit 1; fi' _ \
  "$LOGS/unit-tests.log" "$LOGS/gpu-tests.log" "$LOGS/nccl-test.log" "$LOGS/engine-test.log"
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
