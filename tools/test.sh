#!/usr/bin/env bash
# The README's test command: installs what is missing, builds (CUDA compiled when nvcc is on
# the PATH), runs every test that needs no GPU, the format check, a 160 s fuzz run
# (FUZZ_SECONDS is the total tools/fuzz.sh splits between its eight targets: 20 s each) and
# the container image test (tools/docker-setup.sh: Debian's docker.io, dockerd on vfs, base
# images from debootstrap where no registry answers; then the image is built and the cpu-tiny
# topology run from it), then the sanitizers: every unit and integration test under ASan +
# UBSan (preset asan) and the scheduler, gateway and data-plane tests under TSan (preset tsan,
# the tests labelled tsan; only their targets are built). Both sanitizer builds use -O1 -g1.
# EXPERTMESH_SKIP_DOCKER=1 leaves the image test out, EXPERTMESH_SKIP_SANITIZERS=1 the
# sanitizer runs.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
tools/install-deps.sh
export CCACHE_MAXSIZE=${CCACHE_MAXSIZE:-5G}
export CCACHE_BASEDIR="$root"  # cache hits across clones in other folders
jobs=${JOBS:-$(nproc)}

echo "== format check"
tools/format-check.sh

echo "== configure + build (preset ci)"
cmake --preset ci -DEXPERTMESH_BENCHMARKS=ON >/dev/null
cmake --build --preset ci -j "$jobs"

# Python test tools (the openai client), no torch: a small venv of their own.
if [ -f tools/requirements-test.txt ]; then
  [ -x .venv-test/bin/python ] || python3 -m venv .venv-test
  .venv-test/bin/pip install -q -r tools/requirements-test.txt
  export EXPERTMESH_TEST_PYTHON="$root/.venv-test/bin/python"
fi

echo "== tests (ctest --preset ci: every label but gpu and docker)"
ctest --preset ci -j "$jobs"

if [ "${EXPERTMESH_SKIP_DOCKER:-0}" != 1 ]; then
  echo "== container image: build it, run the cpu-tiny manifests' containers (ctest -L docker)"
  tools/docker-setup.sh
  docker_start=$SECONDS
  ctest --test-dir build/ci --output-on-failure -L docker  # the ci preset's filter excludes it
  echo "== container image test: $((SECONDS - docker_start)) s (image build included)"
fi

echo "== fuzz: the eight libFuzzer targets in tests/fuzz, 160 s in all (20 s each)"
FUZZ_SECONDS=160 tools/fuzz.sh

if [ "${EXPERTMESH_SKIP_SANITIZERS:-0}" != 1 ]; then
  echo "== ASan + UBSan: unit and integration tests (preset asan)"
  san_start=$SECONDS
  cmake --preset asan >/dev/null
  cmake --build --preset asan -j "$jobs"
  ctest --preset asan -j "$jobs"
  echo "== ASan + UBSan: $((SECONDS - san_start)) s"

  echo "== TSan: the tests labelled tsan (preset tsan)"
  san_start=$SECONDS
  cmake --preset tsan >/dev/null
  mapfile -t tsan_targets < <(ctest --preset tsan -N | awk '/Test +#[0-9]+:/ {print $3}')
  ((${#tsan_targets[@]} > 0)) || { echo "no test carries the tsan label" >&2; exit 1; }
  cmake --build --preset tsan -j "$jobs" --target "${tsan_targets[@]}"
  ctest --preset tsan -j "$jobs"
  echo "== TSan: $((SECONDS - san_start)) s"
fi
echo "== all tests passed"
