#!/usr/bin/env python3
"""Soak benchmark (issue 12, part 4): --streams concurrent streamed completions (default 1,000)
for --duration-s (default 600) through the gateway against the bundled model. Standard library.

Starts `expertmesh up --model <bundled> --shards 2 --replicas 1 --gateway` (flags for `up` with
--up-arg, e.g. --up-arg=--gateway-arg=--max-running=256), then runs --streams workers on one
asyncio loop; each sends one streamed completion (max_tokens --max-tokens, a varied prompt)
after another until the time is up; a 429 waits for its Retry-After (at most 2 s) and tries
again. Afterwards:
  errors   every answer other than a whole stream ending in [DONE] or a 429, by kind (must be 0);
  RSS      VmRSS of every service process (children of `up`) at the start, every --sample-s
           and at the end (after the load): growth start -> end per service;
  gauges   /metrics of every service scraped after the load (waiting up to --settle-s for
           them to settle): every gauge about work in progress (running, waiting, queue,
           used KV blocks, outstanding rows, open connections, in flight ...) must be 0 (the
           gateway's open-connection gauge counts the scrape's own connection: 1 is 0 there).
Prints a table and one JSON line prefixed "RESULT "; exit 1 when an error other than 429
occurred or a gauge did not return to 0.

  tools/bench/soak_bench.py                              # 1,000 streams, 10 minutes
  tools/bench/soak_bench.py --streams 100 --duration-s 60   # a short run
"""
import argparse
import asyncio
import json
import os
import random
import re
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving_bench as sb  # noqa: E402  (Cluster, streamed_completion, http_get)

ROOT = sb.ROOT
# Gauges that say work is in progress (a name match, histogram/summary series excluded).
BUSY = re.compile(r"running|waiting|queue|_used|outstanding|connections|in_flight|inflight|"
                  r"pending|active|open_streams|streams_open|busy", re.I)
# Gauges that match BUSY but are capacities or settings, not work.
NOT_BUSY = re.compile(r"_max$|_limit|_capacity|_total_blocks|blocks_total|_threads$", re.I)


def service_pids(up_pid):
    """{name: pid} of the processes whose parent is `up` (named by their binary)."""
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = open(f"/proc/{pid}/stat").read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != up_pid:
                continue
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        name = os.path.basename(argv[0].decode())
        if "--instance-id" in [a.decode() for a in argv]:
            name += "[" + argv[[a.decode() for a in argv].index("--instance-id") + 1].decode() + "]"
        out[name] = int(pid)
    return out


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def metrics_urls(log_path):
    """{service: http://.../metrics} from the output of `expertmesh up`."""
    out = {}
    for line in open(log_path, encoding="utf-8", errors="replace"):
        m = re.search(r"^\s+(\S+(?: \d+ replica \d+\])?)\s+grpc \S+\s+(?:metrics|http) "
                      r"(http://\S+/metrics)", line)
        if m:
            out[m.group(1)] = m.group(2)
    return out


async def scrape_gauges(url):
    """{series: value} of the gauges of one /metrics page."""
    m = re.match(r"http://([^:/]+):(\d+)(/.*)$", url)
    status, body = await sb.http_get(m.group(1), int(m.group(2)), m.group(3), timeout=10)
    if status != 200:
        raise RuntimeError(f"{url}: HTTP {status}")
    gauges, out = set(), {}
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4 and parts[3] == "gauge":
                gauges.add(parts[2])
            continue
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] in gauges:
            try:
                out[series] = float(value)
            except ValueError:
                pass
    return out


def busy_left(service, gauges):
    """The work-in-progress gauges of a service that are not back to 0."""
    left = {}
    for series, value in gauges.items():
        name = series.split("{")[0]
        if not BUSY.search(name) or NOT_BUSY.search(name):
            continue
        allowed = 1 if service == "gateway" and "connection" in name else 0  # the scrape
        if value > allowed:
            left[series] = value
    return left


PROMPTS = ["The history of", "In the beginning", "A short story about", "The capital of",
           "Once upon a time", "The main reason", "Here is a list of", "My favourite"]


async def worker(i, args, cl, model, end_time, stats):
    rng = random.Random(i)
    while time.time() < end_time:
        body = {"model": model, "prompt": f"{rng.choice(PROMPTS)} {rng.randint(0, 10**6)}",
                "max_tokens": args.max_tokens, "stream": True, "temperature": 0.7,
                "seed": rng.randint(0, 2**31)}
        r = await sb.streamed_completion(cl.host, cl.port, "/v1/completions", body)
        if r.ok:
            stats["ok"] += 1
            stats["tokens"] += r.tokens
        elif r.status == 429:
            stats["429"] += 1
            try:
                wait = float(r.retry_after or 1)
            except ValueError:
                wait = 1.0
            await asyncio.sleep(min(2.0, wait) * rng.uniform(0.5, 1.0))
        else:
            kind = f"{r.status}: {(r.error or '')[:120]}"
            stats["errors"][kind] = stats["errors"].get(kind, 0) + 1
            await asyncio.sleep(0.5)


async def run(args, cl):
    await cl.wait_healthy(60)
    st, body = await sb.http_get(cl.host, cl.port, "/v1/models")
    model = json.loads(body)["data"][0]["id"]
    pids = service_pids(cl.proc.pid)
    urls = metrics_urls(cl.log_path)
    print(f"services: {', '.join(f'{n} (pid {p})' for n, p in sorted(pids.items()))}")
    samples = [("start", time.time(), {n: rss_kib(p) for n, p in pids.items()})]
    stats = {"ok": 0, "429": 0, "tokens": 0, "errors": {}}
    t0 = time.time()
    end_time = t0 + args.duration_s
    tasks = [asyncio.create_task(worker(i, args, cl, model, end_time, stats))
             for i in range(args.streams)]

    async def sampler():
        n = 1
        while time.time() < end_time:
            await asyncio.sleep(max(0.0, min(t0 + n * args.sample_s, end_time) - time.time()))
            if time.time() >= end_time:
                break
            samples.append((f"{n * args.sample_s:.0f}s", time.time(),
                            {k: rss_kib(p) for k, p in pids.items()}))
            print(f"  {samples[-1][0]:>6}: ok {stats['ok']}, 429 {stats['429']}, errors "
                  f"{sum(stats['errors'].values())}, RSS MiB "
                  + ", ".join(f"{k} {v / 1024:.0f}" for k, v in sorted(samples[-1][2].items())
                              if v), flush=True)
            n += 1

    sampling = asyncio.create_task(sampler())
    # Workers finish the request they are in (bounded by the gateway's request timeout).
    await asyncio.wait(tasks, timeout=args.duration_s + args.drain_s)
    for t in tasks:
        t.cancel()
    unfinished = sum(1 for t in tasks if not t.done())
    await asyncio.gather(*tasks, return_exceptions=True)
    sampling.cancel()
    elapsed = time.time() - t0
    samples.append(("end", time.time(), {n: rss_kib(p) for n, p in pids.items()}))

    # Gauges back to 0 (the last streams' bookkeeping may take a moment).
    left = {}
    deadline = time.time() + args.settle_s
    while True:
        left = {}
        for service, url in sorted(urls.items()):
            try:
                g = await scrape_gauges(url)
            except Exception as e:  # noqa: BLE001
                left[service] = {"scrape failed": repr(e)}
                continue
            b = busy_left(service, g)
            if b:
                left[service] = b
        if not left or time.time() > deadline:
            break
        await asyncio.sleep(1)
    checked = {}
    for service, url in sorted(urls.items()):
        try:
            g = await scrape_gauges(url)
            checked[service] = sorted(s for s in g if BUSY.search(s.split("{")[0])
                                      and not NOT_BUSY.search(s.split("{")[0]))
        except Exception:  # noqa: BLE001
            checked[service] = []

    print()
    print(f"{args.streams} streams x {elapsed:.0f} s: {stats['ok']} completed streams "
          f"({stats['ok'] / elapsed:.1f}/s, {stats['tokens'] / elapsed:.0f} tokens/s), "
          f"{stats['429']} x 429, {sum(stats['errors'].values())} other errors, "
          f"{unfinished} unfinished at the end")
    for kind, n in sorted(stats["errors"].items(), key=lambda kv: -kv[1])[:10]:
        print(f"  error x{n}: {kind}")
    print(f"{'service':<32} " + " ".join(f"{s[0]:>7}" for s in samples)
          + "   start->end  first sample under load->end")
    growth, warm_growth = {}, {}
    for name in sorted(pids):
        vals = [s[2].get(name) for s in samples]
        first, last = samples[0][2].get(name), samples[-1][2].get(name)
        loaded = samples[1][2].get(name) if len(samples) > 2 else None
        growth[name] = (last - first) / 1024 if first and last else None
        warm_growth[name] = (last - loaded) / 1024 if loaded and last else None
        print(f"{name:<32} " + " ".join(f"{(v or 0) / 1024:7.1f}" for v in vals)
              + (f"   {growth[name]:+.1f} MiB" if growth[name] is not None else "   (gone)")
              + (f"   {warm_growth[name]:+.1f} MiB" if warm_growth[name] is not None else ""))
    print("RSS in MiB (VmRSS); the first column is before any request (cold).")
    print(f"work-in-progress gauges checked: {sum(len(v) for v in checked.values())} series "
          f"in {len(checked)} services")
    if left:
        print(f"NOT back to 0: {json.dumps(left)}")
    else:
        print("every work-in-progress gauge back to 0")
    result = {
        "streams": args.streams, "duration_s": round(elapsed, 1), "max_tokens": args.max_tokens,
        "completed": stats["ok"], "http_429": stats["429"],
        "errors": sum(stats["errors"].values()), "error_kinds": stats["errors"],
        "unfinished": unfinished, "tokens_per_s": round(stats["tokens"] / elapsed, 1),
        "rss_kib": {s[0]: s[2] for s in samples},
        "rss_growth_mib": {k: (round(v, 1) if v is not None else None)
                           for k, v in growth.items()},
        "rss_growth_under_load_mib": {k: (round(v, 1) if v is not None else None)
                                      for k, v in warm_growth.items()},
        "gauges_not_zero": left, "gauge_series_checked": checked, "command": cl.command,
    }
    print("RESULT " + json.dumps(result))
    return 0 if not stats["errors"] and not left and unfinished == 0 else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--duration-s", type=float, default=600)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--sample-s", type=float, default=60, help="RSS sampling period")
    ap.add_argument("--drain-s", type=float, default=120,
                    help="after the duration: time the last requests get to finish")
    ap.add_argument("--settle-s", type=float, default=30,
                    help="after the load: time the gauges get to return to 0")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "expertmesh-tiny"))
    ap.add_argument("--expertmesh", default=os.path.join(ROOT, "build", "cpu", "tools", "cli",
                                                         "expertmesh"))
    ap.add_argument("--up-arg", action="append", default=[],
                    help="extra `expertmesh up` flag, e.g. --up-arg=--max-waiting=1024")
    ap.add_argument("--ready-timeout", type=float, default=180)
    ap.add_argument("--stop-timeout", type=float, default=120)
    ap.add_argument("--keep-log", action="store_true")
    args = ap.parse_args()
    # What serving_bench.Cluster reads besides the above.
    args.base_url, args.attention_metrics = None, None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    cl = sb.Cluster(args, args.up_arg)
    keep_log, args.keep_log = args.keep_log, True  # read for the metrics URLs
    cl.start()
    rc = 1
    try:
        rc = asyncio.run(run(args, cl))
    finally:
        cl.stop()
        if keep_log or rc != 0:
            print(f"`expertmesh up` log: {cl.log_path}")
        else:
            os.unlink(cl.log_path)
    return rc


if __name__ == "__main__":
    sys.exit(main())
