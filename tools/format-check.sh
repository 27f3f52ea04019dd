#!/usr/bin/env bash
# Fails when a tracked C++/CUDA/proto file is not clang-formatted (.clang-format at the root).
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files '*.h' '*.cc' '*.cu' '*.cuh' | grep -v '^third_party/' || true)
((${#files[@]})) || exit 0
bad=$(clang-format --dry-run --Werror "${files[@]}" 2>&1 | grep -E '^[^ ].*: (error|warning):' | cut -d: -f1 | sort -u || true)
if [ -n "$bad" ]; then
  echo "format-check: these files need clang-format -i:"; echo "$bad"; exit 1
fi
echo "format-check: ${#files[@]} files clean"
