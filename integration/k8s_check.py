#!/usr/bin/env python3
"""Offline checks of k8s/ for t_k8s.sh beyond the schemas: the kustomization lists every
manifest, every name a manifest refers to is defined (Secrets, ServiceAccounts, classes,
claims, the driver), no secret is in clear, and every StorageClass/PV mount option is a
flag `aquifer mount` takes.

    k8s_check.py K8S_DIR AQUIFER_BINARY
"""
import glob
import os
import re
import subprocess
import sys

import yaml

k8s, aquifer = sys.argv[1], sys.argv[2]
problems = []


def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


manifests = sorted(p for p in glob.glob(os.path.join(k8s, "*.yaml")) if not p.endswith("kustomization.yaml"))
examples = sorted(glob.glob(os.path.join(k8s, "examples", "*.yaml")))
kust = docs(os.path.join(k8s, "kustomization.yaml"))[0]
listed = set(kust.get("resources", []))
for p in manifests:
    if os.path.basename(p) not in listed:
        problems.append(f"{os.path.basename(p)} is not in kustomization.yaml")
for r in listed:
    if not os.path.exists(os.path.join(k8s, r)):
        problems.append(f"kustomization.yaml lists {r}, which does not exist")

objs = [(p, d) for p in manifests + examples for d in docs(p)]
defined = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for _, d in objs}
installed = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]) for p, d in objs if p in manifests}


def need(kind, ns, name, where, pool=defined):
    if (kind, ns, name) not in pool:
        problems.append(f"{where}: {kind} {ns + '/' if ns else ''}{name} is not defined")


drivers = {d["metadata"]["name"] for _, d in objs if d["kind"] == "CSIDriver"}
if len(drivers) != 1:
    problems.append(f"CSIDrivers: {drivers}")
driver = next(iter(drivers), "")
mount_flags = set(re.findall(r"--([a-z][a-z-]+)", subprocess.run([aquifer, "mount", "--help"], capture_output=True, text=True).stdout))
if "upload-limit" not in mount_flags:
    problems.append("cannot read the flags of aquifer mount")


def check_options(opts, where):
    for o in opts or []:
        flag = o.split("=", 1)[0].lstrip("-")
        if flag not in mount_flags:
            problems.append(f"{where}: mount option {o!r} is not an aquifer mount flag")


for path, d in objs:
    kind, meta = d["kind"], d["metadata"]
    where = f"{os.path.relpath(path, k8s)} {kind}/{meta['name']}"
    ns = meta.get("namespace", "")
    example = path in examples
    if kind in ("Secret",) and example:
        problems.append(f"{where}: examples must not carry Secrets")
    if kind == "Secret":
        values = {**d.get("stringData", {}), **d.get("data", {})}
        for key in ("secret-key", "access-key"):
            if key in values and "REPLACE" not in values[key]:
                problems.append(f"{where}: {key} holds a value, not a placeholder")
        m = re.match(r"^[a-z]+://(?:[^:@/]*:([^@]*)@)?", values.get("metaurl", ""))
        if m and m.group(1) and "REPLACE" not in m.group(1):
            problems.append(f"{where}: metaurl holds a password, not a placeholder")
    text = yaml.safe_dump(d)
    if kind != "Secret" and re.search(r"(?i)(secret-key|password)\s*[:=]\s*\S", text.replace("secret-name", "").replace("secret-namespace", "")):
        problems.append(f"{where}: looks like a secret in clear")
    if kind == "StorageClass":
        if d["provisioner"] != driver:
            problems.append(f"{where}: provisioner {d['provisioner']} is not the driver {driver}")
        params = d.get("parameters", {})
        for role in ("provisioner", "node-publish"):
            name = params.get(f"csi.storage.k8s.io/{role}-secret-name")
            sns = params.get(f"csi.storage.k8s.io/{role}-secret-namespace")
            if not name:
                problems.append(f"{where}: no {role} secret")
            else:
                need("Secret", sns, name, where, installed)
        check_options(d.get("mountOptions"), where)
    if kind == "PersistentVolume":
        csi = d["spec"]["csi"]
        if csi["driver"] != driver:
            problems.append(f"{where}: driver {csi['driver']}")
        ref = csi.get("nodePublishSecretRef")
        if not ref:
            problems.append(f"{where}: no nodePublishSecretRef")
        else:
            need("Secret", ref["namespace"], ref["name"], where, installed)
        check_options(d["spec"].get("mountOptions"), where)
    if kind == "PersistentVolumeClaim":
        sc = d["spec"].get("storageClassName")
        if sc:
            need("StorageClass", "", sc, where, installed)
        elif d["spec"].get("volumeName"):
            need("PersistentVolume", "", d["spec"]["volumeName"], where)
    spec = d.get("spec", {}).get("template", {}).get("spec") if kind in ("Deployment", "DaemonSet", "Job") else None
    if spec:
        sa = spec.get("serviceAccountName")
        if sa:
            need("ServiceAccount", ns, sa, where)
        for v in spec.get("volumes", []):
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim:
                need("PersistentVolumeClaim", ns, claim, where)
        for c in spec.get("containers", []):
            for a in c.get("args", []):
                if a.startswith("--kubelet-registration-path=") and f"/plugins/{driver}/" not in a:
                    problems.append(f"{where}: registration path {a} does not name {driver}")
    if kind in ("RoleBinding", "ClusterRoleBinding"):
        for s in d["subjects"]:
            need("ServiceAccount", s["namespace"], s["name"], where)
        rk = d["roleRef"]["kind"]
        need(rk, ns if rk == "Role" else "", d["roleRef"]["name"], where)

for p in problems:
    print(f"FAIL: {p}")
sys.exit(1 if problems else 0)
