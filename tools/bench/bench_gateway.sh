#!/usr/bin/env bash
# Serving benchmark through the gateway at concurrency 1, 16 and 64 (tools/bench/bench_serving.py),
# beside the in-process reference engine's decode throughput on the same model measured in the
# same run (expertmesh-bench-cluster's in-process part at batch 1, 16 and 64).
# Usage: tools/bench/bench_gateway.sh [BUILD_DIR] [MODEL]   (BUILD_DIR built with benchmarks on)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${1:-$root/build/ci}
model=${2:-$root/models/expertmesh-tiny}
port=${PORT:-8011}
prompts=${NUM_PROMPTS:-64}
max_tokens=${MAX_TOKENS:-64}

source "$root/tools/cluster-up.sh"
cluster_up "$build/tools/cli/expertmesh" up --model "$model" --shards 2 --replicas 1 --gateway \
  --http-port "$port" --bin-dir "$build"
for c in 1 16 64; do
  echo "== gateway, concurrency $c"
  python3 "$root/tools/bench/bench_serving.py" --base-url "http://127.0.0.1:$port" \
    --num-prompts "$prompts" --concurrency "$c" --max-tokens "$max_tokens"
done
kill -TERM $up_pid; wait $up_pid || true
echo "== in-process engine (and the cluster without the gateway), same model"
"$build/tools/bench/expertmesh-bench-cluster" --model "$model" --shards 2 --replicas 1 \
  --batches 1 16 64 --decode-tokens "$max_tokens"
