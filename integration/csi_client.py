#!/usr/bin/env python3
"""A CSI client for t_csi.sh: grpcio with stubs generated at run time from the driver's
proto (grpc_tools), so the driver is checked by a gRPC implementation other than its own.

    csi_client.py SOCKET WORK METAURL BUCKET NODE_ID PHASE

PHASE: calls (every call, errors, idempotency, publishes), after-restart (the driver was
killed and started again between the phases), stale (the filesystem daemon was killed),
cleanup (unpublish and delete); with the node daemon keeping the mounts (--external-mounts):
ext-publish (targets under WORK/kubelet), ext-unpublish.
"""
import errno
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import grpc
from grpc_tools import protoc

sock, work, metaurl, bucket, node_id, phase = sys.argv[1:7]
proto_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "aquifer-csi", "proto")
gen = tempfile.mkdtemp(prefix="csi-gen-", dir=work)
if protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={gen}", f"--grpc_python_out={gen}", "csi.proto"]) != 0:
    sys.exit("FAIL: cannot generate the Python stubs")
sys.path.insert(0, gen)
import csi_pb2 as pb  # noqa: E402
import csi_pb2_grpc as rpc  # noqa: E402

# As kubelet and every Go client say for a unix socket: grpc C-core would send the escaped
# socket path, which is not a valid HTTP/2 :authority and is refused by the server's h2.
channel = grpc.insecure_channel(f"unix://{sock}", options=[("grpc.default_authority", "localhost")])
identity = rpc.IdentityStub(channel)
controller = rpc.ControllerStub(channel)
node = rpc.NodeStub(channel)
state_file = os.path.join(work, "csi-state.json")


def fail(msg):
    sys.exit(f"FAIL: {msg}")


def note(msg):
    print(f"  {msg}", flush=True)


def expect_code(code, call, *args):
    try:
        call(*args, timeout=60)
    except grpc.RpcError as e:
        if e.code() != code:
            fail(f"{call._method}: {e.code()} ({e.details()}), expected {code}")
        return e.details()
    fail(f"{call._method} succeeded, expected {code}")


SECRETS = {"name": "csivol", "metaurl": metaurl, "storage": "file", "bucket": bucket}
Mode = pb.VolumeCapability.AccessMode


def cap(mode=Mode.MULTI_NODE_MULTI_WRITER, block=False, flags=()):
    c = pb.VolumeCapability(access_mode=Mode(mode=mode))
    if block:
        c.block.SetInParent()
    else:
        c.mount.mount_flags.extend(flags)
    return c


def create(name, size, secrets=SECRETS, params=None):
    return controller.CreateVolume(
        pb.CreateVolumeRequest(
            name=name,
            capacity_range=pb.CapacityRange(required_bytes=size),
            volume_capabilities=[cap()],
            parameters=params or {},
            secrets=secrets,
        ),
        timeout=120,
    ).volume


def publish(vol_id, target, readonly=False, context=None, flags=(), mode=Mode.MULTI_NODE_MULTI_WRITER):
    node.NodePublishVolume(
        pb.NodePublishVolumeRequest(
            volume_id=vol_id,
            target_path=target,
            volume_capability=cap(mode=mode, flags=flags),
            readonly=readonly,
            secrets=SECRETS,
            volume_context=context or {},
        ),
        timeout=120,
    )


def unpublish(vol_id, target):
    node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vol_id, target_path=target), timeout=60)


def expect_erofs(directory, what):
    """A write under `directory` must fail with EROFS."""
    try:
        open(os.path.join(directory, "nope"), "w")
    except OSError as e:
        if e.errno != errno.EROFS:
            fail(f"{what}: a write failed with {e}, not EROFS")
        return
    fail(f"{what} took a write")


def mounted(p):
    p = os.path.abspath(p)
    with open("/proc/self/mountinfo") as f:
        return any(line.split(" ")[4] == p for line in f)


def targets():
    return {k: os.path.join(work, "pods", k, "mount") for k in ["a", "b", "ro", "stale", "static", "reader"]}


if phase == "calls":
    info = identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=10)
    if info.name != "csi.aquifer.dev" or not info.vendor_version:
        fail(f"plugin info {info}")
    caps = identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest(), timeout=10)
    if pb.PluginCapability.Service.CONTROLLER_SERVICE not in [c.service.type for c in caps.capabilities]:
        fail(f"no controller service in {caps}")
    if not identity.Probe(pb.ProbeRequest(), timeout=10).ready.value:
        fail("probe says not ready")
    ccaps = controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest(), timeout=10)
    if pb.ControllerServiceCapability.RPC.CREATE_DELETE_VOLUME not in [c.rpc.type for c in ccaps.capabilities]:
        fail(f"controller capabilities {ccaps}")
    ncaps = node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest(), timeout=10)
    if pb.NodeServiceCapability.RPC.GET_VOLUME_STATS not in [c.rpc.type for c in ncaps.capabilities]:
        fail(f"node capabilities {ncaps}")
    if node.NodeGetInfo(pb.NodeGetInfoRequest(), timeout=10).node_id != node_id:
        fail("node id")
    note("identity, capabilities, node info")

    C = grpc.StatusCode
    expect_code(C.INVALID_ARGUMENT, controller.CreateVolume,
                pb.CreateVolumeRequest(name="", volume_capabilities=[cap()], secrets=SECRETS))
    expect_code(C.INVALID_ARGUMENT, controller.CreateVolume, pb.CreateVolumeRequest(name="x", secrets=SECRETS))
    expect_code(C.INVALID_ARGUMENT, controller.CreateVolume,
                pb.CreateVolumeRequest(name="x", volume_capabilities=[cap(block=True)], secrets=SECRETS))
    d = expect_code(C.INVALID_ARGUMENT, controller.CreateVolume,
                    pb.CreateVolumeRequest(name="x", volume_capabilities=[cap()], secrets={"name": "csivol"}))
    if "metaurl" not in d:
        fail(f"missing metaurl not named: {d}")
    bad = dict(SECRETS, metaurl="redis://:s3cret-pw@127.0.0.1:1/1")
    d = expect_code(C.INTERNAL, controller.CreateVolume,
                    pb.CreateVolumeRequest(name="x", volume_capabilities=[cap()], secrets=bad))
    if "s3cret-pw" in d:
        fail(f"a password in an error: {d}")
    expect_code(C.INVALID_ARGUMENT, controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id="../etc", secrets=SECRETS))
    expect_code(C.INVALID_ARGUMENT, node.NodePublishVolume,
                pb.NodePublishVolumeRequest(volume_id="v", volume_capability=cap(), secrets=SECRETS))
    expect_code(C.INVALID_ARGUMENT, node.NodePublishVolume,
                pb.NodePublishVolumeRequest(volume_id="v", target_path=os.path.join(work, "t"), secrets=SECRETS))
    expect_code(C.NOT_FOUND, node.NodeGetVolumeStats,
                pb.NodeGetVolumeStatsRequest(volume_id="v", volume_path=os.path.join(work, "nowhere")))
    note("bad requests get INVALID_ARGUMENT / NOT_FOUND, passwords never shown")

    gib = 1 << 30
    v = create("pvc-a", gib)
    if v.volume_id != "pvc-a" or v.capacity_bytes != gib or v.volume_context["path"] != "/pvc-a":
        fail(f"created {v}")
    v2 = create("pvc-a", gib)
    if v2 != v:
        fail("CreateVolume again gave another volume")
    d = expect_code(C.ALREADY_EXISTS, controller.CreateVolume,
                    pb.CreateVolumeRequest(name="pvc-a", capacity_range=pb.CapacityRange(required_bytes=2 * gib),
                                           volume_capabilities=[cap()], secrets=SECRETS))
    pat = create("pv-7", 0, params={"pathPattern": "ckpts/${pvc.metadata.namespace}-${pvc.metadata.name}",
                                    "csi.storage.k8s.io/pvc/name": "ckpt",
                                    "csi.storage.k8s.io/pvc/namespace": "team"})
    if pat.volume_id != "pv-7:ckpts/team-ckpt" or pat.volume_context["path"] != "/ckpts/team-ckpt":
        fail(f"pathPattern gave {pat.volume_id} at {pat.volume_context['path']}")
    ok = controller.ValidateVolumeCapabilities(
        pb.ValidateVolumeCapabilitiesRequest(volume_id="pvc-a", volume_capabilities=[cap()], secrets=SECRETS), timeout=60)
    if not ok.confirmed.volume_capabilities:
        fail("capabilities not confirmed")
    expect_code(C.NOT_FOUND, controller.ValidateVolumeCapabilities,
                pb.ValidateVolumeCapabilitiesRequest(volume_id="pvc-none", volume_capabilities=[cap()], secrets=SECRETS))
    note("CreateVolume idempotent, ALREADY_EXISTS for another size, pathPattern, validate")

    t = targets()
    ctx = dict(v.volume_context)
    publish("pvc-a", t["a"], context=ctx)
    if not mounted(t["a"]):
        fail("target a not mounted")
    with open(os.path.join(t["a"], "hello"), "w") as f:
        f.write("from pod a")
    publish("pvc-a", t["a"], context=ctx)  # the same publish again: fine, nothing stacked
    publish("pvc-a", t["b"], context=ctx)
    with open(os.path.join(t["b"], "hello")) as f:
        if f.read() != "from pod a":
            fail("pod b does not see pod a's file")
    publish("pvc-a", t["ro"], readonly=True, context=ctx)
    expect_erofs(t["ro"], "a read-only publish")
    with open(os.path.join(t["ro"], "hello")) as f:
        if f.read() != "from pod a":
            fail("the read-only publish does not read")
    st = node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="pvc-a", volume_path=t["a"]), timeout=10)
    units = {u.unit: u for u in st.usage}
    if pb.VolumeUsage.BYTES not in units or units[pb.VolumeUsage.BYTES].total <= 0 or pb.VolumeUsage.INODES not in units:
        fail(f"volume stats {st}")
    note("publish: a working mount, shared by a second pod, read-only refuses writes, stats")
    # A static PV: a path of the filesystem that exists already, named in the PV's context.
    roots = [m for m in glob.glob(os.path.join(work, "state", "mnt", "csivol-*")) if mounted(m)]
    if len(roots) != 1:
        fail(f"filesystem mounts on the node: {roots}")
    fs_root = roots[0]
    os.makedirs(os.path.join(fs_root, "datasets", "set1"))
    with open(os.path.join(fs_root, "datasets", "set1", "part-0"), "w") as f:
        f.write("dataset bytes")
    publish("static-1", t["static"], readonly=True, context={"path": "/datasets/set1"})
    with open(os.path.join(t["static"], "part-0")) as f:
        if f.read() != "dataset bytes":
            fail("the static PV shows other bytes")
    # A static handle with a ':' and no context is a path, whole: publish and validate
    # find the same directory (not "v2", which a dynamic id "datasets:v2" would name).
    os.makedirs(os.path.join(fs_root, "datasets:v2"))
    os.makedirs(os.path.join(fs_root, "v2"))
    with open(os.path.join(fs_root, "datasets:v2", "which"), "w") as f:
        f.write("the static one")
    colon = os.path.join(work, "pods", "colon", "m")
    publish("datasets:v2", colon, readonly=True)
    with open(os.path.join(colon, "which")) as f:
        if f.read() != "the static one":
            fail("a static handle with ':' published another directory")
    unpublish("datasets:v2", colon)
    os.rmdir(os.path.join(fs_root, "v2"))
    controller.ValidateVolumeCapabilities(
        pb.ValidateVolumeCapabilitiesRequest(volume_id="datasets:v2", volume_capabilities=[cap()],
                                             secrets=SECRETS), timeout=60)
    # A directory no PV made is no dynamic volume's: CreateVolume refuses it, DeleteVolume
    # (of any id naming it) leaves it.
    d = expect_code(C.ALREADY_EXISTS, controller.CreateVolume,
                    pb.CreateVolumeRequest(name="pv-s", volume_capabilities=[cap()], secrets=SECRETS,
                                           parameters={"pathPattern": "datasets/${pvc.metadata.name}",
                                                       "csi.storage.k8s.io/pvc/name": "set1"}))
    for vid in ["datasets/set1", "static-1:datasets/set1", "pv-s:datasets/set1"]:
        controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid, secrets=SECRETS), timeout=60)
    with open(os.path.join(t["static"], "part-0")) as f:
        if f.read() != "dataset bytes":
            fail("DeleteVolume removed a static PV's directory")
    expect_code(C.NOT_FOUND, node.NodePublishVolume,
                pb.NodePublishVolumeRequest(volume_id="static-2", target_path=os.path.join(work, "pods", "x", "m"),
                                            volume_capability=cap(), secrets=SECRETS,
                                            volume_context={"path": "/datasets/none"}))
    note("a static PV publishes an existing path; a missing one is NOT_FOUND")
    d = expect_code(C.FAILED_PRECONDITION, node.NodePublishVolume,
                    pb.NodePublishVolumeRequest(volume_id="static-3", target_path=os.path.join(work, "pods", "y", "m"),
                                                volume_capability=cap(), secrets=SECRETS,
                                                volume_context={"path": "/datasets/set1/part-0"}))
    d = expect_code(C.ALREADY_EXISTS, node.NodePublishVolume,
                    pb.NodePublishVolumeRequest(volume_id="pvc-a", target_path=t["a"], volume_capability=cap(),
                                                readonly=True, secrets=SECRETS, volume_context=ctx))
    d = expect_code(C.ALREADY_EXISTS, node.NodePublishVolume,
                    pb.NodePublishVolumeRequest(volume_id="static-1", target_path=t["a"], volume_capability=cap(),
                                                secrets=SECRETS, volume_context={"path": "/datasets/set1"}))
    publish("pvc-a", t["reader"], context=ctx, mode=Mode.MULTI_NODE_READER_ONLY)
    expect_erofs(t["reader"], "a reader-only access mode")
    note("a file is FAILED_PRECONDITION, another volume or mode at a published target ALREADY_EXISTS, "
         "reader-only modes publish read-only")
    # Tenants (the node mount is held by the targets above, so each pod's publish is quick).
    # The shipped pattern keeps team/a-ckpt and team-a/ckpt apart.
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "k8s", "storageclasses.yaml")) as f:
        patterns = re.findall(r"pathPattern:\s*(\S+)", f.read())
    if not patterns:
        fail("no pathPattern in k8s/storageclasses.yaml")
    dash = "ckpts/${pvc.metadata.namespace}-${pvc.metadata.name}"

    def claim_req(pv, ns, claim, pattern, size):
        return pb.CreateVolumeRequest(
            name=pv, capacity_range=pb.CapacityRange(required_bytes=size), volume_capabilities=[cap()],
            secrets=SECRETS, parameters={"pathPattern": pattern, "csi.storage.k8s.io/pvc/name": claim,
                                         "csi.storage.k8s.io/pvc/namespace": ns})

    def claim(pv, ns, name, pattern, size=gib):
        return controller.CreateVolume(claim_req(pv, ns, name, pattern, size), timeout=120).volume

    def exists(vol):
        try:
            controller.ValidateVolumeCapabilities(
                pb.ValidateVolumeCapabilitiesRequest(volume_id=vol.volume_id, volume_capabilities=[cap()],
                                                     secrets=SECRETS), timeout=60)
            return True
        except grpc.RpcError as e:
            if e.code() != C.NOT_FOUND:
                raise
            return False

    def delete(vol_id):
        controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol_id, secrets=SECRETS), timeout=60)

    def pod_writes(vol, name, text):
        target = os.path.join(work, "pods", "tenant", "mount")
        publish(vol.volume_id, target, context=dict(vol.volume_context))
        with open(os.path.join(target, name), "w") as f:
            f.write(text)
        unpublish(vol.volume_id, target)

    def pod_reads(vol, name):
        target = os.path.join(work, "pods", "tenant", "mount")
        publish(vol.volume_id, target, context=dict(vol.volume_context))
        try:
            with open(os.path.join(target, name)) as f:
                return f.read()
        except FileNotFoundError:
            return None
        finally:
            unpublish(vol.volume_id, target)

    def reveals(detail, *secrets):
        return [x for x in secrets if x in detail]

    for i, shipped in enumerate(patterns):
        a = claim(f"pv-ta{i}", "team", "a-ckpt", shipped)
        try:
            b = claim(f"pv-tb{i}", "team-a", "ckpt", shipped)
        except grpc.RpcError as e:
            fail(f"the shipped pattern {shipped}: team-a/ckpt after team/a-ckpt: {e.code()} {e.details()}")
        if a.volume_context["path"] == b.volume_context["path"]:
            fail(f"the shipped pattern {shipped}: team/a-ckpt and team-a/ckpt share {a.volume_context['path']}")
        if i < len(patterns) - 1:
            delete(a.volume_id)
            delete(b.volume_id)
    if claim(f"pv-ta{i}", "team", "a-ckpt", shipped) != a:
        fail("CreateVolume retried for the same PV gave another volume")
    pod_writes(a, "ckpt-0", "team's")
    pod_writes(b, "ckpt-0", "team-a's")
    if pod_reads(b, "ckpt-0") != "team-a's":
        fail("team-a reads another tenant's checkpoint")
    delete(a.volume_id)
    if exists(a) or not exists(b) or pod_reads(b, "ckpt-0") != "team-a's":
        fail("deleting team/a-ckpt touched team-a/ckpt")
    d = expect_code(C.ALREADY_EXISTS, controller.CreateVolume,
                    claim_req("pv-tx", "x", "inner", b.volume_context["path"].lstrip("/") + "/${pvc.metadata.name}", gib))
    if reveals(d, b.volume_id.split(":")[0], str(gib)):
        fail(f"a volume inside another: the refusal tells {reveals(d, b.volume_id.split(':')[0], str(gib))}: {d}")
    delete(b.volume_id)
    if exists(b):
        fail("DeleteVolume left team-a/ckpt")
    note(f"tenants: {a.volume_context['path']} and {b.volume_context['path']}, retried CreateVolume "
         "idempotent, DeleteVolume of one leaves the other, no volume inside another")

    # A pattern that does collide: the second PV is refused, and told nothing of the first.
    big = 7 * gib
    c = claim("pv-tc", "team", "a-ckpt", dash, big)
    pod_writes(c, "secret", "team's")
    for size in (big, 2 * gib):
        d = expect_code(C.ALREADY_EXISTS, controller.CreateVolume, claim_req("pv-td", "team-a", "ckpt", dash, size))
        if reveals(d, "pv-tc", str(big), "7.0", "secret"):
            fail(f"the refusal tells {reveals(d, 'pv-tc', str(big), '7.0', 'secret')}: {d}")
    if claim("pv-tc", "team", "a-ckpt", dash, big) != c:
        fail("the owner's retry after a refused collision gave another volume")
    delete("pv-td:" + c.volume_context["path"].lstrip("/"))
    if pod_reads(c, "secret") != "team's":
        fail("DeleteVolume of a PV that does not own the directory removed it")
    delete(c.volume_id)
    # The claim made again is a new PV; a late retry of the first PV's delete leaves it.
    e = claim("pv-te", "team", "a-ckpt", dash, big)
    if e.volume_context != c.volume_context or e.volume_id == c.volume_id:
        fail(f"the directory freed was not taken anew: {e}")
    # Looked at through the controller's mount, which made it: another mount may know the
    # removed directory's name for up to --entry-cache (docs/semantics.md).
    ctl = [m for m in glob.glob(os.path.join(work, "state", "controller", "csivol-*")) if mounted(m)]
    e_dir = os.path.join(ctl[0], e.volume_context["path"].lstrip("/"))
    if os.listdir(e_dir):
        fail(f"a new volume holds the deleted one's files: {os.listdir(e_dir)}")
    # The record is one that only CAP_SYS_ADMIN reads or writes, not a pod.
    if os.getxattr(e_dir, "trusted.aquifer.csi.owner") != b"pv-te":
        fail(f"the owner record of pv-te's directory: {os.getxattr(e_dir, 'trusted.aquifer.csi.owner')}")
    with open(os.path.join(e_dir, "new"), "w") as f:
        f.write("e's")
    delete(c.volume_id)
    if not os.path.exists(os.path.join(e_dir, "new")):
        fail("a late DeleteVolume of the directory's former PV removed the new PV's volume")
    delete(e.volume_id)
    note(f"a colliding pattern: ALREADY_EXISTS telling nothing ({d!r}); "
         "DeleteVolume removes only its PV's directory")
    json.dump({"ctx": ctx}, open(state_file, "w"))

elif phase == "after-restart":
    t = targets()
    ctx = json.load(open(state_file))["ctx"]
    for k in ["a", "b", "ro"]:
        if not mounted(t[k]):
            fail(f"target {k} gone after the driver restarted")
    with open(os.path.join(t["b"], "after"), "w") as f:
        f.write("still here")
    with open(os.path.join(t["a"], "after")) as f:
        if f.read() != "still here":
            fail("targets do not share data after the restart")
    publish("pvc-a", t["a"], context=ctx)  # the restarted driver finds the target published
    note("after kill -9 and restart of the driver: published targets keep working")

elif phase == "stuck":
    # The filesystem daemon is stopped (SIGSTOP): alive, answering nothing. Calls that look
    # at its mounts answer UNAVAILABLE in bounded time, others are not held up, and an
    # unpublish still unpublishes.
    import time
    t = targets()
    ctx = json.load(open(state_file))["ctx"]
    C = grpc.StatusCode
    start = time.monotonic()
    expect_code(C.UNAVAILABLE, node.NodeGetVolumeStats,
                pb.NodeGetVolumeStatsRequest(volume_id="pvc-a", volume_path=t["a"]))
    expect_code(C.UNAVAILABLE, node.NodePublishVolume,
                pb.NodePublishVolumeRequest(volume_id="pvc-a", target_path=t["a"], volume_capability=cap(),
                                            secrets=SECRETS, volume_context=ctx))
    expect_code(C.UNAVAILABLE, node.NodePublishVolume,
                pb.NodePublishVolumeRequest(volume_id="pvc-a", target_path=os.path.join(work, "pods", "new", "m"),
                                            volume_capability=cap(), secrets=SECRETS, volume_context=ctx))
    if not identity.Probe(pb.ProbeRequest(), timeout=5).ready.value:
        fail("probe says not ready")
    unpublish("pvc-a", t["reader"])
    if mounted(t["reader"]):
        fail("unpublish left the target of a stuck daemon")
    took = time.monotonic() - start
    if took > 40:
        fail(f"calls on a stuck mount took {took:.0f}s")
    note(f"a stuck daemon: stats and publish answer UNAVAILABLE, probe and unpublish work ({took:.0f}s)")

elif phase == "stale":
    t = targets()
    ctx = json.load(open(state_file))["ctx"]
    try:
        os.statvfs(t["a"])  # a stat may be answered from the kernel's attribute cache
        fail("target a still answers with its daemon killed")
    except OSError as e:
        if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED, errno.EIO):
            fail(f"stale target: {e}")
    publish("pvc-a", t["a"], context=ctx)
    with open(os.path.join(t["a"], "hello")) as f:
        if f.read() != "from pod a":
            fail("the repaired target reads other bytes")
    publish("pvc-a", t["stale"], context=ctx)
    if not os.path.exists(os.path.join(t["stale"], "after")):
        fail("a new publish after the repair misses files")
    note("a target whose filesystem daemon died is repaired by publishing it again")

elif phase == "cleanup":
    t = targets()
    for k, p in t.items():
        unpublish("pvc-a", p)
        if mounted(p) or os.path.exists(p):
            fail(f"target {k} left after unpublish")
        unpublish("pvc-a", p)  # again: fine
    controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id="pvc-a", secrets=SECRETS), timeout=60)
    controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id="pvc-a", secrets=SECRETS), timeout=60)
    grpc_code = grpc.StatusCode
    expect_code(grpc_code.NOT_FOUND, controller.ValidateVolumeCapabilities,
                pb.ValidateVolumeCapabilitiesRequest(volume_id="pvc-a", volume_capabilities=[cap()], secrets=SECRETS))
    note("unpublish leaves nothing mounted; delete removes the volume; both idempotent")
elif phase == "ext-publish":
    kub = os.path.join(work, "kubelet")
    publish("set1", os.path.join(kub, "p1", "mount"), context={"path": "/datasets/set1"})
    publish("set1", os.path.join(kub, "p2", "mount"), readonly=True, context={"path": "/datasets/set1"})
    with open(os.path.join(kub, "p2", "mount", "part-0")) as f:
        if f.read() != "dataset bytes":
            fail("the node daemon's mount shows other bytes")
    with open(os.path.join(kub, "p1", "mount", "written"), "w") as f:
        f.write("by p1")
    expect_erofs(os.path.join(kub, "p2", "mount"), "a read-only publish")
    # A filesystem the node daemon cannot mount: its error comes back, not a timeout.
    bad = dict(SECRETS, name="other", metaurl="redis://127.0.0.1:1/1")
    try:
        node.NodePublishVolume(
            pb.NodePublishVolumeRequest(volume_id="x", target_path=os.path.join(kub, "bad", "mount"),
                                        volume_capability=cap(), secrets=bad, volume_context={"path": "/"}),
            timeout=50)
        fail("a publish of an unmountable filesystem succeeded")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INTERNAL or "node daemon cannot mount" not in e.details():
            fail(f"unmountable filesystem: {e.code()} {e.details()}")
    note("publish through the node daemon: rw and ro targets; its mount errors come back")

elif phase == "ext-unpublish":
    kub = os.path.join(work, "kubelet")
    for k in ["p1", "p2"]:
        p = os.path.join(kub, k, "mount")
        unpublish("set1", p)
        if mounted(p) or os.path.exists(p):
            fail(f"target {k} left after unpublish")
    note("unpublished")
else:
    fail(f"unknown phase {phase}")
