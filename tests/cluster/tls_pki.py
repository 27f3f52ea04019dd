"""Certificates made at test time with the openssl CLI (as tests/service-common/tls_test.cc
does): a self-signed CA and certificates it signs, for 127.0.0.1 and localhost, usable by
servers and clients. Shared by the Python TLS tests (tests/cluster, tests/gateway)."""
import os
import subprocess

KEY_OPTS = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _sh(args):
    subprocess.run(args, check=True, capture_output=True)


def make_ca(d, name):
    """<d>/<name>.crt and .key: a self-signed CA; returns the certificate's path."""
    _sh(["openssl", "req", "-x509", *KEY_OPTS, "-days", "2", "-subj", f"/CN={name}", "-addext",
         "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=keyCertSign,cRLSign",
         "-keyout", f"{d}/{name}.key", "-out", f"{d}/{name}.crt"])
    return f"{d}/{name}.crt"


def make_cert(d, ca, cn, out=None):
    """<out>/tls.crt and tls.key (out defaults to <d>/<cn>) signed by CA <ca>, CN = cn, SAN
    IP:127.0.0.1 and DNS:localhost; returns out."""
    out = out or os.path.join(d, cn)
    os.makedirs(out, exist_ok=True)
    with open(f"{out}/ext.cnf", "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                "extendedKeyUsage=serverAuth,clientAuth\n")
    _sh(["openssl", "req", "-new", *KEY_OPTS, "-subj", f"/CN={cn}", "-keyout", f"{out}/tls.key",
         "-out", f"{out}/tls.csr"])
    _sh(["openssl", "x509", "-req", "-days", "2", "-in", f"{out}/tls.csr", "-CA",
         f"{d}/{ca}.crt", "-CAkey", f"{d}/{ca}.key", "-CAcreateserial", "-extfile",
         f"{out}/ext.cnf", "-out", f"{out}/tls.crt"])
    return out


def start_up(cli, args, timeout_s=120):
    """Runs `expertmesh up <args>` until it has printed its endpoints. Returns the process
    and its output so far (None as the process when it did not get there)."""
    import time
    up = subprocess.Popen([cli, "up", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    lines = []
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        line = up.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C"):
            return up, "".join(lines)
    stop_up(up)
    return None, "".join(lines)


def stop_up(up):
    """SIGTERM to `expertmesh up`; returns (exit code, the rest of its output)."""
    import signal
    if up.poll() is None:
        up.send_signal(signal.SIGTERM)
    try:
        rest, _ = up.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        up.kill()
        rest, _ = up.communicate()
    return up.returncode, rest


SANITIZER_MARKERS = ("==ERROR: ", "WARNING: ThreadSanitizer", "runtime error: ")


def service_reports(log_dir, tail_lines=30, max_chars=20000):
    """For a failure message: each service log in `log_dir` (stdout and stderr, where the
    sanitizers write), from the first line of a sanitizer report on when it has one (at most
    max_chars), else its last `tail_lines` lines (tests/common/child_log.h: the same marker
    search, then the log's end)."""
    if not os.path.isdir(log_dir):
        return f"(no log directory {log_dir})"
    parts = []
    for name in sorted(os.listdir(log_dir)):
        if not name.endswith(".log"):
            continue
        with open(os.path.join(log_dir, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        starts = [text.find(m) for m in SANITIZER_MARKERS if m in text]
        if starts:
            begin = text.rfind("\n", 0, min(starts)) + 1
            parts.append(f"== sanitizer report in {name}:\n{text[begin:begin + max_chars]}")
        else:
            tail = "\n".join(text.splitlines()[-tail_lines:])
            parts.append(f"== last lines of {name}:\n{tail}")
    return "\n".join(parts)

