# Sourced by tools/demo.sh and tools/bench/bench_gateway.sh (bash). cluster_up CMD...: starts
# `expertmesh up ...` (CMD) in the background with its output in $up_log, stops it when the
# script exits, and waits (up to 2 minutes) until the cluster says it is ready. Sets up_pid and
# up_log; exits with the log printed if the cluster process dies first.
cluster_up() {
  up_log=$(mktemp)
  "$@" >"$up_log" 2>&1 &
  up_pid=$!
  trap 'kill -TERM $up_pid 2>/dev/null; wait $up_pid 2>/dev/null; rm -f "$up_log"' EXIT
  for _ in $(seq 1 240); do
    grep -q "Ctrl-C" "$up_log" && return 0
    kill -0 "$up_pid" 2>/dev/null || { cat "$up_log"; exit 1; }
    sleep 0.5
  done
}
