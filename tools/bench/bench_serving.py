#!/usr/bin/env python3
"""Serving benchmark for the ExpertMesh gateway (in the manner of vLLM's benchmark_serving).

Sends N streaming /v1/completions requests at a fixed concurrency C and reports request and
token throughput, time to first token (TTFT), inter-token latency (ITL, between streamed
chunks that carry text) and end-to-end latency, with p50/p99. Standard library only.

  tools/bench/bench_serving.py --base-url http://127.0.0.1:8000 --num-prompts 64 \
      --concurrency 8 --max-tokens 64

Prompts: lines of --prompts-file, or sentences built from a fixed word list (--seed).
"""
import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

WORDS = ("the and of to in that he shall unto for i his a lord they be is him not them it "
         "with all thou thy was god which my me said but ye their have will thee from as are "
         "when this out were upon man by you israel king son up there hath people came had "
         "house on into her come one we children s before your also day land men let go").split()


def make_prompts(n, words_per_prompt, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words_per_prompt)).capitalize()
            for _ in range(n)]


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def one_request(url, model, prompt, max_tokens, temperature, api_key, timeout):
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                       "temperature": temperature, "ignore_eos": True, "stream": True,
                       "stream_options": {"include_usage": True}})
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout)
    start = time.perf_counter()
    result = {"ok": False, "ttft": None, "itl": [], "latency": None, "output_tokens": 0,
              "status": None, "error": None}
    try:
        conn.request("POST", url.path.rstrip("/") + "/v1/completions", body, headers)
        resp = conn.getresponse()
        result["status"] = resp.status
        if resp.status != 200:
            result["error"] = resp.read().decode("utf-8", "replace")[:200]
            return result
        last = None
        for raw in resp:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                result["error"] = event["error"].get("message")
                return result
            if event.get("usage"):
                result["output_tokens"] = event["usage"]["completion_tokens"]
            if event.get("choices") and event["choices"][0].get("text"):
                now = time.perf_counter()
                if last is None:
                    result["ttft"] = now - start
                else:
                    result["itl"].append(now - last)
                last = now
        result["latency"] = time.perf_counter() - start
        result["ok"] = True
        return result
    except Exception as e:  # noqa: BLE001 -- reported per request
        result["error"] = repr(e)
        return result
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", help="model name (default: the first of /v1/models)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--input-words", type=int, default=16)
    ap.add_argument("--prompts-file")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    url = urllib.parse.urlparse(args.base_url)
    model = args.model
    if model is None:
        conn = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=30)
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        conn.request("GET", url.path.rstrip("/") + "/v1/models", headers=headers)
        model = json.loads(conn.getresponse().read())["data"][0]["id"]
    if args.prompts_file:
        lines = [l.strip() for l in open(args.prompts_file, encoding="utf-8") if l.strip()]
        prompts = [lines[i % len(lines)] for i in range(args.num_prompts)]
    else:
        prompts = make_prompts(args.num_prompts, args.input_words, args.seed)

    lock = threading.Lock()
    results = []

    def run(prompt):
        r = one_request(url, model, prompt, args.max_tokens, args.temperature, args.api_key,
                        args.timeout)
        with lock:
            results.append(r)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        list(pool.map(run, prompts))
    duration = time.perf_counter() - start

    ok = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    itl = [x for r in ok for x in r["itl"]]
    lat = [r["latency"] for r in ok]
    out_tokens = sum(r["output_tokens"] for r in ok)
    summary = {
        "model": model, "num_prompts": args.num_prompts, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "completed": len(ok), "failed": len(failed),
        "duration_s": duration, "request_throughput_per_s": len(ok) / duration,
        "output_token_throughput_per_s": out_tokens / duration, "total_output_tokens": out_tokens,
        "ttft_ms": {"mean": 1e3 * statistics.fmean(ttft) if ttft else float("nan"),
                    "p50": 1e3 * percentile(ttft, 0.5), "p99": 1e3 * percentile(ttft, 0.99)},
        "itl_ms": {"mean": 1e3 * statistics.fmean(itl) if itl else float("nan"),
                   "p50": 1e3 * percentile(itl, 0.5), "p99": 1e3 * percentile(itl, 0.99)},
        "e2e_ms": {"p50": 1e3 * percentile(lat, 0.5), "p99": 1e3 * percentile(lat, 0.99)},
    }
    print(f"============ Serving Benchmark Result ============")
    print(f"Model:                              {model}")
    print(f"Successful / failed requests:       {len(ok)} / {len(failed)}")
    print(f"Concurrency:                        {args.concurrency}")
    print(f"Benchmark duration (s):             {duration:.2f}")
    print(f"Total generated tokens:             {out_tokens}")
    print(f"Request throughput (req/s):         {summary['request_throughput_per_s']:.2f}")
    print(f"Output token throughput (tok/s):    {summary['output_token_throughput_per_s']:.2f}")
    for name, key in (("TTFT", "ttft_ms"), ("ITL", "itl_ms")):
        s = summary[key]
        print(f"{name} mean / p50 / p99 (ms):" + " " * (18 - len(name)) +
              f"{s['mean']:.2f} / {s['p50']:.2f} / {s['p99']:.2f}")
    print(f"E2E latency p50 / p99 (ms):         {summary['e2e_ms']['p50']:.2f} / "
          f"{summary['e2e_ms']['p99']:.2f}")
    if failed:
        print(f"first failure: status {failed[0]['status']}: {failed[0]['error']}")
    if args.json:
        json.dump(summary, open(args.json, "w"), indent=2)
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
