#!/usr/bin/env python3
"""Decode throughput of a cluster whose shard groups sit behind consumer-grade links (issue 14,
part 3). Standard library only; needs root (CAP_NET_ADMIN), `ip` and `tc`.

Topology (one network namespace per shard group, router and attention service in the root
namespace):

    root ns: router (0.0.0.0:R), attention-service (127.0.0.1:A), this script, the benchmark
       | veth emlb<id>h<g> 10.213.<g>.1/24      tbf on this end: root -> shard bandwidth
       | veth emlb<id>n<g> 10.213.<g>.2/24      tbf on this end: shard -> root bandwidth
    ns emlb-<id>-<g>: netdelay --listen 10.213.<g>.2:P --connect 127.0.0.1:S --delay-us D
                      netdelay --listen 10.213.<g>.2:Q --connect 127.0.0.1:T --delay-us D
                      expert-service --listen 127.0.0.1:S --advertise 10.213.<g>.2:P
                                     --data-listen 127.0.0.1:T --data-advertise 10.213.<g>.2:Q
                                     --router 10.213.<g>.1:R

(P/S: the shard's gRPC port, Q/T: its framed TCP data plane, which the attention service uses
for expert requests unless --data-plane grpc.)

So every expert request and reply between the attention service and a shard crosses a veth pair
limited by tbf in each direction, and the relay (tools/netdelay; the kernel has no sch_netem, see
tools/netdelay/relay.h for what the relay does and does not model) adds the one-way delay D in
each direction. The router's control traffic (registration, heartbeats) crosses the veth without
the relay. tbf's bucket holds 50 us of line rate (at least 16 KB), so a burst larger than that is
serialized at the link rate, as a real NIC would.

For each profile (bandwidth, one-way delay) the cluster is started fresh inside the namespaces,
expertmesh-bench-cluster --attention measures decode tokens/s with concurrent greedy Submits at
each batch size, and the link limit is computed as

    link limit (tokens/s) = link bandwidth (bytes/s) / bytes on the wire per token

where bytes per token = (request + reply bytes of one MoE layer, all shard groups together, from
`expertmesh-bench-dispatch --bytes-only`) x MoE layers. This counts every byte as if it crossed
one link in one direction, so it is a conservative (low) limit for 2 groups on 2 full-duplex
links; the ratio tokens/s / link limit says how much of the wire the cluster uses.

Before the profiles: the relay's own cost at 0 configured delay (netdelay --ping through the
relay against the direct veth path, same bytes), and a loopback run started by the launcher
(in-process engine and cluster without namespaces) for reference.

--micro-batches 1 2 (issue 14, part 5): every profile is measured once per value, each on a
fresh cluster whose attention service runs with that --micro-batches (1 = no overlap), and the
tok/s of each value is printed as a ratio to the first value's at the same batch, all in one
run. Each batch size is measured by its own expertmesh-bench-cluster call, and "step ms" is
the mean wall time of the attention service's steps meanwhile (expertmesh_attention_step_seconds,
prefill steps included): with one micro-batch, step - MoE layers x dispatch mean is the time the
attention service computes per step. --loopback adds a profile without namespaces (every service on 127.0.0.1, no relay, no
tbf) measured the same way.

--split-cpus 0:1 pins the attention service to CPU 0 and the shards (and their relays) to CPU 1,
each with --threads 1: on a 2-core machine, the nearest thing to shards on machines of their own,
so that their compute overlaps the attention service's instead of taking its cores.

Where namespaces cannot be made (not root, no CAP_NET_ADMIN, no `ip`/`tc`), it prints
"SKIP: ..." and exits 0. Namespaces, veths and qdiscs are removed on exit, also on Ctrl-C.

  sudo tools/bench/link_bench.py --build-dir build/cpu --model models/expertmesh-tiny \
      --batches 1 8 32 --decode-tokens 128 --repeat 3
  sudo tools/bench/link_bench.py --profiles 1g:0.5 --batches 1 --decode-tokens 32
  sudo tools/bench/link_bench.py --profiles 1g:0.5 --batches 1 64 --micro-batches 1 2 \
      --loopback --no-baselines
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

SUBNET = "10.213"  # 10.213.<group>.0/24 per shard group
DEFAULT_PROFILES = ["1g:0.1", "1g:0.5", "10g:0.1", "10g:0.5", "25g:0.1", "25g:0.5"]


class Skip(Exception):
    pass


def run(cmd, check=True):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and p.returncode != 0:
        raise RuntimeError("%s: exit %d: %s" % (" ".join(cmd), p.returncode, p.stderr.strip()))
    return p


def parse_profile(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)g:(\d+(?:\.\d+)?)", text.strip().lower())
    if not m:
        raise argparse.ArgumentTypeError(
            "profile '%s' is not <gbit>g:<one-way delay ms>, e.g. 1g:0.5" % text)
    gbit, ms = float(m.group(1)), float(m.group(2))
    if not 0.001 <= gbit <= 100 or not 0 <= ms <= 1000:
        raise argparse.ArgumentTypeError("profile '%s': 0.001-100 gbit, 0-1000 ms" % text)
    return (gbit, ms)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def moe_layers(config):
    first = int(config.get("first_k_dense_replace", 0))
    freq = int(config.get("moe_layer_freq", 1)) or 1
    if not config.get("n_routed_experts"):
        return 0
    return sum(1 for layer in range(first, int(config["num_hidden_layers"]))
               if layer % freq == 0)


def bytes_per_token_per_layer(dispatch_bin, model, shards, batches):
    """{batch: exact-combine request+reply bytes of one MoE layer per token, all groups}."""
    cmd = [dispatch_bin, "--model", model, "--bytes-only", "--shards", str(shards),
           "--batches"] + [str(b) for b in batches]
    out = run(cmd).stdout
    result = {}
    for line in out.splitlines():
        f = line.split()
        # shards batch request partial_resp exact_resp partial_total exact_total (x..)
        if len(f) >= 7 and f[0] == str(shards) and f[1].isdigit():
            result[int(f[1])] = int(f[6])
    missing = [b for b in batches if b not in result]
    if missing:
        raise RuntimeError("no byte counts for batches %s in:\n%s" % (missing, out))
    return result


def parse_bench(out):
    """Rows of expertmesh-bench-cluster: {batch: (in_process tok/s or None, cluster tok/s,
    per-layer dispatch p50/p99 text, mean dispatch ms over MoE layers)}."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(\d+)\s+(-|[\d.]+)\s+([\d.]+)\s*(.*)$", line)
        if m:
            ip = None if m.group(2) == "-" else float(m.group(2))
            lat = m.group(4)
            mean = re.search(r"mean ([\d.]+)", lat)
            quantiles = " ".join(x for x in lat.split("  ") if x.startswith("L"))
            rows[int(m.group(1))] = (ip, float(m.group(3)), quantiles.strip(),
                                     float(mean.group(1)) if mean else float("nan"))
    return rows


def median_rows(runs):
    """Per batch, the run with the median tokens/s (its latencies with it)."""
    out = {}
    for batch in runs[0]:
        ordered = sorted((r[batch] for r in runs), key=lambda row: row[1])
        out[batch] = ordered[len(ordered) // 2]
    return out


class Net:
    """Namespaces + veth pairs + tbf; removes everything it made."""

    def __init__(self, groups, tag):
        self.groups = groups
        self.tag = tag
        self.made_ns = []
        self.made_links = []

    def ns(self, g):
        return "emlb-%s-%d" % (self.tag, g)

    def host_if(self, g):
        return "emlb%sh%d" % (self.tag, g)

    def ns_if(self, g):
        return "emlb%sn%d" % (self.tag, g)

    @staticmethod
    def host_ip(g):
        return "%s.%d.1" % (SUBNET, g)

    @staticmethod
    def ns_ip(g):
        return "%s.%d.2" % (SUBNET, g)

    def create(self):
        routes = run(["ip", "-4", "route", "show"]).stdout
        if (SUBNET + ".") in routes:
            raise RuntimeError("%s.0.0/16 is already routed here; a leftover run? (ip route)"
                               % SUBNET)
        for g in range(self.groups):
            ns, hi, ni = self.ns(g), self.host_if(g), self.ns_if(g)
            run(["ip", "netns", "add", ns])
            self.made_ns.append(ns)
            run(["ip", "link", "add", hi, "type", "veth", "peer", "name", ni])
            self.made_links.append(hi)
            run(["ip", "link", "set", ni, "netns", ns])
            run(["ip", "addr", "add", self.host_ip(g) + "/24", "dev", hi])
            run(["ip", "link", "set", hi, "up"])
            run(["ip", "netns", "exec", ns, "ip", "addr", "add", self.ns_ip(g) + "/24", "dev", ni])
            run(["ip", "netns", "exec", ns, "ip", "link", "set", ni, "up"])
            run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])

    def shape(self, gbit):
        """tbf at `gbit` on both ends of every veth; gbit None removes the limit."""
        burst = 0 if gbit is None else max(16 * 1024, int(gbit * 1e9 / 8 * 50e-6))
        for g in range(self.groups):
            for prefix, dev in ([], self.host_if(g)), (["ip", "netns", "exec", self.ns(g)],
                                                      self.ns_if(g)):
                if gbit is None:
                    run(prefix + ["tc", "qdisc", "del", "dev", dev, "root"], check=False)
                else:
                    run(prefix + ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate",
                                  "%dbit" % int(gbit * 1e9), "burst", str(burst), "latency",
                                  "20ms"])

    def destroy(self):
        for hi in self.made_links:
            run(["tc", "qdisc", "del", "dev", hi, "root"], check=False)
            run(["ip", "link", "del", hi], check=False)  # removes the peer too
        for ns in self.made_ns:
            run(["ip", "netns", "del", ns], check=False)
        made, self.made_links, self.made_ns = self.made_ns, [], []
        listed = run(["ip", "netns", "list"], check=False).stdout.split()
        links = run(["ip", "-o", "link", "show"], check=False).stdout
        return [ns for ns in made if ns in listed] + [
            "link " + self.host_if(g) for g in range(self.groups)
            if (" %s@" % self.host_if(g)) in links or (" %s:" % self.host_if(g)) in links]


class Procs:
    """Processes this script started (by pid), stopped in reverse order."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.procs = []

    def start(self, name, cmd):
        log = open(os.path.join(self.log_dir, name + ".log"), "w")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append((name, p))
        return p

    def check_alive(self):
        for name, p in self.procs:
            if p.poll() is not None:
                raise RuntimeError("%s exited (%s); its log ends with:\n%s" %
                                   (name, p.returncode, self.tail(name)))

    def tail(self, name, n=15):
        try:
            with open(os.path.join(self.log_dir, name + ".log")) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop_all(self):
        for _, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []


def wait_tcp(host, port, procs, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        procs.check_alive()
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on %s:%d after %ds" % (host, port, timeout))


def relay_cost(args, net, log_dir, bytes_list):
    """netdelay --ping from the root ns to an echo server in group 0's namespace, directly and
    through a relay at 0 delay (and at 0.1 ms), no bandwidth limit."""
    procs = Procs(log_dir)
    ns = net.ns(0)
    out = []
    try:
        procs.start("echo", ["ip", "netns", "exec", ns, args.netdelay, "--echo", "0.0.0.0:7101"])
        for delay, port in ((0, 7102), (100, 7103)):
            procs.start("relay%d" % delay,
                        ["ip", "netns", "exec", ns, args.netdelay, "--listen",
                         "%s:%d" % (net.ns_ip(0), port), "--connect", "127.0.0.1:7101",
                         "--delay-us", str(delay)])
        for port in (7101, 7102, 7103):
            wait_tcp(net.ns_ip(0), port, procs)
        for nbytes in bytes_list:
            for label, port in (("direct veth", 7101), ("relay, 0 us", 7102),
                                ("relay, 100 us", 7103)):
                p = run([args.netdelay, "--ping", "%s:%d" % (net.ns_ip(0), port), "--bytes",
                         str(nbytes), "--count", "2000", "--warmup", "200"])
                m = dict(kv.split("=") for kv in p.stdout.split()[1:])
                out.append((nbytes, label, float(m["p50"]), float(m["p99"])))
    finally:
        procs.stop_all()
    return out


def pinned(args, which, cmd):
    """cmd under `taskset -c CPUS` with --threads = that CPU count when --split-cpus is given
    (which: 0 = the attention service, 1 = the shards and their relays); cmd[0] is the binary."""
    if not args.split_cpus:
        return cmd
    cpus = args.split_cpus[which]
    count = sum(int(b) - int(a) + 1 if "-" in r else 1
                for r in cpus.split(",") for a, _, b in [r.partition("-")])
    threads = ["--threads", str(count)] if cmd[0] != args.netdelay else []
    return ["taskset", "-c", cpus] + cmd + threads


def start_cluster(args, net, procs, delay_ms, max_batch, micro_batches=1, loopback=False):
    """delay_ms None: no relay, the expert service listens on its veth address itself.
    loopback: every service in the root namespace on 127.0.0.1 (no veth, relay or tbf)."""
    rport, rmport = free_port(), free_port()
    aport, amport = free_port(), free_port()
    procs.start("router", [args.router_bin, "--model", args.model, "--num-shards",
                           str(args.shards), "--listen", "0.0.0.0:%d" % rport,
                           "--metrics-port", str(rmport), "--no-rebalance"])
    wait_tcp("127.0.0.1", rport, procs)
    for g in range(args.shards if loopback else 0):
        procs.start("expert%d" % g, pinned(args, 1, [
            args.expert_bin, "--model", args.model, "--shard-id", str(g), "--num-shards",
            str(args.shards), "--listen", "127.0.0.1:%d" % free_port(), "--router",
            "127.0.0.1:%d" % rport, "--metrics-port", str(free_port()), "--instance-id",
            "shard%d-r0" % g]))
    for g in range(0 if loopback else args.shards):
        ns = net.ns(g)
        sport, mport, pport = 7201, 7202, 7203  # each namespace has its own ports
        dport, qport = 7204, 7205  # the data plane: the shard's, the relay's
        listen = "127.0.0.1:%d" % sport
        data_listen = "127.0.0.1:%d" % dport
        if delay_ms is None:
            listen = "%s:%d" % (net.ns_ip(g), pport)
            data_listen = "%s:%d" % (net.ns_ip(g), qport)
        else:
            for name, front, back in (("relay%d" % g, pport, listen),
                                      ("datarelay%d" % g, qport, data_listen)):
                procs.start(name, ["ip", "netns", "exec", ns] + pinned(args, 1, [
                    args.netdelay, "--listen", "%s:%d" % (net.ns_ip(g), front), "--connect",
                    back, "--delay-us", str(int(round(delay_ms * 1000)))]))
        procs.start("expert%d" % g, ["ip", "netns", "exec", ns] + pinned(args, 1, [
            args.expert_bin, "--model", args.model, "--shard-id", str(g), "--num-shards",
            str(args.shards), "--listen", listen, "--advertise", "%s:%d" % (net.ns_ip(g), pport),
            "--data-listen", data_listen, "--data-advertise", "%s:%d" % (net.ns_ip(g), qport),
            "--router", "%s:%d" % (net.host_ip(g), rport), "--metrics-port", str(mport),
            "--instance-id", "shard%d-r0" % g]))
    procs.start("attention", pinned(args, 0, [
        args.attention_bin, "--model", args.model, "--router", "127.0.0.1:%d" % rport,
        "--listen", "127.0.0.1:%d" % aport, "--metrics-port", str(amport), "--kv-blocks", "4096",
        "--max-batch", str(max_batch), "--step-deadline-ms", "30000", "--attempt-timeout-ms",
        "30000", "--combine", "exact", "--micro-batches", str(micro_batches), "--data-plane",
        args.data_plane]))
    return "127.0.0.1:%d" % aport, "127.0.0.1:%d" % amport


def step_seconds(metrics_addr):
    """(sum, count) of the attention service's expertmesh_attention_step_seconds."""
    end = time.time() + 120  # the service may still be loading
    while True:
        try:
            with urllib.request.urlopen("http://%s/metrics" % metrics_addr, timeout=10) as r:
                text = r.read().decode()
            break
        except OSError:
            if time.time() > end:
                raise
            time.sleep(0.2)
    vals = {}
    for line in text.splitlines():
        for key in ("sum", "count"):
            name = "expertmesh_attention_step_seconds_" + key + " "
            if line.startswith(name):
                vals[key] = float(line[len(name):])
    return vals.get("sum", 0.0), vals.get("count", 0.0)


def bench_steps(args, attention, metrics):
    """bench() one batch size at a time against a running cluster; each row gets the mean
    wall time of the attention service's steps during that batch size (ms; prefill included)."""
    rows = {}
    for b in args.batches:
        s0, c0 = step_seconds(metrics)
        row = bench(args, ["--attention", attention, "--attention-metrics", metrics,
                           "--skip-in-process"], [b])[b]
        s1, c1 = step_seconds(metrics)
        rows[b] = row + (1e3 * (s1 - s0) / (c1 - c0) if c1 > c0 else float("nan"),)
    return rows


def bench(args, extra, batches=None):
    batches = batches or args.batches
    cmd = [args.bench_bin, "--model", args.model, "--shards", str(args.shards),
           "--decode-tokens", str(args.decode_tokens), "--prompt-len", str(args.prompt_len),
           "--batches"] + [str(b) for b in batches] + extra
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError("%s failed (%d):\n%s%s" % (" ".join(cmd), p.returncode, p.stdout,
                                                      p.stderr[-3000:]))
    rows = parse_bench(p.stdout)
    if sorted(rows) != sorted(batches) or any(r[1] <= 0 for r in rows.values()):
        raise RuntimeError("unexpected benchmark output:\n" + p.stdout)
    return rows


def preflight(args):
    if os.geteuid() != 0:
        raise Skip("cannot create network namespaces: not root (needs CAP_NET_ADMIN)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise Skip("cannot create network namespaces: no `%s` on PATH" % tool)
    probe = "emlb-probe-%d" % os.getpid()
    p = run(["ip", "netns", "add", probe], check=False)
    if p.returncode != 0:
        raise Skip("cannot create network namespaces: %s" % p.stderr.strip())
    run(["ip", "netns", "del", probe], check=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--build-dir", default="build/cpu", help="CMake build tree with the services")
    ap.add_argument("--model", default="models/expertmesh-tiny", help="checkpoint directory")
    ap.add_argument("--shards", type=int, default=2, help="shard groups (one namespace each)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32],
                    help="concurrent sequences")
    ap.add_argument("--decode-tokens", type=int, default=64, help="decode steps per sequence")
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per sequence")
    ap.add_argument("--profiles", type=parse_profile, nargs="+",
                    default=[parse_profile(p) for p in DEFAULT_PROFILES],
                    help="<gbit>g:<one-way delay ms> (default: %s)" % " ".join(DEFAULT_PROFILES))
    ap.add_argument("--repeat", type=int, default=1,
                    help="measurements per profile (same cluster); the median tok/s is shown")
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[1],
                    help="attention-service --micro-batches values, each measured on every "
                    "profile; ratios against the first")
    ap.add_argument("--data-plane", choices=["auto", "grpc"], default="auto",
                    help="attention-service --data-plane: auto (the shards' framed TCP data "
                    "plane, through its own relay) or grpc (their Compute streams)")
    ap.add_argument("--split-cpus", metavar="ATT:SHARDS", type=lambda v: v.split(":"),
                    help="pin the attention service to CPUs ATT and the shards (and their relays) "
                    "to CPUs SHARDS (taskset lists, e.g. 0:1), each with --threads = its CPU "
                    "count: shards that do not share cores with the attention service, as on "
                    "separate machines")
    ap.add_argument("--loopback", action="store_true",
                    help="also measure every --micro-batches value on a cluster without "
                    "namespaces (127.0.0.1)")
    ap.add_argument("--no-baselines", action="store_true",
                    help="skip the relay-cost and loopback/unlimited-veth reference runs")
    ap.add_argument("--json", help="also write the results here as JSON")
    ap.add_argument("--keep-logs", action="store_true",
                    help="keep the services' logs after a successful run (kept on failure)")
    args = ap.parse_args()
    if not 1 <= args.repeat <= 20:
        ap.error("--repeat must be in [1, 20]")
    if any(not 1 <= m <= 8 for m in args.micro_batches):
        ap.error("--micro-batches values must be in [1, 8]")
    if not 1 <= args.shards <= 200:
        ap.error("--shards must be in [1, 200]")
    if any(b < 1 or b > 4096 for b in args.batches) or not 1 <= args.decode_tokens <= 100000:
        ap.error("--batches must be in [1, 4096] and --decode-tokens in [1, 100000]")
    b = args.build_dir
    args.router_bin = os.path.join(b, "router", "router-service")
    args.expert_bin = os.path.join(b, "expert-service", "expert-service")
    args.attention_bin = os.path.join(b, "attention-service", "attention-service")
    args.bench_bin = os.path.join(b, "tools", "bench", "expertmesh-bench-cluster")
    args.dispatch_bin = os.path.join(b, "tools", "bench", "expertmesh-bench-dispatch")
    args.netdelay = os.path.join(b, "tools", "netdelay", "netdelay")
    if args.split_cpus and (len(args.split_cpus) != 2 or not all(re.fullmatch(
            r"\d+(-\d+)?(,\d+(-\d+)?)*", c) for c in args.split_cpus)):
        ap.error("--split-cpus takes ATT:SHARDS, two CPU lists such as 0:1 or 0-3:4-7")
    for path in (args.router_bin, args.expert_bin, args.attention_bin, args.bench_bin,
                 args.dispatch_bin, args.netdelay):
        if not os.access(path, os.X_OK):
            sys.exit("error: no executable %s (build it, or set --build-dir)" % path)
    args.model = os.path.abspath(args.model)
    cfg_path = os.path.join(args.model, "config.json")
    if not os.path.isfile(cfg_path):
        sys.exit("error: no config.json in %s" % args.model)
    with open(cfg_path) as f:
        config = json.load(f)
    layers = moe_layers(config)
    if layers == 0:
        sys.exit("error: %s has no MoE layers" % args.model)

    try:
        preflight(args)
    except Skip as e:
        print("SKIP: %s" % e)
        return 0

    # Ctrl-C / SIGTERM: unwind through the finally blocks below.
    def on_signal(signum, _frame):
        raise KeyboardInterrupt("signal %d" % signum)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)  # also where SIGINT came in ignored (background job)

    per_layer = bytes_per_token_per_layer(args.dispatch_bin, args.model, args.shards,
                                          args.batches)
    print("model %s: %d MoE layers; exact-combine bytes per token per layer (request + reply, "
          "all groups): %s" % (args.model, layers,
                               ", ".join("batch %d: %d" % kv for kv in sorted(per_layer.items()))))
    tag = "%d" % (os.getpid() % 100000)
    net = Net(args.shards, tag)
    log_root = tempfile.mkdtemp(prefix="expertmesh-linkbench-")
    results = {"model": args.model, "moe_layers": layers, "bytes_per_token_per_layer": per_layer,
               "relay_cost": [], "loopback": {}, "profiles": []}
    t0 = time.time()
    try:
        net.create()
        if not args.no_baselines:
            rc = relay_cost(args, net, log_root, [1024, 16384])
            results["relay_cost"] = rc
            print("\nrelay cost (netdelay --ping, root ns -> group 0's ns, no tbf; us)")
            print("%-7s %-15s %8s %8s" % ("bytes", "path", "rtt p50", "rtt p99"))
            for nbytes, label, p50, p99 in rc:
                print("%-7d %-15s %8.1f %8.1f" % (nbytes, label, p50, p99))
            # the launcher's loopback cluster + in-process engine
            rows = bench(args, ["--data-plane", args.data_plane])
            results["loopback"] = rows
            print("\nloopback (launcher, no namespaces):")
            for batch in args.batches:
                ip, cl, lat, mean = rows[batch]
                print("  batch %-4d in-process %8.1f tok/s  cluster %8.1f tok/s (%.2fx)  "
                      "dispatch mean %.2f ms  %s" % (batch, ip, cl, cl / ip, mean, lat))
        # (gbit, delay): gbit None = unshaped veth; "loopback" = no namespaces at all.
        profiles = ((["loopback"] if args.loopback else []) +
                    ([(None, 0.0)] if not args.no_baselines else []) + list(args.profiles))
        multi = len(args.micro_batches) > 1
        print("\n%-22s %-3s %-6s %-10s %-11s %-8s %-8s %-8s %-9s %s" % (
            "profile", "mb", "batch", "tok/s", "link limit", "ratio",
            "vs mb%d" % args.micro_batches[0] if multi else "", "step ms", "disp. ms",
            "dispatch p50/p99 ms per MoE layer (per micro-batch)"))
        for profile in profiles:
            loopback = profile == "loopback"
            gbit, delay_ms = (None, 0.0) if loopback else profile
            if not loopback:
                net.shape(gbit)
            name = ("loopback, no namespaces" if loopback else "veth, no tbf, no relay"
                    if gbit is None else "%g GbE, %g ms one-way" % (gbit, delay_ms))
            first = {}  # batch -> tok/s of the first --micro-batches value
            for mb in args.micro_batches:
                log_dir = os.path.join(log_root, re.sub(r"[^a-z0-9.]+", "_", name.lower()) +
                                       "_mb%d" % mb)
                os.makedirs(log_dir)
                procs = Procs(log_dir)
                try:
                    attention, metrics = start_cluster(args, net, procs,
                                                       None if gbit is None else delay_ms,
                                                       max(args.batches), mb, loopback)
                    runs = []
                    for _ in range(args.repeat):
                        runs.append(bench_steps(args, attention, metrics))
                        procs.check_alive()
                    rows = median_rows(runs)
                except Exception:
                    print("logs in %s" % log_dir, file=sys.stderr)
                    raise
                finally:
                    procs.stop_all()
                for batch in args.batches:
                    _, tok_s, lat, mean, step_ms = rows[batch]
                    first.setdefault(batch, tok_s)
                    vs = "%.2fx" % (tok_s / first[batch]) if multi else ""
                    entry = {"profile": name, "gbit": gbit, "delay_ms": delay_ms,
                             "micro_batches": mb, "batch": batch, "tok_s": tok_s,
                             "vs_first_micro_batches": tok_s / first[batch],
                             "dispatch_mean_ms": mean, "step_mean_ms": step_ms,
                             "dispatch": lat}
                    if gbit is not None:
                        limit = gbit * 1e9 / 8 / (per_layer[batch] * layers)
                        entry["link_limit_tok_s"] = limit
                        entry["ratio"] = tok_s / limit
                        print("%-22s %-3d %-6d %-10.1f %-11.0f %-8.4f %-8s %-8.2f %-9.2f %s" %
                              (name, mb, batch, tok_s, limit, tok_s / limit, vs, step_ms, mean,
                               lat))
                    else:
                        print("%-22s %-3d %-6d %-10.1f %-11s %-8s %-8s %-8.2f %-9.2f %s" %
                              (name, mb, batch, tok_s, "-", "-", vs, step_ms, mean, lat))
                    sys.stdout.flush()
                    results["profiles"].append(entry)
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        left = net.destroy()
        if left:
            print("error: could not remove %s" % ", ".join(left), file=sys.stderr)
            sys.exit(1)
    print("\n%d profiles in %.0f s%s" % (len(results["profiles"]) // len(args.batches) //
                                        len(args.micro_batches),
                                        time.time() - t0,
                                        "; logs in " + log_root if args.keep_logs else ""))
    if not args.keep_logs:
        shutil.rmtree(log_root, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
