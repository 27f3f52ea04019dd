#!/usr/bin/env python3
"""HTTPS on the gateway's HTTP port (--http-tls-cert/--http-tls-key/--http-tls-ca).

A CA and certificates are made at test time with the openssl CLI. `expertmesh up --gateway
--http-tls-cert/--http-tls-key` starts the bundled model's cluster; then:
  - the official openai client, verifying against the test CA, gets the same greedy text whole
    and streamed; curl with --cacert gets /health, curl without it refuses the certificate;
  - plain HTTP sent to the TLS port gets no HTTP answer and the connection closes; a TCP
    connection that never starts its handshake is closed after the header timeout; the server
    answers over https afterwards;
  - the certificate is rotated in place (a symlinked directory swapped, as a Kubernetes Secret
    update does): new connections get the new certificate, without a restart;
  - a second gateway with --http-tls-ca refuses a client without a certificate and serves one
    with a certificate from the CA;
  - only one of --http-tls-cert/--http-tls-key is a usage error (exit 2) at start-up.

Usage: gateway_https_test.py <source dir> <build dir>
"""
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

import openai

SRC, BUILD = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(SRC, "tests", "cluster"))
from tls_pki import make_ca, make_cert, start_up, stop_up  # noqa: E402

CLI = os.path.join(BUILD, "tools", "cli", "expertmesh")
GATEWAY = os.path.join(BUILD, "gateway", "gateway")
MODEL = os.path.join(SRC, "models", "expertmesh-tiny")
HEADER_TIMEOUT_S = 2


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_cn(port, ctx):
    """The CN of the certificate a new connection to the port is served."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            cert = s.getpeercert()
    return dict(x[0] for x in cert["subject"])["commonName"]


def https_get(port, path, ctx, timeout=30):
    r = urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=ctx, timeout=timeout)
    return r.status, r.read()


def wait_closed(sock, within_s):
    """Reads until the peer closes; returns (bytes received, seconds taken), or None when the
    connection was still open after within_s."""
    sock.settimeout(0.2)
    got, start = b"", time.time()
    while time.time() - start < within_s:
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return got, time.time() - start
        if not chunk:
            return got, time.time() - start
        got += chunk
    return None


def main():
    d = tempfile.mkdtemp(prefix="em-https-")
    ca = make_ca(d, "ca")
    make_ca(d, "other-ca")
    make_cert(d, "ca", "gateway-1", f"{d}/gw-v1")
    make_cert(d, "ca", "client", f"{d}/client")
    os.symlink(f"{d}/gw-v1", f"{d}/gw")  # the gateway reads <d>/gw/tls.* (a mounted Secret)
    verify = ssl.create_default_context(cafile=ca)

    # Only one of cert/key: refused at start-up, nothing started.
    r = subprocess.run([GATEWAY, "--model", MODEL, "--attention", "127.0.0.1:1",
                        "--http-tls-cert", f"{d}/gw/tls.crt"], capture_output=True, text=True,
                       timeout=30)
    check(r.returncode == 2 and "--http-tls-key" in r.stdout + r.stderr,
          f"gateway with --http-tls-cert only: rc {r.returncode} {r.stdout}{r.stderr}")

    up, out = start_up(CLI, ["--model", MODEL, "--gateway", "--log-dir", f"{d}/logs",
                             "--http-tls-cert", f"{d}/gw/tls.crt", "--http-tls-key",
                             f"{d}/gw/tls.key", "--ready-timeout-s", "90",
                             f"--gateway-arg=--header-timeout-s={HEADER_TIMEOUT_S}"])
    check(up is not None and "cluster ready" in out, f"up did not start:\n{out}")
    second = None
    try:
        port = int(re.search(r"gateway\s+grpc \S+\s+http https://[^:]+:(\d+)/", out).group(1))
        attention = re.search(r"attention-service\s+grpc (\S+)", out).group(1)

        # The official openai client over https, verifying the gateway against the test CA.
        client = openai.OpenAI(base_url=f"https://127.0.0.1:{port}/v1", api_key="unused",
                               max_retries=0, timeout=120,
                               http_client=openai.DefaultHttpx2Client(verify=verify))
        model = client.models.list().data[0].id
        greedy = {"temperature": 0, "extra_body": {"ignore_eos": True}}
        whole = client.completions.create(model=model, prompt="The capital of", max_tokens=8,
                                          **greedy)
        check(whole.usage.completion_tokens == 8, f"completion usage {whole.usage}")
        streamed = "".join(
            c.choices[0].text
            for c in client.completions.create(model=model, prompt="The capital of",
                                               max_tokens=8, stream=True, **greedy)
            if c.choices)
        check(streamed == whole.choices[0].text,
              f"streamed {streamed!r} != whole {whole.choices[0].text!r}")
        chat = client.chat.completions.create(model=model, max_tokens=4,
                                              messages=[{"role": "user", "content": "Hi"}],
                                              **greedy)
        check(chat.usage.completion_tokens == 4, f"chat usage {chat.usage}")

        # curl: verified against the CA; without it, the certificate is refused (exit 60).
        r = subprocess.run(["curl", "-sS", "--cacert", ca, f"https://127.0.0.1:{port}/health"],
                           capture_output=True, text=True, timeout=30)
        check(r.returncode == 0 and json.loads(r.stdout) == {"status": "ok"},
              f"curl --cacert /health: rc {r.returncode} {r.stdout}{r.stderr}")
        r = subprocess.run(["curl", "-sS", f"https://127.0.0.1:{port}/health"],
                           capture_output=True, text=True, timeout=30)
        check(r.returncode == 60, f"curl without the CA: rc {r.returncode} {r.stderr}")

        # Plain HTTP to the TLS port: no HTTP answer, the connection closes.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            closed = wait_closed(s, 10)
        check(closed is not None, "plain HTTP to the TLS port: the connection stayed open")
        check(not closed[0].startswith(b"HTTP/"), f"plain HTTP answered: {closed[0][:80]!r}")
        # A connection that never starts its handshake: closed after the header timeout.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            closed = wait_closed(s, HEADER_TIMEOUT_S + 8)
        check(closed is not None and closed[1] >= HEADER_TIMEOUT_S - 0.5,
              f"silent TCP connection: {closed}")
        # A client that does not trust the gateway's CA gives up; the server does not care.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            try:
                ssl.create_default_context(cafile=f"{d}/other-ca.crt").wrap_socket(
                    raw, server_hostname="127.0.0.1")
                check(False, "a certificate from the test CA verified against another CA")
            except ssl.SSLCertVerificationError:
                pass
        status, body = https_get(port, "/health", verify)
        check(status == 200, f"/health after the bad clients: {status} {body}")

        # Rotation in place: <d>/gw -> gw-v2, swapped atomically; new connections see it.
        check(peer_cn(port, verify) == "gateway-1", "served certificate before rotation")
        make_cert(d, "ca", "gateway-2", f"{d}/gw-v2")
        os.symlink(f"{d}/gw-v2", f"{d}/gw.new")
        os.replace(f"{d}/gw.new", f"{d}/gw")
        deadline, cn = time.time() + 15, None
        while time.time() < deadline:
            cn = peer_cn(port, verify)
            if cn == "gateway-2":
                break
            time.sleep(0.2)
        check(cn == "gateway-2", f"served certificate after rotation: {cn}")
        again = client.completions.create(model=model, prompt="The capital of", max_tokens=8,
                                          **greedy)
        check(again.choices[0].text == whole.choices[0].text, "completion after rotation")

        # A second gateway requiring client certificates from the CA.
        hport = free_port()
        second = subprocess.Popen(
            [GATEWAY, "--model", MODEL, "--attention", attention, "--listen", "127.0.0.1:0",
             "--http-host", "127.0.0.1", "--http-port", str(hport), "--http-tls-cert",
             f"{d}/gw/tls.crt", "--http-tls-key", f"{d}/gw/tls.key", "--http-tls-ca", ca],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with_cert = ssl.create_default_context(cafile=ca)
        with_cert.load_cert_chain(f"{d}/client/tls.crt", f"{d}/client/tls.key")
        deadline, status = time.time() + 60, None
        while time.time() < deadline and second.poll() is None:
            try:
                status, _ = https_get(hport, "/health", with_cert, timeout=5)
                if status == 200:
                    break
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        check(status == 200, f"client-CA gateway /health with a client certificate: {status}")
        try:
            https_get(hport, "/health", verify, timeout=10)
            check(False, "client-CA gateway served a client without a certificate")
        except (ssl.SSLError, ConnectionError, urllib.error.URLError) as e:
            print(f"without a client certificate: {e!r}")
        status, _ = https_get(hport, "/health", with_cert, timeout=10)
        check(status == 200, "client-CA gateway after a refused client")
    finally:
        if second is not None:
            second.terminate()
            second.wait(timeout=60)
        rc, rest = stop_up(up)
    check(second is None or second.returncode == 0, f"second gateway exit {second.returncode}")
    check(rc == 0 and "all services stopped" in rest, f"up exit {rc}:\n{rest}")
    shutil.rmtree(d, ignore_errors=True)
    print("OK")


if __name__ == "__main__":
    main()
