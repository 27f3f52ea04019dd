#!/usr/bin/env bash
# The README's demo command: installs what is missing, builds the CPU preset, starts the whole
# cluster on loopback (router, 2 expert shard groups, attention service, gateway) with the
# bundled model, and streams a chat answer through the gateway's OpenAI API.
# The cluster keeps running for the README's curl / openai examples until Ctrl-C
# (or exits right after the answer when DEMO_EXIT=1 or standard input is not a terminal).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
MODEL=${MODEL:-models/expertmesh-tiny}
PORT=${PORT:-8000}
SHARDS=${SHARDS:-2}
tools/install-deps.sh
cmake --preset cpu -DEXPERTMESH_BENCHMARKS=OFF >/dev/null
cmake --build --preset cpu -j "$(nproc)" --target expertmesh router-service expert-service \
  attention-service gateway

echo "== the in-process reference engine, for comparison"
build/cpu/tools/cli/expertmesh run --model "$MODEL" --prompt "And God said" --max-tokens 24 \
  2>/dev/null | tail -4

echo "== starting the cluster"
source tools/cluster-up.sh
cluster_up build/cpu/tools/cli/expertmesh up --model "$MODEL" --shards "$SHARDS" --replicas 1 \
  --gateway --http-port "$PORT"
cat "$up_log"

echo "== a streamed chat answer through the gateway (POST /v1/chat/completions, stream: true)"
curl -sN "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "expertmesh-tiny",
  "messages": [{"role": "user", "content": "Tell me about the king of Israel."}],
  "max_tokens": 48, "temperature": 0.7, "seed": 7, "stream": true,
  "stream_options": {"include_usage": true}}' |
  python3 -c '
import json, sys
for line in sys.stdin:
    line = line.strip()
    if not line.startswith("data: ") or line == "data: [DONE]":
        continue
    chunk = json.loads(line[6:])
    for c in chunk.get("choices", []):
        print(c["delta"].get("content", ""), end="", flush=True)
    if chunk.get("usage"):
        print("\n[usage] %s" % json.dumps(chunk["usage"]))
'
if [ "${DEMO_EXIT:-0}" = 1 ] || [ ! -t 0 ]; then
  exit 0
fi
echo "== the cluster is up: OpenAI API on http://127.0.0.1:$PORT/v1 (Ctrl-C stops it)"
wait $up_pid
