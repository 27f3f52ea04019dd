#!/usr/bin/env python3
"""Serving benchmark for a whole ExpertMesh cluster (issue 19, part 4). Standard library only.

Starts its own cluster with `expertmesh up ... --gateway` (or uses a running one, --base-url),
waits for the gateway's /health, runs one scenario through the OpenAI HTTP API (raw HTTP/1.1
over asyncio streams, streamed completions parsed as SSE), prints a table and one JSON line
(prefixed "RESULT "), and stops the cluster.

Scenarios (each bounded in request count and in time; loopback only):
  burst   N clients (default 1000) connect, then each sends one streamed 16-token completion at
          the same instant. Served / 429 / other errors / time to drain / TTFT p50 p99.
  prefix  M chat requests (default 64, concurrency 16) that share a ~1,000-token system prompt
          (built from text, calibrated with the gateway's usage.prompt_tokens, lowered when the
          model's context is too short) plus a short distinct user message. TTFT p50 p99,
          throughput, and the prefill tokens the attention service computed
          (expertmesh_attention_prompt_tokens_total before/after, against the prompt tokens sent),
          plus every attention metric whose name contains "prefix" (before/after).
  mixed   short requests and requests whose max_tokens nearly fill the context, at a fixed KV
          budget (--kv-blocks, default 256 blocks of 16 tokens). Throughput (tokens/s),
          completed, 429s, and any metric with "preempt" in its name.
  all     the three above, one fresh cluster each.

  tools/bench/serving_bench.py burst
  tools/bench/serving_bench.py prefix --requests 64 --concurrency 16 --prefix-tokens 1000
  tools/bench/serving_bench.py mixed --kv-blocks 256
  tools/bench/serving_bench.py burst --up-arg=--max-waiting=1024   # any `expertmesh up` flag

Cluster flags: `expertmesh up` passes a fixed set of flags to the attention service (--kv-blocks,
--kv-block-size, --max-batch, --max-waiting, --prefill-chunk, --step-deadline-ms); there is no
generic pass-through of other attention-service or gateway flags (e.g. the gateway's
--max-running / --max-waiting). --up-arg hands any flag to `expertmesh up` itself, so new `up`
flags (a prefix-cache switch, say) are usable without changing this script; for flags `up` does
not know, start the cluster by hand and use --base-url and --attention-metrics.
"""
import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Text for prompts: plain English, so the byte-level tokenizer gives a realistic token count.
SYSTEM_SENTENCES = [
    "You are a careful assistant for the operators of a large distributed inference service.",
    "Answer in plain language, state what you know and what you do not, and keep answers short.",
    "When a question concerns a configuration, name the option, its default and its effect.",
    "When a question concerns an incident, list the symptoms, the likely cause and the next check.",
    "Never invent metric names; if a metric is not listed in the documentation, say so.",
    "Prefer commands that can be copied and run as they are, and explain each flag you use.",
    "The cluster consists of a router, expert shards with replicas, attention services and a "
    "gateway that speaks the OpenAI protocol over HTTP.",
    "Requests are admitted by the gateway, scheduled by the attention service and their expert "
    "computations are dispatched to the shards that hold the experts of each layer.",
    "Latency is measured as the time to the first token and the time between later tokens.",
    "Throughput is measured in generated tokens per second across all running requests.",
    "If the user asks for something unsafe or outside the operation of the service, decline "
    "politely and suggest where the answer may be found instead.",
    "Keep a neutral tone, do not speculate about people, and cite the document section you used.",
]
USER_TOPICS = ["KV cache", "admission", "router", "gateway", "shards", "replicas", "latency",
               "throughput", "metrics", "preemption", "prefill", "decode", "tokenizer",
               "placement", "health checks", "timeouts"]
SHORT_WORDS = ("the and of to in that he shall unto for his a lord they be is him not them it "
               "with all thou thy was god which my me said but ye their have will thee from as "
               "are when this out were upon man by you king son up there hath people came had "
               "house on into her come one we children before your also day land men let go").split()


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def ms(x):
    return None if x is None or x != x else round(1e3 * x, 1)


# ------------------------------------------------------------------------------------------------
# HTTP/1.1 over asyncio streams


class HttpError(Exception):
    pass


async def _read_headers(reader):
    status_line = await reader.readline()
    if not status_line:
        raise HttpError("connection closed before the status line")
    parts = status_line.decode("latin-1").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise HttpError(f"bad status line {status_line[:80]!r}")
    status = int(parts[1])
    headers = {}
    while True:
        line = await reader.readline()
        if not line:
            raise HttpError("connection closed inside the headers")
        if line in (b"\r\n", b"\n"):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers


async def _body_pieces(reader, headers):
    """Yields the body's bytes as they arrive (chunked, Content-Length or until close)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise HttpError("connection closed inside a chunked body")
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        left = int(headers["content-length"])
        while left > 0:
            data = await reader.read(min(left, 65536))
            if not data:
                raise HttpError("connection closed inside the body")
            left -= len(data)
            yield data
    else:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data


def _request_bytes(host, port, method, path, body=None, api_key=None):
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
             "Accept: */*"]
    payload = b""
    if body is not None:
        payload = json.dumps(body).encode()
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    if api_key:
        lines.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def http_get(host, port, path, timeout=10.0):
    async def go():
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(_request_bytes(host, port, "GET", path))
            await writer.drain()
            status, headers = await _read_headers(reader)
            body = b"".join([p async for p in _body_pieces(reader, headers)])
            return status, body
        finally:
            writer.close()
    return await asyncio.wait_for(go(), timeout)


async def http_post_json(host, port, path, body, api_key=None, timeout=120.0):
    async def go():
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(_request_bytes(host, port, "POST", path, body, api_key))
            await writer.drain()
            status, headers = await _read_headers(reader)
            data = b"".join([p async for p in _body_pieces(reader, headers)])
            return status, json.loads(data) if data else None
        finally:
            writer.close()
    return await asyncio.wait_for(go(), timeout)


class StreamResult:
    __slots__ = ("status", "ok", "ttft", "latency", "tokens", "prompt_tokens", "error",
                 "retry_after", "t_end", "chunks")

    def __init__(self):
        self.status = None
        self.ok = False
        self.ttft = None
        self.latency = None
        self.tokens = 0          # completion tokens (usage if sent, else text chunks)
        self.chunks = 0          # SSE chunks that carried text
        self.prompt_tokens = None
        self.error = None
        self.retry_after = None
        self.t_end = None


async def streamed_completion(host, port, path, body, api_key=None, start_event=None,
                              connected=None, t0_holder=None):
    """One streamed request; SSE parsed. With start_event: connects, signals `connected`, waits
    for the event, then sends (a burst with every connection already open). TTFT and latency are
    measured from the moment the request is written."""
    r = StreamResult()
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        req = _request_bytes(host, port, "POST", path, body, api_key)
        if connected is not None:
            connected()
        if start_event is not None:
            await start_event.wait()
        t0 = time.perf_counter()
        writer.write(req)
        await writer.drain()
        status, headers = await _read_headers(reader)
        r.status = status
        if status != 200:
            r.retry_after = headers.get("retry-after")
            data = b"".join([p async for p in _body_pieces(reader, headers)])
            r.error = data.decode("utf-8", "replace")[:300]
            return r
        buf = b""
        done = False
        usage_tokens = None
        async for piece in _body_pieces(reader, headers):
            buf += piece
            while True:
                m = re.search(rb"\r?\n\r?\n", buf)
                if not m:
                    break
                event, buf = buf[:m.start()], buf[m.end():]
                data_lines = [l[5:].lstrip() for l in event.split(b"\n")
                              if l.rstrip(b"\r").startswith(b"data:")]
                if not data_lines:
                    continue
                data = b"\n".join(l.rstrip(b"\r") for l in data_lines)
                if data == b"[DONE]":
                    done = True
                    break
                ev = json.loads(data)
                if "error" in ev:
                    err = ev["error"]
                    r.error = (err.get("message") if isinstance(err, dict) else str(err))
                    r.status = f"200+error"
                    return r
                if ev.get("usage"):
                    usage_tokens = ev["usage"].get("completion_tokens")
                    r.prompt_tokens = ev["usage"].get("prompt_tokens")
                for ch in ev.get("choices") or []:
                    text = ch.get("text")
                    if text is None:
                        text = (ch.get("delta") or {}).get("content")
                    if text:
                        if r.ttft is None:
                            r.ttft = time.perf_counter() - t0
                        r.chunks += 1
            if done:
                break
        r.t_end = time.perf_counter()
        r.latency = r.t_end - t0
        r.tokens = usage_tokens if usage_tokens is not None else r.chunks
        r.ok = done
        if not done:
            r.error = "stream ended without [DONE]"
        return r
    except asyncio.CancelledError:
        r.error = "cancelled (scenario time limit)"
        r.status = "cancelled"
        raise
    except Exception as e:  # noqa: BLE001 -- reported per request
        r.error = f"{type(e).__name__}: {e}"
        return r
    finally:
        if r.t_end is None:
            r.t_end = time.perf_counter()
        if writer is not None:
            writer.close()


# ------------------------------------------------------------------------------------------------
# Prometheus text


def parse_metrics(text):
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        try:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
        except ValueError:
            continue
    return out


async def scrape(url):
    if not url:
        return {}
    m = re.match(r"http://([^:/]+):(\d+)(/.*)?$", url)
    try:
        status, body = await http_get(m.group(1), int(m.group(2)), m.group(3) or "/metrics")
        return parse_metrics(body.decode("utf-8", "replace")) if status == 200 else {}
    except Exception:  # noqa: BLE001
        return {}


def metric_delta(before, after, pattern):
    """{name: (before, after)} for metrics (histogram buckets left out) matching pattern."""
    rx = re.compile(pattern, re.I)
    return {k: (before.get(k, 0.0), v) for k, v in sorted(after.items())
            if rx.search(k.split("{")[0]) and "_bucket" not in k}


# ------------------------------------------------------------------------------------------------
# Cluster


class Cluster:
    def __init__(self, args, up_extra):
        self.args = args
        self.up_extra = up_extra
        self.proc = None
        self.log_path = None
        self.host = "127.0.0.1"
        self.port = None
        self.attention_metrics = args.attention_metrics
        self.gateway_metrics = None
        self.command = None

    def start(self):
        a = self.args
        if a.base_url:
            m = re.match(r"http://([^:/]+):(\d+)", a.base_url)
            self.host, self.port = m.group(1), int(m.group(2))
            self.gateway_metrics = f"http://{self.host}:{self.port}/metrics"
            return
        cmd = [a.expertmesh, "up", "--model", a.model, "--shards", str(a.shards), "--replicas",
               str(a.replicas), "--gateway", "--http-port", str(a.http_port)]
        cmd += self.up_extra
        self.command = cmd
        fd, self.log_path = tempfile.mkstemp(prefix="serving-bench-up-", suffix=".log")
        log = os.fdopen(fd, "w")
        print("$ " + " ".join(cmd), flush=True)
        # Own session: a Ctrl-C on the benchmark reaches `up` only through stop().
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=ROOT)
        log.close()
        deadline = time.time() + a.ready_timeout
        text = ""
        while time.time() < deadline:
            text = open(self.log_path, encoding="utf-8", errors="replace").read()
            if "Ctrl-C" in text:
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"`expertmesh up` exited ({self.proc.returncode}):\n{text}")
            time.sleep(0.3)
        else:
            raise RuntimeError(f"cluster not ready in {a.ready_timeout}s:\n{text}")
        for line in text.splitlines():
            m = re.search(r"^\s+(\S+)\s+grpc \S+\s+(?:metrics|http) (http://\S+/metrics)", line)
            if not m:
                continue
            name, url = m.group(1), m.group(2)
            if name == "gateway":
                self.gateway_metrics = url
                mm = re.match(r"http://([^:/]+):(\d+)/", url)
                self.host, self.port = mm.group(1), int(mm.group(2))
            elif name.startswith("attention-service") and not self.attention_metrics:
                self.attention_metrics = url
        if self.port is None:
            raise RuntimeError(f"no gateway endpoint in the output of `expertmesh up`:\n{text}")

    async def wait_healthy(self, timeout):
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                status, _ = await http_get(self.host, self.port, "/health", timeout=2)
                if status == 200:
                    return
                last = f"HTTP {status}"
            except Exception as e:  # noqa: BLE001
                last = repr(e)
            await asyncio.sleep(0.2)
        raise RuntimeError(f"gateway /health not OK within {timeout}s ({last})")

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.args.stop_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        tail = open(self.log_path, encoding="utf-8", errors="replace").read().splitlines()[-3:]
        warn = [l for l in tail if "warn" in l.lower() or "error" in l.lower()]
        for l in warn:
            print("  up: " + l)
        if not self.args.keep_log:
            os.unlink(self.log_path)


# ------------------------------------------------------------------------------------------------
# Scenarios


def table(title, rows):
    width = max(len(k) for k, _ in rows)
    print(f"============ {title} ============")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def classify(results):
    served = [r for r in results if r.ok]
    rejected = [r for r in results if r.status == 429]
    other = [r for r in results if not r.ok and r.status != 429]
    return served, rejected, other


def error_kinds(results):
    kinds = {}
    for r in results:
        key = f"{r.status}: {(r.error or '')[:80]}"
        kinds[key] = kinds.get(key, 0) + 1
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1])[:5])


async def run_bounded(coros_factory, count, concurrency, time_limit):
    """Runs count requests, at most `concurrency` at once; stops (cancels) at time_limit."""
    results = []
    sem = asyncio.Semaphore(concurrency)

    async def one(i):
        async with sem:
            r = await coros_factory(i)
            results.append(r)

    tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=time_limit)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return results, len(pending)


async def scenario_burst(cl, args, model):
    n = args.clients
    body = {"model": model, "prompt": "The lord said unto", "max_tokens": args.max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = asyncio.Event()
    n_connected = 0

    def connected():
        nonlocal n_connected
        n_connected += 1

    tasks = [asyncio.ensure_future(streamed_completion(
        cl.host, cl.port, "/v1/completions", body, args.api_key, start, connected))
        for _ in range(n)]
    t_conn = time.perf_counter()
    while n_connected < n and time.perf_counter() - t_conn < 15:
        if all(t.done() for t in tasks):
            break
        await asyncio.sleep(0.01)
    connect_s = time.perf_counter() - t_conn
    t0 = time.perf_counter()
    start.set()
    done, pending = await asyncio.wait(tasks, timeout=args.time_limit)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    results = [t.result() for t in done]
    t_all = max((r.t_end for r in results), default=t0) - t0
    served, rejected, other = classify(results)
    ttft = [r.ttft for r in served if r.ttft is not None]
    reject_s = max((r.t_end for r in rejected), default=t0) - t0
    out = {
        "scenario": "burst", "clients": n, "max_tokens": args.max_tokens,
        "connected_before_send": n_connected, "connect_s": round(connect_s, 3),
        "served": len(served), "http_429": len(rejected), "other_errors": len(other),
        "unfinished_at_time_limit": len(pending),
        "time_to_drain_s": round(t_all, 3), "last_429_after_s": round(reject_s, 3),
        "ttft_ms_p50": ms(percentile(ttft, 0.5)), "ttft_ms_p99": ms(percentile(ttft, 0.99)),
        "e2e_ms_p99": ms(percentile([r.latency for r in served], 0.99)),
        "served_tokens": sum(r.tokens for r in served),
        "retry_after": sorted({r.retry_after for r in rejected if r.retry_after})[:3],
        "error_kinds": error_kinds(other),
    }
    table("burst", [
        ("clients (connected before send)", f"{n} ({n_connected}, in {connect_s:.2f} s)"),
        ("served / 429 / other errors", f"{len(served)} / {len(rejected)} / {len(other)}"
         + (f"  (+{len(pending)} cut at the time limit)" if pending else "")),
        ("time to drain (s)", f"{t_all:.2f}  (last 429 after {reject_s:.2f} s)"),
        ("TTFT p50 / p99 (ms)", f"{out['ttft_ms_p50']} / {out['ttft_ms_p99']}"),
        ("E2E p99 (ms)", f"{out['e2e_ms_p99']}"),
        ("Retry-After on 429", ", ".join(out["retry_after"]) or "-"),
        ("other errors", json.dumps(out["error_kinds"]) if other else "-"),
    ])
    return out


def system_prompt(n_sentences):
    s = []
    i = 0
    while len(s) < n_sentences:
        # Numbered so the text does not repeat exactly (a realistic, long instruction list).
        s.append(f"Rule {i + 1}: {SYSTEM_SENTENCES[i % len(SYSTEM_SENTENCES)]}")
        i += 1
    return " ".join(s)


async def chat_prompt_tokens(cl, args, model, system, user):
    body = {"model": model, "max_tokens": 1,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": user}]}
    status, resp = await http_post_json(cl.host, cl.port, "/v1/chat/completions", body,
                                        args.api_key)
    if status != 200:
        raise RuntimeError(f"calibration request: HTTP {status}: {resp}")
    return resp["usage"]["prompt_tokens"]


async def scenario_prefix(cl, args, model, context):
    notes = []
    user_budget = 48
    target = args.prefix_tokens
    room = context - args.max_tokens - user_budget - 16
    if target > room:
        notes.append(f"prefix lowered from {target} to {room} tokens: the model's context is "
                     f"{context}")
        target = room
    # Calibrate the sentence count on a salted copy (a different first word), so that the
    # real prefix is not warmed in a prefix cache before the measurement.
    salt = "Calibration. "
    n = 8
    for _ in range(4):
        t = await chat_prompt_tokens(cl, args, model, salt + system_prompt(n), "Hi")
        t_small = await chat_prompt_tokens(cl, args, model, salt + system_prompt(1), "Hi")
        per_sentence = max(1.0, (t - t_small) / max(1, n - 1))
        new_n = max(1, 1 + round((target - t_small) / per_sentence))
        if new_n == n:
            break
        n = new_n
    system = system_prompt(n)
    users = [f"Question {i}: in two sentences, what should I check about the "
             f"{USER_TOPICS[i % len(USER_TOPICS)]} of replica {i}?" for i in range(args.requests)]

    def body(i):
        return {"model": model, "max_tokens": args.max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": users[i]}]}

    before = await scrape(cl.attention_metrics)
    t0 = time.perf_counter()
    results, cut = await run_bounded(
        lambda i: streamed_completion(cl.host, cl.port, "/v1/chat/completions", body(i),
                                      args.api_key),
        args.requests, args.concurrency, args.time_limit)
    dur = time.perf_counter() - t0
    await asyncio.sleep(0.3)
    after = await scrape(cl.attention_metrics)
    served, rejected, other = classify(results)
    ttft = [r.ttft for r in served if r.ttft is not None]
    sent_prompt = sum(r.prompt_tokens or 0 for r in served)
    per_req = sorted({r.prompt_tokens for r in served if r.prompt_tokens})
    key = "expertmesh_attention_prompt_tokens_total"
    computed = (after.get(key, float("nan")) - before.get(key, float("nan"))) if after else None
    prefix_metrics = metric_delta(before, after, r"prefix|cache_hit")
    out_tokens = sum(r.tokens for r in served)
    out = {
        "scenario": "prefix", "requests": args.requests, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "system_sentences": n,
        "system_prompt_tokens_approx": t,
        "prompt_tokens_per_request": [per_req[0], per_req[-1]] if per_req else None,
        "served": len(served), "http_429": len(rejected), "other_errors": len(other),
        "unfinished_at_time_limit": cut, "duration_s": round(dur, 3),
        "ttft_ms_p50": ms(percentile(ttft, 0.5)), "ttft_ms_p99": ms(percentile(ttft, 0.99)),
        "requests_per_s": round(len(served) / dur, 3),
        "output_tokens_per_s": round(out_tokens / dur, 2),
        "prompt_tokens_sent": sent_prompt,
        "prefill_tokens_computed": computed,
        "prefix_metrics": {k: [b, a] for k, (b, a) in prefix_metrics.items()},
        "notes": notes,
    }
    rows = [
        ("requests / concurrency", f"{args.requests} / {args.concurrency}"),
        ("prompt tokens per request", (f"{per_req[0]}..{per_req[-1]}" if per_req else "-")
         + f"  (shared system part ~{t})"),
        ("served / 429 / other errors", f"{len(served)} / {len(rejected)} / {len(other)}"),
        ("duration (s)", f"{dur:.2f}"),
        ("TTFT p50 / p99 (ms)", f"{out['ttft_ms_p50']} / {out['ttft_ms_p99']}"),
        ("throughput", f"{out['requests_per_s']} req/s, {out['output_tokens_per_s']} tok/s out"),
        ("prompt tokens sent", f"{sent_prompt}"),
        ("prefill tokens computed", f"{computed:.0f}  ({key} after - before)"
         if computed is not None else "- (no attention /metrics)"),
    ]
    if prefix_metrics:
        for k, (b, a) in prefix_metrics.items():
            rows.append((k, f"{b:g} -> {a:g}"))
    else:
        rows.append(("prefix-cache metrics", "none exported"))
    for note in notes:
        rows.append(("note", note))
    if other:
        rows.append(("other errors", json.dumps(error_kinds(other))))
    table("shared-prefix chat", rows)
    return out


async def scenario_mixed(cl, args, model, context):
    short_prompt = "The lord said unto"
    long_prompt = "And it came to pass"
    long_max = context - 32 if args.long_max_tokens is None else args.long_max_tokens

    def body(i):
        is_long = (i % args.long_every) == 0
        return {"model": model, "prompt": (long_prompt if is_long else short_prompt) + f" {i}",
                "max_tokens": long_max if is_long else args.max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    before = await scrape(cl.attention_metrics)
    t0 = time.perf_counter()
    kinds = {}

    async def one(i):
        r = await streamed_completion(cl.host, cl.port, "/v1/completions", body(i), args.api_key)
        kinds[id(r)] = "long" if (i % args.long_every) == 0 else "short"
        return r

    results, cut = await run_bounded(one, args.requests, args.concurrency,
                                     args.time_limit)
    dur = time.perf_counter() - t0
    await asyncio.sleep(0.3)
    after = await scrape(cl.attention_metrics)
    served, rejected, other = classify(results)
    gen_key = "expertmesh_attention_generated_tokens_total"
    gen = (after.get(gen_key, 0) - before.get(gen_key, 0)) if after else None
    out_tokens = sum(r.tokens for r in served)
    long_done = sum(1 for r in served if kinds.get(id(r)) == "long")
    preempt = metric_delta(before, after, r"preempt")
    short_ttft = [r.ttft for r in served if r.ttft and kinds.get(id(r)) == "short"]
    kv_total = after.get("expertmesh_attention_kv_blocks_total")
    out = {
        "scenario": "mixed", "requests": args.requests, "concurrency": args.concurrency,
        "long_every": args.long_every, "short_max_tokens": args.max_tokens,
        "long_max_tokens": long_max, "kv_blocks": kv_total,
        "completed": len(served), "completed_long": long_done,
        "completed_short": len(served) - long_done, "http_429": len(rejected),
        "other_errors": len(other), "unfinished_at_time_limit": cut,
        "duration_s": round(dur, 3),
        "completed_tokens_per_s": round(out_tokens / dur, 2),
        "generated_tokens_per_s": round(gen / dur, 2) if gen is not None else None,
        "ttft_ms_p50": ms(percentile([r.ttft for r in served if r.ttft], 0.5)),
        "ttft_ms_p99": ms(percentile([r.ttft for r in served if r.ttft], 0.99)),
        "short_ttft_ms_p50": ms(percentile(short_ttft, 0.5)),
        "short_ttft_ms_p99": ms(percentile(short_ttft, 0.99)),
        "short_e2e_ms_p99": ms(percentile(
            [r.latency for r in served if kinds.get(id(r)) == "short"], 0.99)),
        "preempt_metrics": {k: [b, a] for k, (b, a) in preempt.items()},
        "error_kinds": error_kinds(other),
    }
    rows = [
        ("requests / concurrency", f"{args.requests} / {args.concurrency}, every "
         f"{args.long_every}th long"),
        ("max_tokens short / long", f"{args.max_tokens} / {long_max}"),
        ("KV blocks (attention)", f"{kv_total:g}" if kv_total is not None else "-"),
        ("completed (short + long)", f"{len(served)} ({len(served) - long_done} + {long_done})"
         + (f"  (+{cut} cut at the {args.time_limit:g} s limit)" if cut else "")),
        ("429 / other errors", f"{len(rejected)} / {len(other)}"),
        ("duration (s)", f"{dur:.2f}"),
        ("throughput (tok/s)", f"{out['completed_tokens_per_s']} in completed requests, "
         f"{out['generated_tokens_per_s']} generated ({gen_key})"),
        ("TTFT p50 / p99 (ms)", f"{out['ttft_ms_p50']} / {out['ttft_ms_p99']}"),
        ("short requests: TTFT p50 / p99, E2E p99 (ms)",
         f"{out['short_ttft_ms_p50']} / {out['short_ttft_ms_p99']}, {out['short_e2e_ms_p99']}"),
    ]
    if preempt:
        for k, (b, a) in preempt.items():
            rows.append((k, f"{b:g} -> {a:g}"))
    else:
        rows.append(("preemptions", "no metric with 'preempt' in its name"))
    if other:
        rows.append(("other errors", json.dumps(out["error_kinds"])))
    table("mixed (fixed KV budget)", rows)
    return out


# ------------------------------------------------------------------------------------------------


SCENARIO_DEFAULTS = {
    # scenario: (max_tokens, requests, concurrency, time_limit_s, kv_blocks for `up`)
    "burst": dict(max_tokens=16, time_limit=120.0, kv_blocks=None),
    "prefix": dict(max_tokens=16, requests=64, concurrency=16, time_limit=150.0, kv_blocks=None),
    "mixed": dict(max_tokens=32, requests=48, concurrency=16, time_limit=150.0, kv_blocks=256),
}


def raise_fd_limit(n):
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = min(hard, max(soft, n))
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ImportError, ValueError, OSError):
        pass


async def run_one(name, args):
    d = SCENARIO_DEFAULTS[name]
    a = argparse.Namespace(**vars(args))
    for k, v in d.items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    up_extra = list(args.up_arg or [])
    if a.kv_blocks is not None:
        up_extra += ["--kv-blocks", str(a.kv_blocks)]
    cl = Cluster(a, up_extra)
    cl.start()
    try:
        await cl.wait_healthy(a.ready_timeout)
        status, models = await http_get(cl.host, cl.port, "/v1/models")
        info = json.loads(models)["data"][0]
        model = a.served_model or info["id"]
        context = info.get("max_model_len")
        if not context:
            cfg = json.load(open(os.path.join(a.model, "config.json")))
            context = cfg["max_position_embeddings"]
        if name == "burst":
            out = await scenario_burst(cl, a, model)
        elif name == "prefix":
            out = await scenario_prefix(cl, a, model, context)
        else:
            out = await scenario_mixed(cl, a, model, context)
        out["model"] = model
        out["context"] = context
        out["up_command"] = " ".join(cl.command) if cl.command else None
        print("RESULT " + json.dumps(out, sort_keys=True), flush=True)
        return out
    finally:
        cl.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenario", choices=["burst", "prefix", "mixed", "all"])
    ap.add_argument("--expertmesh", default=os.path.join(ROOT, "build/cpu/tools/cli/expertmesh"),
                    help="the `expertmesh` CLI (default: build/cpu)")
    ap.add_argument("--model", default=os.path.join(ROOT, "models/expertmesh-tiny"))
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--http-port", type=int, default=0, help="gateway port (0: a free one)")
    ap.add_argument("--kv-blocks", type=int, help="`up --kv-blocks` (mixed: 256 by default)")
    ap.add_argument("--up-arg", action="append", metavar="FLAG",
                    help="extra flag for `expertmesh up`, repeatable (--up-arg=--max-waiting=512)")
    ap.add_argument("--base-url", help="use a running gateway instead of starting a cluster")
    ap.add_argument("--attention-metrics", help="attention /metrics URL (with --base-url)")
    ap.add_argument("--served-model", help="model name (default: the first of /v1/models)")
    ap.add_argument("--api-key")
    ap.add_argument("--clients", type=int, default=1000, help="burst: clients")
    ap.add_argument("--requests", type=int, help="prefix: 64, mixed: 48")
    ap.add_argument("--concurrency", type=int, help="prefix and mixed: 16")
    ap.add_argument("--max-tokens", type=int, help="burst and prefix: 16; mixed (short): 32")
    ap.add_argument("--prefix-tokens", type=int, default=1000, help="prefix: system prompt size")
    ap.add_argument("--long-every", type=int, default=4, help="mixed: every k-th request is long")
    ap.add_argument("--long-max-tokens", type=int, help="mixed: default context - 32")
    ap.add_argument("--time-limit", type=float,
                    help="seconds a scenario may run before open requests are cancelled "
                         "(burst 120, prefix and mixed 150)")
    ap.add_argument("--ready-timeout", type=float, default=120)
    ap.add_argument("--stop-timeout", type=float, default=30)
    ap.add_argument("--keep-log", action="store_true", help="keep the `expertmesh up` log")
    args = ap.parse_args()
    if args.base_url and args.scenario == "mixed" and args.kv_blocks:
        ap.error("--kv-blocks needs a cluster started by this script (no --base-url)")
    raise_fd_limit(args.clients + 256)
    names = ["burst", "prefix", "mixed"] if args.scenario == "all" else [args.scenario]
    if args.base_url:
        SCENARIO_DEFAULTS["mixed"]["kv_blocks"] = None
    rc = 0
    for name in names:
        try:
            asyncio.run(run_one(name, args))
        except KeyboardInterrupt:
            return 130
        except Exception as e:  # noqa: BLE001
            print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
