#!/usr/bin/env python3
"""Builds the container image (Dockerfile, target `tiny`) and runs the cpu-tiny topology
from it: one container per Deployment of the rendered k8s/overlays/cpu-tiny, on the host
network, each with exactly the command, arguments and environment its manifest gives (the
$(VAR) references expanded the way the kubelet does: ConfigMap values, POD_IP = 127.0.0.1,
POD_NAME = the Deployment's name), the pod's security settings (user 10001, read-only root,
no capabilities) and the Service names resolving to 127.0.0.1. Then greedy completions
through the gateway must equal, token for token, those of the same topology started natively
from the build tree (`expertmesh up --shards N --gateway`), and every container stopped
with SIGTERM must drain and exit 0 within its pod's grace period.

usage: docker_cluster_test.py REPO_ROOT BUILD_DIR
Exit 77 (skipped) when no Docker engine answers or no client can build with BuildKit; run
tools/docker-setup.sh first (tools/test.sh does). EXPERTMESH_DOCKER_IMAGE=name:tag uses an
image already built instead of building one.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import yaml

ROOT, BUILD = (os.path.abspath(p) for p in sys.argv[1:3]) if len(sys.argv) >= 3 else (None, None)
IMAGE = os.environ.get("EXPERTMESH_DOCKER_IMAGE", "expertmesh:tiny")
PREFIX = "em-k8s-test-"
PROMPTS = ["And God said", "The king of Israel", "Once upon a time"]
MAX_TOKENS = 24
SKIP = 77


def log(*a):
    print(*a, flush=True)


def run(cmd, timeout=60, check=True, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr[-2000:]}")
    return out


def docker_clients():
    """The client that answers, and how it builds with BuildKit (cache mounts): buildx where
    installed, else a pre-23 client's built-in BuildKit (DOCKER_BUILDKIT=1)."""
    answering = None
    for client in dict.fromkeys([shutil.which("docker"), "/usr/bin/docker"]):
        if not client or not os.access(client, os.X_OK):
            continue
        if run([client, "info"], timeout=30, check=False).returncode != 0:
            continue
        answering = answering or client
        if run([client, "buildx", "version"], timeout=30, check=False).returncode == 0:
            return client, [client, "buildx", "build", "--load"]
        version = run([client, "version", "--format", "{{.Client.Version}}"], check=False)
        major = re.match(r"(\d+)", version.stdout.strip())
        if major and int(major.group(1)) < 23:
            return client, [client, "build"]
    return answering, None


def expand(text, env):
    """$(VAR) as the kubelet expands it: known variables replaced, $$ escapes, others kept."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def container_specs(docs):
    """(name, argv, env) of every Deployment's container, in start order."""
    configmaps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    order = {"router-service": 0, "expert-service": 1, "attention-service": 2, "gateway": 3}
    specs = []
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        name, ns = d["metadata"]["name"], d["metadata"].get("namespace", "default")
        (c,) = d["spec"]["template"]["spec"]["containers"]
        env = {}
        for ref in c.get("envFrom", []):
            env.update(configmaps[ref["configMapRef"]["name"]])
        fields = {"status.podIP": "127.0.0.1", "metadata.name": name, "metadata.namespace": ns}
        for e in c.get("env", []):
            if "value" in e:
                env[e["name"]] = expand(e["value"], env)
            elif "fieldRef" in e.get("valueFrom", {}):
                env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                raise RuntimeError(f"{name}: env {e['name']} has a source this test cannot give")
        argv = [expand(a, env) for a in c["command"] + c.get("args", [])]
        specs.append((order[c["command"][0]], name, argv, env))
    return [(n, a, e) for _, n, a, e in sorted(specs, key=lambda s: (s[0], s[1]))]


def service_hosts(docs):
    hosts = []
    for d in docs:
        if d["kind"] == "Service":
            n, ns = d["metadata"]["name"], d["metadata"].get("namespace", "default")
            hosts += [n, f"{n}.{ns}", f"{n}.{ns}.svc", f"{n}.{ns}.svc.cluster.local"]
    return hosts


def ports_of(docs):
    ports = []
    for d in docs:
        if d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                ports += [p["containerPort"] for p in c.get("ports", [])]
    return ports


def port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def http_json(url, body=None, timeout=60):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read() or b"null")


def wait_healthy(port, deadline_s, alive):
    end = time.time() + deadline_s
    while time.time() < end:
        alive()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"gateway on port {port} not healthy within {deadline_s} s")


def completions(port, model):
    out = []
    for p in PROMPTS:
        status, body = http_json(f"http://127.0.0.1:{port}/v1/completions",
                                 {"model": model, "prompt": p, "max_tokens": MAX_TOKENS,
                                  "temperature": 0})
        if status != 200:
            raise RuntimeError(f"completion of {p!r}: HTTP {status}")
        out.append((body["choices"][0]["text"], body["usage"]["completion_tokens"]))
    return out


def reference(model_dir, shards):
    """The same topology from the build tree, on loopback (no container), for comparison."""
    cli = os.path.join(BUILD, "tools/cli/expertmesh")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([cli, "up", "--model", model_dir, "--shards", str(shards),
                             "--replicas", "1", "--gateway", "--http-port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def alive():
            if proc.poll() is not None:
                raise RuntimeError(f"expertmesh up exited: {proc.stdout.read()[-3000:]}")
        wait_healthy(port, 120, alive)
        return completions(port, os.path.basename(model_dir))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main():
    if not ROOT:
        sys.exit(__doc__)
    client, build = docker_clients()
    if not client:
        log("SKIP: no Docker engine answers (run tools/docker-setup.sh as root to install and "
            "start one)")
        return SKIP
    kubectl = shutil.which("kubectl")
    if not kubectl:
        log("SKIP: kubectl is not on the PATH (the container arguments come from the rendered "
            "k8s/overlays/cpu-tiny)")
        return SKIP

    if "EXPERTMESH_DOCKER_IMAGE" not in os.environ:
        if not build:
            log(f"SKIP: {client} cannot build with BuildKit (install docker-buildx, or Debian's "
                "docker.io)")
            return SKIP
        t0 = time.time()
        env = dict(os.environ, DOCKER_BUILDKIT="1")
        out = subprocess.run(build + ["--network", "host", "--target", "tiny", "-t", IMAGE,
                                      "--build-arg", f"JOBS={os.cpu_count()}", ROOT],
                             capture_output=True, text=True, timeout=3600, env=env)
        if out.returncode != 0:
            log(out.stdout[-4000:], out.stderr[-4000:])
            raise RuntimeError("docker build failed")
        log(f"image {IMAGE} built in {time.time() - t0:.1f} s")

    rendered = run([kubectl, "kustomize", os.path.join(ROOT, "k8s/overlays/cpu-tiny")]).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    specs = container_specs(docs)
    busy = [p for p in ports_of(docs) if not port_free(p)]
    if busy:
        raise RuntimeError(f"host ports {busy} (from the cpu-tiny manifests) are in use")
    gateway_port = next(int(a.split("=", 1)[1]) for _, argv, _ in specs for a in argv
                        if a.startswith("--http-port="))
    model_dir = next(a.split("=", 1)[1] for _, argv, _ in specs for a in argv
                     if a.startswith("--model="))
    shards = sum(1 for n, _, _ in specs if n.startswith("expert-shard-"))

    hosts = sum((["--add-host", f"{h}:127.0.0.1"] for h in service_hosts(docs)), [])
    names = [PREFIX + n for n, _, _ in specs]
    run([client, "rm", "-f"] + names, check=False)
    try:
        t0 = time.time()
        for name, argv, _ in specs:
            log(f"{name}: {' '.join(argv)}")
            run([client, "run", "-d", "--name", PREFIX + name, "--network", "host", *hosts,
                 "--user", "10001:10001", "--read-only", "--tmpfs", "/tmp:size=16m",
                 "--cap-drop", "ALL", "--security-opt", "no-new-privileges", IMAGE] + argv)

        def alive():
            for n in names:
                state = run([client, "inspect", "-f", "{{.State.Running}}", n]).stdout.strip()
                if state != "true":
                    logs = run([client, "logs", n], check=False)
                    raise RuntimeError(f"{n} stopped:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        wait_healthy(gateway_port, 180, alive)
        log(f"cluster from the image healthy in {time.time() - t0:.1f} s")
        status, models = http_json(f"http://127.0.0.1:{gateway_port}/v1/models")
        served = models["data"][0]["id"]
        got = completions(gateway_port, served)
        want = reference(os.path.join(ROOT, "models", os.path.basename(model_dir)), shards)
        for p, g, w in zip(PROMPTS, got, want):
            log(f"{p!r}: image {g} / build tree {w}")
            if g != w:
                raise RuntimeError(f"{p!r}: the image's cluster answered {g}, the build tree's {w}")
            if g[1] <= 0 or not g[0]:
                raise RuntimeError(f"{p!r}: empty completion")

        # SIGTERM, as the kubelet sends it (after preStop): every service drains and exits 0
        # within its pod's grace period. A shard first (the others keep running), then the
        # rest front to back.
        grace = {d["metadata"]["name"]: d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                 for d in docs if d["kind"] == "Deployment"}
        for name in ["expert-shard-0", "gateway", "attention"] + [
                n for n, _, _ in reversed(specs) if n not in ("expert-shard-0", "gateway",
                                                              "attention")]:
            t0 = time.time()
            run([client, "stop", "-t", str(grace[name]), PREFIX + name], timeout=grace[name] + 30)
            took = time.time() - t0
            code = run([client, "inspect", "-f", "{{.State.ExitCode}}", PREFIX + name]).stdout.strip()
            log(f"{name}: SIGTERM -> exit {code} in {took:.1f} s (grace {grace[name]} s)")
            if code != "0":
                raise RuntimeError(f"{name} exited {code} after SIGTERM")
        log("PASS")
        return 0
    except Exception:
        for n in names:
            logs = run([client, "logs", "--tail", "30", n], check=False)
            log(f"--- {n}\n{logs.stdout}{logs.stderr}")
        raise
    finally:
        run([client, "rm", "-f"] + names, check=False)


if __name__ == "__main__":
    sys.exit(main())
