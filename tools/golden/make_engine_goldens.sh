#!/usr/bin/env bash
# Regenerates the reference engine's test checkpoints (tests/data/engine-*) with
# expertmesh-make-checkpoint and their golden outputs (tests/golden/engine/*.json) with
# transformers (tools/golden/make_engine_goldens.py, in the repo's .venv).
# Usage: tools/golden/make_engine_goldens.sh [BUILD_DIR]   (default build/engine)
set -euo pipefail
cd "$(dirname "$0")/../.."
build_dir="${1:-build/engine}"
python="${PYTHON:-.venv/bin/python}"

cmake --build "$build_dir" --target expertmesh-make-checkpoint
tool="$build_dir/tools/make-checkpoint/expertmesh-make-checkpoint"

# name:seed -- the config of each checkpoint is its committed config.json.
for spec in engine-yarn:1 engine-mtp:2; do
  name="${spec%%:*}"
  seed="${spec##*:}"
  dir="tests/data/$name"
  tmp="$(mktemp)"
  cp "$dir/config.json" "$tmp"
  rm -f "$dir"/model*.safetensors "$dir"/model.safetensors.index.json
  "$tool" --config "$tmp" --out "$dir" --seed "$seed"
  rm -f "$tmp"
  "$python" tools/golden/make_engine_goldens.py --checkpoint "$dir" \
    --out "tests/golden/engine/$name.json" --seed "$seed"
done
