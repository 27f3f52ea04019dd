#!/usr/bin/env python3
"""Renders every k8s/ overlay (alone and with its optional components) with
`kubectl kustomize`, validates the core kinds strictly with kubernetes-validate, and
checks the deployment policy: probes, requests + limits, non-root, read-only root,
no capabilities, seccomp, no service-account token, drain-matched grace periods, a
PDB per Deployment, an autoscaler and topology spread per shard group, shard groups
that agree with the router, flags each binary really accepts and metric names the
services really export. The policy checks are also run on broken copies, which they
must reject (so they cannot pass vacuously).

usage: manifests_test.py REPO_ROOT BUILD_DIR  (exit 77 = skipped: no kubectl)
"""
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

import yaml
import kubernetes_validate

ROOT = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else None
BUILD = os.path.abspath(sys.argv[2]) if len(sys.argv) > 2 else None
K8S_VERSION = "1.37.0"  # the newest schema kubernetes-validate==1.37.0 has
KUBECTL = shutil.which("kubectl")
OVERLAYS = ["cpu-tiny", "consumer-gpu", "deepseek-v3"]
# Kinds with no schema in kubernetes-validate (CRDs): checked for shape only.
CRD_KINDS = {"ScaledObject", "Certificate", "Issuer", "PrometheusRule", "PodMonitor"}
BINARIES = {
    "router-service": "router/router-service",
    "expert-service": "expert-service/expert-service",
    "attention-service": "attention-service/attention-service",
    "gateway": "gateway/gateway",
    "expertmesh": "tools/cli/expertmesh",
}
HEALTH_SERVICE = {
    "router-service": "expertmesh.v1.RouterService",
    "expert-service": "expertmesh.v1.ExpertService",
    "attention-service": "expertmesh.v1.AttentionService",
    "gateway": "expertmesh.v1.Gateway",
}


def render(path_or_yaml):
    """kubectl kustomize of a directory; or of a kustomization text (written to a
    scratch overlay inside k8s/overlays, so relative paths resolve as in a real one)."""
    if os.path.isdir(path_or_yaml):
        out = subprocess.run([KUBECTL, "kustomize", path_or_yaml], capture_output=True,
                             text=True, timeout=120)
    else:
        scratch = tempfile.mkdtemp(prefix=".test-", dir=os.path.join(ROOT, "k8s", "overlays"))
        try:
            with open(os.path.join(scratch, "kustomization.yaml"), "w") as f:
                f.write(path_or_yaml)
            out = subprocess.run([KUBECTL, "kustomize", scratch], capture_output=True,
                                 text=True, timeout=120)
        finally:
            shutil.rmtree(scratch)
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize failed: {out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def variants():
    """(name, docs) of every overlay, plus each with KEDA and with mTLS + cert-manager."""
    for o in OVERLAYS:
        yield o, render(os.path.join(ROOT, "k8s", "overlays", o))
        # The KEDA component sits beside the overlay's shard groups (base's for cpu-tiny).
        keda = f"../{o}/keda" if os.path.isdir(os.path.join(ROOT, "k8s", "overlays", o, "keda")) \
            else "../../base/keda"
        yield f"{o}+keda", render(f"resources: [../{o}]\ncomponents: [{keda}]\n")
        yield f"{o}+mtls+cert-manager", render(
            f"resources: [../{o}]\n"
            "components: [../../components/mtls, ../../components/cert-manager]\n")


def pod_spec(d):
    return d["spec"]["template"]["spec"]


def flag_value(args, name):
    for a in args:
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def configmap_env(docs, ns):
    env = {}
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("expertmesh"):
            env.update(d.get("data", {}))
    return env


def policy_violations(docs):
    """Every broken rule of the deployment policy, as readable strings."""
    bad = []
    deps = [d for d in docs if d["kind"] == "Deployment"]
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    hpas = {d["spec"]["scaleTargetRef"]["name"] for d in docs
            if d["kind"] == "HorizontalPodAutoscaler"}
    keda = {d["spec"]["scaleTargetRef"]["name"] for d in docs if d["kind"] == "ScaledObject"}
    cm = configmap_env(docs, None)
    shard_ids, shard_counts = [], set()
    for d in deps:
        name = d["metadata"]["name"]
        spec = pod_spec(d)
        labels = d["spec"]["template"]["metadata"].get("labels", {})
        if spec.get("automountServiceAccountToken") is not False:
            bad.append(f"{name}: automountServiceAccountToken is not false")
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True or psc.get("runAsUser", 0) == 0:
            bad.append(f"{name}: not runAsNonRoot with a non-zero runAsUser")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            bad.append(f"{name}: seccompProfile is not RuntimeDefault")
        if not any(p["spec"]["selector"].get("matchLabels", {}).items() <= labels.items()
                   for p in pdbs):
            bad.append(f"{name}: no PodDisruptionBudget selects its pods")
        for c in spec["containers"]:
            where = f"{name}/{c['name']}"
            binary = c.get("command", [None])[0]
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                if probe not in c:
                    bad.append(f"{where}: no {probe}")
            ready = c.get("readinessProbe", {}).get("grpc")
            if not ready or ready.get("service") != HEALTH_SERVICE.get(binary):
                bad.append(f"{where}: readinessProbe is not grpc.health.v1 on "
                           f"{HEALTH_SERVICE.get(binary)}")
            if "grpc" not in c.get("startupProbe", {}):
                bad.append(f"{where}: startupProbe is not grpc.health.v1")
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(kind, {}):
                        bad.append(f"{where}: no {kind}.{r}")
            sc = c.get("securityContext", {})
            if sc.get("readOnlyRootFilesystem") is not True:
                bad.append(f"{where}: root filesystem not read-only")
            if sc.get("allowPrivilegeEscalation") is not False:
                bad.append(f"{where}: allowPrivilegeEscalation not false")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                bad.append(f"{where}: capabilities not dropped (drop: [ALL])")
            args = c.get("args", [])
            # The grace period covers the preStop pause plus the service's own drain.
            grace = spec.get("terminationGracePeriodSeconds", 30)
            pause = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
            drain = int(flag_value(args, "--drain-grace-s") or 0)
            if binary in ("attention-service", "gateway"):
                if pause == 0:
                    bad.append(f"{where}: behind a Service but no preStop sleep")
                if drain == 0:
                    bad.append(f"{where}: no --drain-grace-s")
            if grace < pause + drain + 5:
                bad.append(f"{where}: terminationGracePeriodSeconds {grace} < preStop {pause} "
                           f"+ drain {drain} + 5")
            if binary == "expert-service":
                if name not in hpas and name not in keda:
                    bad.append(f"{name}: shard group without an autoscaler")
                group = labels.get("expertmesh.io/shard-group")
                spread = [t for t in spec.get("topologySpreadConstraints", [])
                          if t["labelSelector"]["matchLabels"].get("expertmesh.io/shard-group")
                          == group]
                if group is None or not spread:
                    bad.append(f"{name}: no topology spread over its shard group's replicas")
                shard_ids.append(int(flag_value(args, "--shard-id")))
                shard_counts.add(int(flag_value(args, "--num-shards")))
                # The framed TCP data plane is plaintext: off under mTLS; else on a declared
                # container port that the shards' NetworkPolicy admits.
                data = flag_value(args, "--data-listen")
                envs = {e["name"]: e.get("value") for e in c.get("env", [])}
                if data == "$(EXPERTMESH_DATA_LISTEN)":
                    data = envs.get("EXPERTMESH_DATA_LISTEN")
                tls = flag_value(args, "--tls-cert") is not None
                if tls and data != "off":
                    bad.append(f"{where}: mTLS with the plaintext data plane on ({data})")
                if not tls:
                    port = int(data.rsplit(":", 1)[1]) if data and ":" in data else None
                    declared = {p["containerPort"] for p in c.get("ports", [])}
                    if port is None or port not in declared:
                        bad.append(f"{where}: data plane {data} not on a declared container port")
                    elif not any(
                            r.get("port", 0) <= port <= r.get("endPort", r.get("port", 0))
                            for np in docs if np["kind"] == "NetworkPolicy"
                            and np["spec"]["podSelector"].get("matchLabels", {}).items()
                            <= labels.items()
                            for rule in np["spec"].get("ingress", [])
                            for r in rule.get("ports", [])):
                        bad.append(f"{where}: no NetworkPolicy admits data port {port}")
            if binary == "router-service":
                n = flag_value(args, "--num-shards")
                n = cm.get("EXPERTMESH_NUM_SHARDS") if n == "$(EXPERTMESH_NUM_SHARDS)" else n
                shard_counts.add(int(n))
    if shard_ids and sorted(shard_ids) != list(range(len(shard_ids))):
        bad.append(f"shard groups {sorted(shard_ids)} are not 0..N-1 once each")
    if shard_ids and shard_counts != {len(shard_ids)}:
        bad.append(f"router and shards disagree on the number of shard groups: "
                   f"{sorted(shard_counts)} vs {len(shard_ids)} Deployments")
    return bad


class Manifests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.rendered = dict(variants())

    def test_core_kinds_validate_strictly(self):
        for name, docs in self.rendered.items():
            for d in docs:
                what = f"{name}: {d['kind']}/{d['metadata']['name']}"
                if d["kind"] in CRD_KINDS:
                    self.assertIn("spec", d, what)
                    continue
                try:
                    kubernetes_validate.validate(d, K8S_VERSION, strict=True)
                except kubernetes_validate.ValidationError as e:
                    self.fail(f"{what}: {e.message} at {list(e.path)}")

    def test_policy(self):
        for name, docs in self.rendered.items():
            self.assertEqual(policy_violations(docs), [], name)

    def test_policy_rejects_broken_manifests(self):
        docs = self.rendered["cpu-tiny"]

        def broken(edit):
            copy_ = copy.deepcopy(docs)
            edit(copy_)
            return policy_violations(copy_)

        def shard(ds, k=0):
            return next(d for d in ds if d["metadata"]["name"] == f"expert-shard-{k}"
                        and d["kind"] == "Deployment")

        def container(d):
            return pod_spec(d)["containers"][0]

        cases = {
            "no livenessProbe": lambda ds: container(shard(ds)).pop("livenessProbe"),
            "no limits.memory": lambda ds: container(shard(ds))["resources"]["limits"].pop(
                "memory"),
            "not runAsNonRoot": lambda ds: pod_spec(shard(ds))["securityContext"].pop(
                "runAsNonRoot"),
            "root filesystem not read-only": lambda ds: container(shard(ds))[
                "securityContext"].update(readOnlyRootFilesystem=False),
            "no PodDisruptionBudget": lambda ds: ds.remove(next(
                d for d in ds if d["kind"] == "PodDisruptionBudget"
                and d["metadata"]["name"] == "gateway")),
            "without an autoscaler": lambda ds: ds.remove(next(
                d for d in ds if d["kind"] == "HorizontalPodAutoscaler"
                and d["metadata"]["name"] == "expert-shard-1")),
            "disagree on the number": lambda ds: [d for d in ds if d["kind"] == "ConfigMap"][0][
                "data"].update(EXPERTMESH_NUM_SHARDS="3"),
            "terminationGracePeriodSeconds": lambda ds: pod_spec(next(
                d for d in ds if d["metadata"]["name"] == "gateway"
                and d["kind"] == "Deployment")).update(terminationGracePeriodSeconds=10),
        }
        for expected, edit in cases.items():
            found = broken(edit)
            self.assertTrue(any(expected in v for v in found), f"{expected}: {found}")

    def test_flags_are_accepted_by_the_binaries(self):
        helps = {}
        for binary, rel in BINARIES.items():
            path = os.path.join(BUILD, rel)
            if not os.access(path, os.X_OK):
                self.skipTest(f"{path} not built")
            helps[binary] = subprocess.run([path, "--help"], capture_output=True, text=True,
                                           timeout=30).stdout
        for name, docs in self.rendered.items():
            for d in docs:
                if d["kind"] != "Deployment":
                    continue
                for c in pod_spec(d)["containers"]:
                    binary = c["command"][0]
                    self.assertIn(binary, helps, f"{name}: unknown binary {binary}")
                    for a in c.get("args", []):
                        flag = a.split("=", 1)[0]
                        self.assertTrue(
                            re.search(rf"(^|[\s,]){re.escape(flag)}\b", helps[binary]),
                            f"{name}: `{binary} --help` has no {flag}")

    def test_metric_names_exist(self):
        exported = set()
        for top in ("router", "expert-service", "attention-service", "gateway", "dispatcher",
                    "service-common", "core"):
            for base, _, files in os.walk(os.path.join(ROOT, top)):
                for f in files:
                    if f.endswith((".cc", ".h")):
                        with open(os.path.join(base, f), encoding="utf-8") as fh:
                            exported |= set(re.findall(r'"(expertmesh_[a-z0-9_]+)"', fh.read()))
        used = set()
        for base, _, files in os.walk(os.path.join(ROOT, "k8s")):
            for f in files:
                with open(os.path.join(base, f), encoding="utf-8") as fh:
                    used |= set(re.findall(r"\b(expertmesh_[a-z0-9_]+)", fh.read()))
        # Served by the adapter under a new name (prometheus-adapter-rules.yaml `as:`).
        derived = {"expertmesh_expert_rows_per_second"}
        for m in sorted(used - derived):
            plain = re.sub(r"_(bucket|count|sum)$", "", m)
            self.assertTrue(m in exported or plain in exported, f"k8s/ uses unknown metric {m}")

    def test_generated_shard_groups_are_current(self):
        for d in ["base"] + [f"overlays/{o}" for o in OVERLAYS]:
            path = os.path.join(ROOT, "k8s", d, "shard-groups.yaml")
            if not os.path.exists(path):
                continue  # the overlay takes base's
            with open(path) as f:
                cmd = re.match(r"# Generated by `([^`]+)`", f.readline()).group(1).split()
            out = subprocess.run([sys.executable, os.path.join(ROOT, cmd[0])] + cmd[1:] +
                                 ["--check"], cwd=ROOT, capture_output=True, text=True)
            self.assertEqual(out.returncode, 0, f"k8s/{d}: {out.stderr}")

    def test_deepseek_memory_formula(self):
        # bytes per expert: gate, up, down projections of 7168 x 2048 FP8 + float32 scales
        # per 128 x 128 block; 58 MoE layers (61 - 3 dense) x 256 experts over the groups.
        per_expert = 3 * 7168 * 2048 + 3 * (7168 // 128) * (2048 // 128) * 4
        self.assertEqual(per_expert, 44_050_944)
        docs = self.rendered["deepseek-v3"]
        shards = [d for d in docs if d["kind"] == "Deployment"
                  and d["metadata"]["name"].startswith("expert-shard-")]
        experts = 58 * 256 // len(shards)
        need_gib = experts * per_expert / 2**30 + 2  # + 2 GiB overhead
        for d in shards:
            mem = pod_spec(d)["containers"][0]["resources"]["requests"]["memory"]
            self.assertTrue(mem.endswith("Gi"), mem)
            self.assertGreaterEqual(int(mem[:-2]), need_gib, d["metadata"]["name"])
            self.assertLess(int(mem[:-2]), need_gib + 1, d["metadata"]["name"])


if __name__ == "__main__":
    if not ROOT or not BUILD:
        sys.exit(__doc__)
    if not KUBECTL:
        print("SKIP: kubectl is not on the PATH (Debian has no package for it; install it to "
              "render the k8s/ overlays)")
        sys.exit(77)
    unittest.main(argv=[sys.argv[0], "-v"])
