#!/usr/bin/env python3
"""Which per-replica signal should a shard group's HPA follow? Starts the bundled-model
cluster on loopback (`expertmesh up --shards 2 --replicas 1 --gateway`), drives greedy
completions through the gateway at rising concurrency, and per step prints, side by side:
the shard replicas' rows in flight (expertmesh_expert_outstanding_rows, sampled every 20 ms,
mean and p90 over the step, the HPA signal), their rows/s (expertmesh_expert_rows_total),
the mean MoE dispatch latency (expertmesh_dispatch_latency_seconds, the attention service's,
all layers) and the clients' mean time per output token. A good signal rises with load while
the latencies are still flat, so the HPA can add replicas before users see it.

  k8s/monitoring/measure_signal.py [--build build/cpu] [--levels 1 2 4 8 16 32 64]
"""
import argparse
import json
import os
import re
import subprocess
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ["And God said", "The king of Israel", "Once upon a time", "In the beginning",
           "A wise man", "The LORD is my shepherd", "Tell me about", "The word"]


def scrape(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        base = re.sub(r"\{.*\}", "", name)  # summed over every label set
        out[base] = out.get(base, 0.0) + float(value)
    return out


def metric(m, name):
    return m.get(name, 0.0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build/cpu"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models/expertmesh-tiny"))
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--port", type=int, default=8019)
    a = ap.parse_args()

    up = subprocess.Popen([os.path.join(a.build, "tools/cli/expertmesh"), "up", "--model", a.model,
                           "--shards", "2", "--replicas", "1", "--gateway", "--http-port",
                           str(a.port), "--bin-dir", a.build],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    shards, attention = [], None
    try:
        for line in up.stdout:
            m = re.search(r"^\s+(\S+)\s.*metrics (http://\S+/metrics)", line)
            if m and "expert" in m.group(1):
                shards.append(m.group(2))
            elif m and "attention" in m.group(1):
                attention = m.group(2)
            if "Ctrl-C" in line:
                break
        if not shards or not attention:
            raise SystemExit("expertmesh up did not print the shards' and attention's /metrics")
        model = os.path.basename(a.model)
        print(f"{'clients':>7} {'rows in flight/replica':>22} {'rows/s/replica':>14} "
              f"{'dispatch ms':>11} {'ms/token':>9} {'tokens/s':>9}")
        for c in a.levels:
            samples, stop = [], threading.Event()

            def sampler():
                while not stop.is_set():
                    samples.append(sum(metric(scrape(u), "expertmesh_expert_outstanding_rows")
                                       for u in shards) / len(shards))
                    time.sleep(0.02)

            per_token, tokens = [], [0]
            lock = threading.Lock()

            def client(i):
                for k in range(a.requests_per_client):
                    body = {"model": model, "prompt": PROMPTS[(i + k) % len(PROMPTS)],
                            "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True}
                    req = urllib.request.Request(
                        f"http://127.0.0.1:{a.port}/v1/completions", json.dumps(body).encode(),
                        {"Content-Type": "application/json"})
                    t0 = time.time()
                    with urllib.request.urlopen(req, timeout=600) as r:
                        n = json.loads(r.read())["usage"]["completion_tokens"]
                    with lock:
                        per_token.append((time.time() - t0) / max(n, 1))
                        tokens[0] += n

            before_a = scrape(attention)
            before_s = [scrape(u) for u in shards]
            t0 = time.time()
            th = threading.Thread(target=sampler)
            th.start()
            clients = [threading.Thread(target=client, args=(i,)) for i in range(c)]
            for t in clients:
                t.start()
            for t in clients:
                t.join()
            stop.set()
            th.join()
            took = time.time() - t0
            after_a = scrape(attention)
            after_s = [scrape(u) for u in shards]
            n = (metric(after_a, "expertmesh_dispatch_latency_seconds_count") -
                 metric(before_a, "expertmesh_dispatch_latency_seconds_count"))
            s = (metric(after_a, "expertmesh_dispatch_latency_seconds_sum") -
                 metric(before_a, "expertmesh_dispatch_latency_seconds_sum"))
            rows = sum(metric(x, "expertmesh_expert_rows_total") -
                       metric(y, "expertmesh_expert_rows_total")
                       for x, y in zip(after_s, before_s)) / len(shards) / took
            samples.sort()
            mean = sum(samples) / max(len(samples), 1)
            p90 = samples[int(0.9 * (len(samples) - 1))] if samples else 0.0
            print(f"{c:>7} {mean:>12.1f} (p90 {p90:>5.0f}) {rows:>14.0f} "
                  f"{1000 * s / max(n, 1):>11.2f} {1000 * sum(per_token) / len(per_token):>9.1f} "
                  f"{tokens[0] / took:>9.1f}", flush=True)
    finally:
        up.terminate()
        up.wait(timeout=60)


if __name__ == "__main__":
    main()
