#!/usr/bin/env python3
"""10,000 concurrent HTTP connections against the gateway (issue 12, part 1). Standard library.

Starts a cluster with `expertmesh up ... --gateway` on the bundled model (or uses a running
gateway, --base-url with --gateway-pid), then, on one asyncio loop:

  idle       --connections keep-alive connections (default 10,000), each sends GET /health once
             when it opens and then again every 20-40 s (below the gateway's 60 s idle timeout);
  streams    --streams of them (default 500) instead send one streamed completion each
             (max_tokens --max-tokens), all at once: completed / 429 / failed are counted;
  slowloris  --slowloris connections (default 200) send a request header one byte every
             --trickle-s seconds and never finish it: each should be closed by the gateway's
             header deadline (10 s by default, 408 or a close);
  prober     one GET /health on a fresh connection every 100 ms throughout: p50 / p99 / max
             latency and failures.

The gateway's RSS (VmRSS) is read before any connection, with every idle connection open (RSS
per connection = the growth / connections), at the peak of the streams and at the end; its
thread count too. Prints a table and one JSON line prefixed "RESULT ".

  ulimit -n is raised by the script (to 1,048,576 when root may, else to the hard limit).
  tools/bench/gateway_connections_bench.py
  tools/bench/gateway_connections_bench.py --connections 10000 --streams 500 --slowloris 200
"""

import argparse
import asyncio
import json
import os
import random
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serving_bench as sb  # noqa: E402  (Cluster, percentile)

ROOT = sb.ROOT


def raise_fd_limit(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in ((want, max(hard, want)), (min(want, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, target)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def find_gateway_pid(port):
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"gateway" and str(port).encode() in argv:
            return int(pid)
    return None


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def request(method, path, body=None):
    head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n"
    if body is not None:
        data = json.dumps(body).encode()
        head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        return head.encode() + b"\r\n" + data
    return head.encode() + b"\r\n"


async def read_response(reader):
    """Status and body of one Content-Length or chunked response."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split()[1])
    length, chunked = 0, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        k = k.strip().lower()
        if k == "content-length":
            length = int(v)
        elif k == "transfer-encoding" and "chunked" in v:
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length)
    body = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return status, bytes(body)
        body += await reader.readexactly(size)
        await reader.readline()


class Stats:
    def __init__(self):
        self.idle_open = 0
        self.idle_failed = 0
        self.idle_requests = 0
        self.streams = {"completed": 0, "429": 0, "failed": 0}
        self.stream_errors = {}
        self.slow = {"closed": 0, "408": 0, "open": 0, "close_s": []}
        self.health = []
        self.health_failed = 0


async def open_conn(host, port, timeout=30):
    return await asyncio.wait_for(asyncio.open_connection(host, port), timeout)


async def idle_client(host, port, st, stop, connect_sem, opened):
    try:
        async with connect_sem:
            reader, writer = await open_conn(host, port)
            writer.write(request("GET", "/health"))
            status, _ = await asyncio.wait_for(read_response(reader), 60)
    except Exception:  # noqa: BLE001
        st.idle_failed += 1
        opened.release()
        return
    st.idle_open += 1
    st.idle_requests += 1
    opened.release()
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), random.uniform(20, 40))
                break
            except asyncio.TimeoutError:
                pass
            writer.write(request("GET", "/health"))
            await asyncio.wait_for(read_response(reader), 60)
            st.idle_requests += 1
    except Exception:  # noqa: BLE001
        st.idle_failed += 1
    finally:
        st.idle_open -= 1
        writer.close()


async def stream_client(host, port, model, max_tokens, st, go):
    body = {"model": model, "prompt": "The quick brown fox", "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    try:
        reader, writer = await open_conn(host, port)
    except Exception as e:  # noqa: BLE001
        st.streams["failed"] += 1
        st.stream_errors[repr(e)[:80]] = st.stream_errors.get(repr(e)[:80], 0) + 1
        return
    await go.wait()
    try:
        writer.write(request("POST", "/v1/completions", body))
        status, data = await asyncio.wait_for(read_response(reader), 900)
        if status == 429:
            st.streams["429"] += 1
        elif status == 200 and b"data: [DONE]" in data:
            st.streams["completed"] += 1
        else:
            st.streams["failed"] += 1
            key = f"HTTP {status}"
            st.stream_errors[key] = st.stream_errors.get(key, 0) + 1
    except Exception as e:  # noqa: BLE001
        st.streams["failed"] += 1
        st.stream_errors[repr(e)[:80]] = st.stream_errors.get(repr(e)[:80], 0) + 1
    finally:
        writer.close()


async def slowloris_client(host, port, trickle_s, limit_s, st):
    try:
        reader, writer = await open_conn(host, port)
    except Exception:  # noqa: BLE001
        st.slow["closed"] += 1
        st.slow["close_s"].append(0.0)
        return
    payload = b"GET /health HTTP/1.1\r\nHost: bench\r\nX-Slow: " + b"a" * 100000
    start = time.monotonic()
    got = b""
    try:
        for i in range(len(payload)):
            if time.monotonic() - start > limit_s:
                st.slow["open"] += 1
                return
            try:
                writer.write(payload[i:i + 1])
                await writer.drain()
            except (ConnectionError, OSError):
                break
            try:
                chunk = await asyncio.wait_for(reader.read(4096), trickle_s)
                if not chunk:
                    break
                got += chunk
            except asyncio.TimeoutError:
                continue
        # closed (or answered): read what is left
        try:
            got += await asyncio.wait_for(reader.read(), 2)
        except Exception:  # noqa: BLE001
            pass
        st.slow["closed"] += 1
        st.slow["close_s"].append(time.monotonic() - start)
        if got.startswith(b"HTTP/1.1 408"):
            st.slow["408"] += 1
    finally:
        writer.close()


async def prober(host, port, st, stop):
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            reader, writer = await open_conn(host, port, timeout=10)
            writer.write(request("GET", "/health") [:-2] + b"Connection: close\r\n\r\n")
            status, _ = await asyncio.wait_for(read_response(reader), 10)
            writer.close()
            if status == 200:
                st.health.append(time.monotonic() - t0)
            else:
                st.health_failed += 1
        except Exception:  # noqa: BLE001
            st.health_failed += 1
        await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - t0)))


async def run(args, host, port, pid):
    st = Stats()
    out = {}
    await asyncio.sleep(1)
    out["rss_kib_start"] = rss_kib(pid)
    out["threads_start"] = threads(pid)
    stop = asyncio.Event()
    probe = asyncio.create_task(prober(host, port, st, stop))

    # 1. Idle keep-alive connections.
    t0 = time.monotonic()
    connect_sem = asyncio.Semaphore(256)
    opened = asyncio.Semaphore(0)
    n_idle = args.connections - args.streams
    idle = [asyncio.create_task(idle_client(host, port, st, stop, connect_sem, opened))
            for _ in range(n_idle)]
    for _ in range(n_idle):
        await opened.acquire()
    out["idle_open_s"] = round(time.monotonic() - t0, 2)
    await asyncio.sleep(2)
    out["idle_open"] = st.idle_open
    out["rss_kib_idle"] = rss_kib(pid)
    out["threads_idle"] = threads(pid)

    # 2. Slowloris and the streams, at once.
    slow = [asyncio.create_task(slowloris_client(host, port, args.trickle_s, args.slow_limit_s, st))
            for _ in range(args.slowloris)]
    go = asyncio.Event()
    streams = [asyncio.create_task(stream_client(host, port, args.model_name, args.max_tokens,
                                                 st, go)) for _ in range(args.streams)]
    await asyncio.sleep(3)  # the stream connections open
    out["connections_at_peak"] = st.idle_open + args.streams + args.slowloris
    t1 = time.monotonic()
    go.set()
    peak_rss, peak_threads = 0, 0
    pending = set(streams)
    while pending:
        done, pending = await asyncio.wait(pending, timeout=1)
        peak_rss = max(peak_rss, rss_kib(pid))
        peak_threads = max(peak_threads, threads(pid))
    out["streams_s"] = round(time.monotonic() - t1, 2)
    await asyncio.gather(*slow)
    out["rss_kib_peak"] = peak_rss
    out["threads_peak"] = peak_threads
    out["rss_kib_after_streams"] = rss_kib(pid)
    out["idle_still_open"] = st.idle_open
    stop.set()
    await asyncio.gather(*idle, probe)
    await asyncio.sleep(2)
    out["rss_kib_end"] = rss_kib(pid)
    out["threads_end"] = threads(pid)

    n = max(1, out["idle_open"])
    out["rss_bytes_per_connection"] = round((out["rss_kib_idle"] - out["rss_kib_start"]) * 1024 / n)
    out["idle_failed"] = st.idle_failed
    out["idle_requests"] = st.idle_requests
    out["streams"] = st.streams
    out["stream_errors"] = st.stream_errors
    cs = sorted(st.slow["close_s"])
    out["slowloris"] = {"sent": args.slowloris, "closed_by_gateway": st.slow["closed"],
                        "answered_408": st.slow["408"], "still_open_at_limit": st.slow["open"],
                        "close_s_p50": round(sb.percentile(cs, 0.5), 2) if cs else None,
                        "close_s_max": round(cs[-1], 2) if cs else None}
    h = sorted(st.health)
    out["health"] = {"probes": len(h) + st.health_failed, "failed": st.health_failed,
                     "p50_ms": round(sb.percentile(h, 0.5) * 1000, 2) if h else None,
                     "p99_ms": round(sb.percentile(h, 0.99) * 1000, 2) if h else None,
                     "max_ms": round(h[-1] * 1000, 2) if h else None}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--expertmesh", default=os.path.join(ROOT, "build/cpu/tools/cli/expertmesh"))
    ap.add_argument("--model", default=os.path.join(ROOT, "models/expertmesh-tiny"))
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--up-arg", action="append", help="extra `expertmesh up` flag")
    ap.add_argument("--base-url", help="use a running gateway (with --gateway-pid)")
    ap.add_argument("--gateway-pid", type=int)
    ap.add_argument("--attention-metrics", default=None)
    ap.add_argument("--connections", type=int, default=10000, help="idle + streams")
    ap.add_argument("--streams", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--slowloris", type=int, default=200)
    ap.add_argument("--trickle-s", type=float, default=1.0)
    ap.add_argument("--slow-limit-s", type=float, default=60.0,
                    help="a slowloris connection still open after this counts as not closed")
    ap.add_argument("--ready-timeout", type=float, default=180)
    ap.add_argument("--stop-timeout", type=float, default=60)
    ap.add_argument("--keep-log", action="store_true")
    args = ap.parse_args()

    want = args.connections + args.slowloris + 1024
    limit = raise_fd_limit(max(want, 1 << 20))
    if limit < want:
        sys.exit(f"ulimit -n is {limit}, below the {want} descriptors needed")
    cl = sb.Cluster(args, list(args.up_arg or []))
    cl.start()  # the gateway inherits the raised limit
    try:
        asyncio.run(cl.wait_healthy(args.ready_timeout))
        pid = args.gateway_pid or find_gateway_pid(cl.port)
        if pid is None:
            sys.exit("cannot find the gateway process (pass --gateway-pid)")

        async def model_name():
            _, body = await sb.http_get(cl.host, cl.port, "/v1/models")
            return json.loads(body)["data"][0]["id"]
        args.model_name = asyncio.run(model_name())
        out = asyncio.run(run(args, cl.host, cl.port, pid))
    finally:
        cl.stop()
    out["command"] = " ".join(sys.argv)
    out["up_command"] = " ".join(cl.command) if cl.command else None
    rows = [
        ("connections at peak (idle + streams + slowloris)", out["connections_at_peak"]),
        ("idle keep-alive open / failed", f"{out['idle_open']} / {out['idle_failed']}"),
        ("gateway RSS start / all idle open / peak / end (MiB)",
         " / ".join(f"{out[k] / 1024:.1f}" for k in
                    ("rss_kib_start", "rss_kib_idle", "rss_kib_peak", "rss_kib_end"))),
        ("RSS per idle connection (bytes)", out["rss_bytes_per_connection"]),
        ("gateway threads start / idle / peak / end",
         f"{out['threads_start']} / {out['threads_idle']} / {out['threads_peak']} / "
         f"{out['threads_end']}"),
        ("streams completed / 429 / failed",
         f"{out['streams']['completed']} / {out['streams']['429']} / {out['streams']['failed']}"),
        ("streams wall time (s)", out["streams_s"]),
        ("slowloris closed by the gateway / 408 / still open",
         f"{out['slowloris']['closed_by_gateway']} / {out['slowloris']['answered_408']} / "
         f"{out['slowloris']['still_open_at_limit']} of {out['slowloris']['sent']}"),
        ("slowloris time to close p50 / max (s)",
         f"{out['slowloris']['close_s_p50']} / {out['slowloris']['close_s_max']}"),
        ("/health probes / failed", f"{out['health']['probes']} / {out['health']['failed']}"),
        ("/health latency p50 / p99 / max (ms)",
         f"{out['health']['p50_ms']} / {out['health']['p99_ms']} / {out['health']['max_ms']}"),
    ]
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("RESULT " + json.dumps(out, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
