#!/usr/bin/env bash
# Builds the libFuzzer targets (preset `fuzz`, clang + ASan/UBSan) and runs them for
# FUZZ_SECONDS in all (default 60, split evenly between the targets; with no target named,
# every one in tests/fuzz), each on a scratch copy of its seed corpus in
# tests/fuzz/corpus/<target without _fuzz>/.
# Exits non-zero when a target crashes, leaks, or breaks an invariant; the failing input is
# kept under <build dir>/fuzz-artifacts/ (rerun it with: <target binary> <that file>).
#   FUZZ_SECONDS=60  FUZZ_BUILD_DIR=build/fuzz  FUZZ_JOBS=2  tools/fuzz.sh [target ...]
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
build="${FUZZ_BUILD_DIR:-build/fuzz}"
jobs="${FUZZ_JOBS:-2}"
targets=("$@")
if ((${#targets[@]} == 0)); then
  targets=(safetensors_header_fuzz safetensors_file_fuzz tokenizer_fuzz chat_template_fuzz
    openai_parse_fuzz http_request_fuzz expert_request_fuzz dataplane_frame_fuzz)
fi
per_target=$((seconds / ${#targets[@]}))
((per_target > 0)) || per_target=1

cmake --preset fuzz -B "$build" >/dev/null
cmake --build "$build" --target "${targets[@]}" -j "$jobs"

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
artifacts="$build/fuzz-artifacts"
mkdir -p "$artifacts"

status=0
for target in "${targets[@]}"; do
  seeds="tests/fuzz/corpus/${target%_fuzz}"
  corpus="$scratch/$target"
  mkdir -p "$corpus"
  if [[ -d "$seeds" ]]; then
    cp "$seeds"/* "$corpus"/
  fi
  echo "fuzz.sh: running $target for ${per_target}s on $(ls "$corpus" | wc -l) seeds"
  if ! "$build/tests/fuzz/$target" -max_total_time="$per_target" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$artifacts/$target-" "$corpus"; then
    echo "fuzz.sh: $target FAILED; inputs in $artifacts/" >&2
    status=1
  fi
done
exit "$status"
