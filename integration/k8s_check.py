#!/usr/bin/env python3
"""Offline checks of k8s/ for t_k8s.sh beyond the schemas: the kustomization lists every
manifest, every name a manifest refers to is defined (Secrets, ServiceAccounts, classes,
claims, the driver, Secret keys in env), no secret is in clear, and every StorageClass/PV
mount option is a flag `aquifer mount` takes. Fluid objects (examples/fluid.yaml, no schemas
here): the runtime names the profile and the Dataset, the DataLoad the Dataset, options are
mount flags, encrypt options are the ones `aquifer fluid-mount` reads, from a Secret that is
defined. Cache nodes (`aquifer cache-node` in a workload, examples/cache-nodes.yaml): flags of
`aquifer cache-node`, a group that a StorageClass joins, metrics where the probes
ask, the cache on a host path, memory for its buffers.

    k8s_check.py K8S_DIR AQUIFER_BINARY
"""
import glob
import os
import re
import shlex
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


def need_key(ns, ref, where):
    """A secretKeyRef: its Secret is defined and has the key."""
    need("Secret", ns, ref["name"], where)
    sec = next((s for _, s in objs if s["kind"] == "Secret" and s["metadata"]["name"] == ref["name"]
                and s["metadata"].get("namespace", "") == ns), None)
    if sec and ref["key"] not in {**sec.get("stringData", {}), **sec.get("data", {})}:
        problems.append(f"{where}: Secret {ref['name']} has no key {ref['key']}")


drivers = {d["metadata"]["name"] for _, d in objs if d["kind"] == "CSIDriver"}
if len(drivers) != 1:
    problems.append(f"CSIDrivers: {drivers}")
driver = next(iter(drivers), "")


def flags_of(command):
    out = subprocess.run([aquifer, command, "--help"], capture_output=True, text=True).stdout
    return set(re.findall(r"--([a-z][a-z-]+)", out))


mount_flags = flags_of("mount")
if "upload-limit" not in mount_flags or "cache-group" not in mount_flags:
    problems.append("cannot read the flags of aquifer mount")
cache_node_flags = flags_of("cache-node")
if "cache-group" not in cache_node_flags:
    problems.append("cannot read the flags of aquifer cache-node")


def label_key(path):
    """The node label the node daemon sets for a warm volume (crates/aquifer-csi node_labels)."""
    return "warm.aquifer.dev/" + path.strip("/").replace("/", ".")


def claim_path(ns, claim):
    """The directory of the filesystem a claim's volume is: its class's pathPattern, or a
    static PV's path."""
    pvc = next((d for _, d in objs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == claim
                and d["metadata"].get("namespace", "") == ns), None)
    if not pvc:
        return None
    if pvc["spec"].get("volumeName"):
        pv = next((d for _, d in objs if d["kind"] == "PersistentVolume"
                   and d["metadata"]["name"] == pvc["spec"]["volumeName"]), None)
        return pv and pv["spec"]["csi"].get("volumeAttributes", {}).get("path")
    sc = next((d for _, d in objs if d["kind"] == "StorageClass"
               and d["metadata"]["name"] == pvc["spec"].get("storageClassName")), None)
    pattern = sc and sc.get("parameters", {}).get("pathPattern")
    if not pattern:
        return None
    return pattern.replace("${pvc.metadata.namespace}", ns).replace("${pvc.metadata.name}", claim)


def check_options(opts, where):
    for o in opts or []:
        flag = o.split("=", 1)[0].lstrip("-")
        if flag not in mount_flags:
            problems.append(f"{where}: mount option {o!r} is not an aquifer mount flag")
        if flag == "cache-group" and not re.fullmatch(r"[A-Za-z0-9._-]{1,63}", o.partition("=")[2]):
            problems.append(f"{where}: {o!r} is not a group name (1 to 63 letters, digits, '-', '_', '.')")


def cache_node_args(c):
    """The flags (name -> value) of the `aquifer cache-node` a container runs, or None: as
    its arguments, or in the shell script it runs (the line that names cache-node, with its
    continuations)."""
    words = c.get("command", []) + c.get("args", [])
    if "cache-node" in words:
        rest = words[words.index("cache-node") + 1:]
    else:
        m = re.search(r"aquifer\s+cache-node\s(.*)", "\n".join(words).replace("\\\n", " "))
        if not m:
            return None
        rest = shlex.split(m.group(1).split("\n")[0], posix=True)
    out = {}
    for w in rest:
        if w.startswith("--"):
            k, _, v = w[2:].partition("=")
            out[k] = v
    return out


# The groups that node mounts (classes, PVs) join, and those that mounts joining with
# no-sharing need owners in.
class_groups, ownerless = set(), []
for path, d in objs:
    if d["kind"] in ("StorageClass", "PersistentVolume"):
        opts = d.get("mountOptions") or d.get("spec", {}).get("mountOptions") or []
        opts = dict(o.split("=", 1) if "=" in o else (o, "") for o in opts)
    elif d["kind"] == "Dataset" and d.get("apiVersion", "").startswith("data.fluid.io/"):
        opts = {k: v for m in d["spec"]["mounts"] for k, v in (m.get("options") or {}).items()}
    else:
        continue
    g = opts.get("cache-group")
    if g:
        if d["kind"] != "Dataset":
            class_groups.add(g)
        if "no-sharing" in opts and opts["no-sharing"] != "false":
            ownerless.append((f"{os.path.relpath(path, k8s)} {d['kind']}/{d['metadata']['name']}", g))
owning_cache_nodes = set()


def mib(v):
    """A size (`1408Mi`, `1G`, `256`: MiB) in MiB."""
    m = re.fullmatch(r"(\d+)([KMGT]?)i?B?", str(v).strip(), re.I)
    if not m:
        problems.append(f"cannot read the size {v!r}")
        return 0
    n, unit = int(m.group(1)), m.group(2).upper()
    return {"K": n / 1024, "": n, "M": n, "G": n * 1024, "T": n * 1024 * 1024}[unit]


def host_path(spec, c, path):
    """The host directory a container sees at `path` (or None)."""
    for vm in c.get("volumeMounts", []):
        if path == vm["mountPath"] or path.startswith(vm["mountPath"].rstrip("/") + "/"):
            v = next(v for v in spec["volumes"] if v["name"] == vm["name"])
            if "hostPath" in v:
                return v["hostPath"]["path"] + path[len(vm["mountPath"]):]
    return None


def check_cache_node(spec, c, a, where):
    """A cache node: its flags, its group, its probes, its cache and its memory."""
    for k in a:
        if k not in cache_node_flags:
            problems.append(f"{where}: cache-node option --{k} is not an aquifer cache-node flag")
    group = a.get("cache-group")
    if not group:
        problems.append(f"{where}: aquifer cache-node without --cache-group")
    elif group not in class_groups:
        problems.append(f"{where}: cache node group {group} is joined by no StorageClass "
                        f"(those join: {sorted(class_groups)})")
    elif "no-sharing" not in a:
        owning_cache_nodes.add(group)
    # Kubelet probes the pod's address: metrics on loopback (the default) fail every probe.
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    metrics = a.get("metrics", "127.0.0.1:9567")
    host, _, mport = metrics.rpartition(":")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        get = c.get(probe, {}).get("httpGet")
        if not get:
            continue
        port = ports.get(get["port"], get["port"])
        if host.strip("[]") in ("127.0.0.1", "::1", "localhost", "") or str(port) != mport:
            problems.append(f"{where}: the {probe} asks port {port}, but --metrics serves {metrics}")
    cache_dir = a.get("cache-dir")
    for d in (cache_dir or "").split(":"):
        if d in ("memory", "none"):
            continue
        if not d or not host_path(spec, c, d):
            problems.append(f"{where}: the cache dir {d or '(default)'} is not on a host path: a restarted "
                            "cache node would start empty, as a new member owning other blocks")
    buf = mib(a.get("buffer-size", "128"))
    bound = buf + mib(a.get("mem-cache-size", f"{buf // 2}")) + 64
    limit = c.get("resources", {}).get("limits", {}).get("memory")
    if not limit or mib(limit) < bound:
        problems.append(f"{where}: the cache node's memory limit {limit} is below its buffers and RAM cache: {bound} MiB")


for path, d in objs:
    kind, meta = d["kind"], d["metadata"]
    where = f"{os.path.relpath(path, k8s)} {kind}/{meta['name']}"
    ns = meta.get("namespace", "")
    example = path in examples
    if kind == "Secret":
        values = {**d.get("stringData", {}), **d.get("data", {})}
        for key in ("secret-key", "access-key", "meta-password"):
            if key in values and "REPLACE" not in values[key]:
                problems.append(f"{where}: {key} holds a value, not a placeholder")
        m = re.match(r"^[a-z]+://(?:[^:@/]*:([^@]*)@)?", values.get("metaurl", ""))
        if m and m.group(1) and "REPLACE" not in m.group(1):
            problems.append(f"{where}: metaurl holds a password, not a placeholder")
    text = yaml.safe_dump(d)
    # A reference to a variable (META_PASSWORD=${...}) is not a value.
    if kind != "Secret" and re.search(r"(?i)(secret-key|password)\s*[:=]\s*(?![\"']?\$)\S", text.replace("secret-name", "").replace("secret-namespace", "")):
        problems.append(f"{where}: looks like a secret in clear")
    if kind == "StorageClass":
        if d["provisioner"] != driver:
            problems.append(f"{where}: provisioner {d['provisioner']} is not the driver {driver}")
        params = d.get("parameters", {})
        # Two variables side by side need a separator no Kubernetes name holds (`_`, `/`):
        # with `-` or `.`, team/a-ckpt and team-a/ckpt share one directory.
        pattern = params.get("pathPattern", "")
        for sep in re.findall(r"\}([^$]*)\$\{", pattern):
            if not re.search(r"[_/]", sep):
                problems.append(f"{where}: pathPattern {pattern} joins names with {sep!r}: two claims can "
                                "share a directory (join with _ or /)")
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
    spec = d.get("spec", {}).get("template", {}).get("spec") if kind in ("Deployment", "DaemonSet", "StatefulSet", "Job") else None
    if spec:
        sa = spec.get("serviceAccountName")
        if sa:
            need("ServiceAccount", ns, sa, where)
        for c in spec.get("containers", []):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    need_key(ns, ref, where)
            cn = cache_node_args(c)
            if cn is not None:
                check_cache_node(spec, c, cn, where)
        for v in spec.get("volumes", []):
            claim = v.get("persistentVolumeClaim", {}).get("claimName")
            if claim:
                need("PersistentVolumeClaim", ns, claim, where)
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        for c in spec.get("containers", []):
            for vm in c.get("volumeMounts", []):
                if vm["name"] in claims and vm.get("mountPropagation") != "HostToContainer":
                    problems.append(f"{where}: the volume {vm['name']} does not follow the host's mounts "
                                    "(mountPropagation: HostToContainer): a node daemon restart would cut it off")
        warm = {label_key(p) for p in (claim_path(ns, c) for c in claims.values()) if p}
        aff = spec.get("affinity", {}).get("nodeAffinity", {})
        for pref in aff.get("preferredDuringSchedulingIgnoredDuringExecution", []):
            for e in pref["preference"].get("matchExpressions", []):
                if e["key"].startswith("warm.aquifer.dev/") and e["key"] not in warm:
                    problems.append(f"{where}: prefers {e['key']}, which no volume it mounts gets (those: {sorted(warm)})")
        for c in spec.get("containers", []):
            for a in c.get("args", []):
                if a.startswith("--kubelet-registration-path=") and f"/plugins/{driver}/" not in a:
                    problems.append(f"{where}: registration path {a} does not name {driver}")
    if d.get("apiVersion", "").startswith("data.fluid.io/"):
        if kind == "ThinRuntime":
            need("ThinRuntimeProfile", "", d["spec"]["profileName"], where)
            need("Dataset", ns, meta["name"], where)
        if kind == "DataLoad":
            ds = d["spec"]["dataset"]
            need("Dataset", ds.get("namespace", ns), ds["name"], where)
            need("ThinRuntime", ds.get("namespace", ns), ds["name"], where)
        if kind == "Dataset":
            for m in d["spec"]["mounts"]:
                if not re.match(r"^(redis|rediss|redis\+sentinel)://", m["mountPoint"]) or "@" in m["mountPoint"]:
                    problems.append(f"{where}: mountPoint {m['mountPoint']!r} is not a Redis URL without password")
                check_options([f"{k}={v}" for k, v in (m.get("options") or {}).items()], where)
                for e in m.get("encryptOptions", []):
                    if e["name"] not in ("meta-password", "secret-key"):
                        problems.append(f"{where}: encrypt option {e['name']} is not one aquifer fluid-mount reads")
                    need_key(ns, e["valueFrom"]["secretKeyRef"], where)
    if kind in ("RoleBinding", "ClusterRoleBinding"):
        for s in d["subjects"]:
            need("ServiceAccount", s["namespace"], s["name"], where)
        rk = d["roleRef"]["kind"]
        need(rk, ns if rk == "Role" else "", d["roleRef"]["name"], where)

for where, g in ownerless:
    if g not in owning_cache_nodes:
        problems.append(f"{where}: joins group {g} owning nothing (no-sharing), and no cache node owns its blocks")

# The node daemon holds one mount per StorageClass (each its own options): its memory limit
# must cover every class's buffer-size + mem-cache-size + 64 MiB (aquifer mount's bound,
# held by t_many_writers and t_read_memory), or it is OOM-killed under load.
need_mib = 0
for _, d in objs:
    if d["kind"] == "StorageClass":
        opts = dict(o.split("=", 1) if "=" in o else (o, "") for o in d.get("mountOptions", []))
        buf = mib(opts.get("buffer-size", "128"))
        need_mib += buf + mib(opts.get("mem-cache-size", f"{buf // 2}")) + 64
node_daemons = [d for p, d in objs if p in manifests and d["kind"] == "DaemonSet"
                and any("--mode=mounter" in c.get("args", []) for c in d["spec"]["template"]["spec"]["containers"])]
if len(node_daemons) != 1:
    problems.append(f"{len(node_daemons)} node daemon DaemonSets (--mode=mounter), not 1")
for d in node_daemons:
    for c in d["spec"]["template"]["spec"]["containers"]:
        if "--mode=mounter" in c.get("args", []):
            limit = c.get("resources", {}).get("limits", {}).get("memory")
            if not limit or mib(limit) < need_mib:
                problems.append(f"the node daemon's memory limit {limit} is below what its mounts may use: {need_mib} MiB")

# The node plugin and the node daemon meet in two host directories: the state dir (mounts)
# and the specs dir. Both must name the same paths, backed by the same host paths.
def container_of(flag):
    for _, d in objs:
        if d["kind"] != "DaemonSet":
            continue
        spec = d["spec"]["template"]["spec"]
        for c in spec["containers"]:
            if flag in c.get("args", []):
                return spec, c
    return None, None


plugin, daemon = container_of("--external-mounts"), container_of("--mode=mounter")
if plugin[1] and daemon[1]:
    for flag in ("--state-dir", "--specs-dir"):
        vals = []
        for spec, c in (plugin, daemon):
            v = next((a.split("=", 1)[1] for a in c["args"] if a.startswith(flag + "=")), None)
            vals.append((v, v and host_path(spec, c, v)))
        if vals[0] != vals[1] or not vals[0][1]:
            problems.append(f"the node plugin and the node daemon disagree on {flag}: {vals}")
else:
    problems.append("no node plugin with --external-mounts beside a node daemon")

for p in problems:
    print(f"FAIL: {p}")
sys.exit(1 if problems else 0)
