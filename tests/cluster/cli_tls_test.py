#!/usr/bin/env python3
"""`expertmesh up` and `expertmesh status` with mTLS (issue 12, part 2).

A CA and one service certificate (SAN IP:127.0.0.1, server and client use) are made at test
time with the openssl CLI. `expertmesh up --gateway --tls-cert/--tls-key/--tls-ca` starts the
bundled model's cluster with every service on mTLS (the launcher's own health checks present
the same certificate) and serves a completion through the gateway; `expertmesh status` with the
flags prints the shard map, without them (or with a certificate from another CA) it fails with
a message naming the flags, and partial flags are a usage error. The cluster stops with exit 0
(every service too; when one does not, the failure prints its log's sanitizer report or end).

Usage: cli_tls_test.py <source dir> <build dir>
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tls_pki import make_ca, make_cert, service_reports, start_up, stop_up  # noqa: E402

SRC, BUILD = sys.argv[1], sys.argv[2]
CLI = os.path.join(BUILD, "tools", "cli", "expertmesh")
MODEL = os.path.join(SRC, "models", "expertmesh-tiny")


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)


def tls_flags(d, ca, cn):
    out = make_cert(d, ca, cn)
    return ["--tls-cert", f"{out}/tls.crt", "--tls-key", f"{out}/tls.key", "--tls-ca",
            f"{d}/{ca}.crt"]


def status(router, tls):
    return subprocess.run([CLI, "status", "--router", router, "--timeout-ms", "3000", *tls],
                          capture_output=True, text=True, timeout=30)


def main():
    d = tempfile.mkdtemp(prefix="em-cli-tls-")
    make_ca(d, "ca")
    make_ca(d, "other-ca")
    tls = tls_flags(d, "ca", "service")
    intruder = tls_flags(d, "other-ca", "intruder")

    # Partial flags: refused before anything starts (usage error).
    r = subprocess.run([CLI, "up", "--model", MODEL, *tls[:2]], capture_output=True, text=True,
                       timeout=30)
    check(r.returncode == 2 and "--tls-ca" in r.stdout + r.stderr,
          f"up with cert and key only: rc {r.returncode} {r.stdout + r.stderr}")

    up, out = start_up(CLI, ["--model", MODEL, "--gateway", "--log-dir", f"{d}/logs",
                             "--ready-timeout-s", "90", *tls])
    check(up is not None and "cluster ready" in out,
          f"up did not start:\n{out}\n{service_reports(f'{d}/logs')}")
    try:
        router = re.search(r"router-service\s+grpc (\S+)", out).group(1)
        http = re.search(r"gateway\s+grpc \S+\s+http http://([^/]+)/", out).group(1)

        # A completion through the gateway (gateway -> attention -> shards all on mTLS).
        models = json.load(urllib.request.urlopen(f"http://{http}/v1/models", timeout=30))
        body = json.dumps({"model": models["data"][0]["id"], "prompt": "The capital of",
                           "max_tokens": 8, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://{http}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        resp = json.load(urllib.request.urlopen(req, timeout=120))
        check(resp["usage"]["completion_tokens"] == 8, f"completion: {resp}")
        check(resp["choices"][0]["finish_reason"] == "length", f"completion: {resp}")

        for log in ("router-service", "attention-service", "gateway"):
            text = open(f"{d}/logs/{log}.log", encoding="utf-8", errors="replace").read()
            check("mTLS on" in text, f"{log} did not start with mTLS:\n{text}")
        r = status(router, tls)
        check(r.returncode == 0 and "1/1 replica(s) healthy" in r.stdout,
              f"status with the flags: rc {r.returncode}\n{r.stdout}{r.stderr}")
        # The framed TCP data plane is plaintext: under mTLS the shard does not open it.
        check("data plane off" in r.stdout and "data 127.0.0.1:" not in r.stdout,
              f"a shard under mTLS advertises a data plane:\n{r.stdout}")
        r = status(router, [])
        check(r.returncode == 1 and "--tls-cert" in r.stderr + r.stdout,
              f"status without the flags: rc {r.returncode}\n{r.stdout}{r.stderr}")
        r = status(router, intruder)
        check(r.returncode == 1 and "shard 0" not in r.stdout,
              f"status with another CA's certificate: rc {r.returncode}\n{r.stdout}{r.stderr}")
        r = status(router, tls[:4])
        check(r.returncode == 2 and "--tls-ca" in r.stderr + r.stdout,
              f"status without --tls-ca: rc {r.returncode}\n{r.stdout}{r.stderr}")
    finally:
        rc, rest = stop_up(up)
    # A service that exits non-zero (a sanitizer report, under the asan preset) explains itself.
    check(rc == 0 and "all services stopped" in rest,
          f"up exit {rc}:\n{rest}\n{service_reports(f'{d}/logs')}")
    shutil.rmtree(d, ignore_errors=True)
    print("OK")


if __name__ == "__main__":
    main()
