#!/usr/bin/env bash
# The CSI driver (`aquifer csi`) on a unix socket, called by a real gRPC client (grpcio,
# integration/csi_client.py) with a volume on Redis:
# - every call, error codes, idempotency (CreateVolume, DeleteVolume, publish, unpublish);
# - a publish gives a working mount at the target; a second pod shares it; a read-only
#   publish refuses writes; a static PV publishes an existing path;
# - kill -9 of the driver between publish and unpublish: the targets keep working and the
#   restarted driver finds them;
# - kill -9 of the filesystem daemon: publishing the target again repairs it;
# - unpublish leaves nothing mounted; delete removes the volume;
# - the node daemon (`--mode mounter`) keeping the mounts of a plugin run with
#   --external-mounts: kill -9 of the plugin leaves targets working; kill -9 of the node
#   daemon and its filesystem daemons (a container restart) leaves them dead until the
#   restarted node daemon mounts again and binds the targets anew, which a pod's own mount
#   namespace (a slave of the host's, as with mountPropagation HostToContainer) sees too;
#   a warmup labels the node through a stand-in API server; the last unpublish releases
#   the filesystem's mount.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
python3 -c 'import grpc, grpc_tools' 2>/dev/null || fail "grpcio and grpcio-tools are missing (scripts/install-deps.sh --test)"

start_redis
redis_meta
sock=$WORK/csi/csi.sock
state=$WORK/state
mkdir -p "$WORK/pods"
# Whatever the test leaves mounted under WORK goes before WORK does: bind targets first,
# then the filesystem mounts (the daemons are killed by lib.sh: they log under WORK).
CLEANUPS+=("grep -o \" $WORK/[^ ]*\" /proc/self/mounts | sort -r | xargs -r -n1 umount -l")
driver=""
# The first part has no keeper loop, so that a dead daemon stays dead until a publish.
driver_args=(--mode all --state-dir "$state" --keep-interval 0)
start_driver() {
  "$AQUIFER" csi --endpoint "unix://$sock" --node-id node-1 "${driver_args[@]}" \
    >>"$WORK/csi.log" 2>&1 &
  driver=$!
  CLEANUPS+=("kill -9 $driver")
  local i
  for i in $(seq 1 100); do
    [ -S "$sock" ] && return 0
    sleep 0.1
  done
  fail "the driver did not listen: $(tail -3 "$WORK/csi.log")"
}
client() { python3 "$here/csi_client.py" "$sock" "$WORK" "$META" "$WORK/blocks" node-1 "$1"; }

"$AQUIFER" csi --endpoint "tcp://127.0.0.1:1" --node-id n 2>"$WORK/err" && fail "a tcp endpoint was taken"
grep -q "unix:///PATH" "$WORK/err" || fail "bad endpoint error: $(cat "$WORK/err")"

start_driver
client calls

note "kill -9 of the driver"
kill -9 "$driver"
wait "$driver" 2>/dev/null || true
start_driver
client after-restart

note "a stuck filesystem daemon (SIGSTOP)"
node_daemon="--log $state/log/csivol-"
pkill -STOP -f -- "$node_daemon" || fail "no node filesystem daemon to stop"
client stuck || { pkill -CONT -f -- "$node_daemon"; exit 1; }
pkill -CONT -f -- "$node_daemon"

note "kill -9 of the filesystem daemon"
pkill -9 -f -- "--log $state/log/" || fail "no filesystem daemon found"
sleep 0.5
if pgrep -f -- "--log $state/log/" >/dev/null; then
  fail "filesystem daemon still running: $(pgrep -af -- "--log $state/log/")"
fi
client stale || { grep " $WORK/" /proc/self/mountinfo; tail -20 "$WORK/csi.log"; ps -ef | grep -E "aquifer (mount|csi)" | grep -v grep; exit 1; }

client cleanup
# --release-after 0 (the default): the last unpublish took the filesystem's node mount too.
if grep -q " $state/mnt/" /proc/self/mounts; then fail "a node mount stays after the last unpublish"; fi
[ -z "$(ls "$state/specs/"*.json 2>/dev/null)" ] || fail "a spec stays after the last unpublish"
note "the last unpublish released the node mount"
kill "$driver"
wait "$driver" 2>/dev/null || true
[ ! -S "$sock" ] || fail "the socket is left after SIGTERM"

note "the node daemon keeps the mounts"
"$AQUIFER" csi --node-id n --mode node 2>"$WORK/err" && fail "a node plugin started without --endpoint"
grep -q "unix:///PATH" "$WORK/err" || fail "no endpoint error: $(cat "$WORK/err")"
state2=$WORK/state2
specs2=$WORK/run/specs
kub=$WORK/kubelet
# Like kubelet's directory: shared, so that mounts made on a target reach the pods' copies.
mkdir -p "$kub"
mount --bind "$kub" "$kub"
mount --make-rshared "$kub"
# A stand-in Kubernetes API server: records each request, answers as the API server does.
cat >"$WORK/api.py" <<'PY'
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_PATCH(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with open(sys.argv[2], "a") as f:
            f.write(json.dumps({"path": self.path, "type": self.headers["Content-Type"],
                                "body": json.loads(body)}) + "\n")
        out = json.dumps({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "node-1"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a):
        pass
s = http.server.HTTPServer(("127.0.0.1", 0), H)
open(sys.argv[1], "w").write(str(s.server_address[1]))
s.serve_forever()
PY
python3 "$WORK/api.py" "$WORK/api.port" "$WORK/api.log" &
CLEANUPS+=("kill $!")
for _ in $(seq 1 50); do [ -s "$WORK/api.port" ] && break; sleep 0.1; done
touch "$WORK/api.log"
mounter=""
start_mounter() {
  "$AQUIFER" csi --mode mounter --node-id node-1 --state-dir "$state2" --specs-dir "$specs2" --keep-interval 0.3 \
    --release-after 2s --cache-root "$WORK/cache" --label-node "http://127.0.0.1:$(cat "$WORK/api.port")" \
    >>"$WORK/mounter.log" 2>&1 &
  mounter=$!
  CLEANUPS+=("kill -9 $mounter")
}
# wait_for SECONDS CMD...: until CMD succeeds.
wait_for() {
  local t=$1; shift
  local i
  for i in $(seq 1 $((t * 10))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}
start_mounter
driver_args=(--mode node --external-mounts --state-dir "$state2" --specs-dir "$specs2")
start_driver
client ext-publish || { tail -20 "$WORK/mounter.log"; exit 1; }
[ -n "$(find "$specs2" -name '*.json')" ] || fail "no spec in --specs-dir"
[ -z "$(find "$specs2" -name '*.json' -perm /077)" ] || fail "a spec file others can read"
# A pod: its own mount namespace, a slave copy of the host's.
unshare -m --propagation slave sleep 600 &
pod=$!
CLEANUPS+=("kill -9 $pod")
sleep 0.3
in_pod() { nsenter -t "$pod" -m -- "$@"; }
[ "$(in_pod cat "$kub/p1/mount/part-0")" = "dataset bytes" ] || fail "the pod does not read the volume"

"$AQUIFER" warmup "$kub/p1/mount" >/dev/null || fail "warmup failed"
label_set() { grep -q '"warm.aquifer.dev/datasets.set1": "true"' "$WORK/api.log"; }
wait_for 10 label_set || fail "no label after the warmup: $(cat "$WORK/api.log"); $(tail -5 "$WORK/mounter.log")"
grep -q '"path": "/api/v1/nodes/node-1", "type": "application/merge-patch+json"' "$WORK/api.log" \
  || fail "the label patch: $(cat "$WORK/api.log")"
note "a warmup labels the node warm.aquifer.dev/datasets.set1"
"$AQUIFER" warmup --evict "$kub/p2/mount" >/dev/null || fail "evict failed"
label_gone() { grep -q '"warm.aquifer.dev/datasets.set1": null' "$WORK/api.log"; }
wait_for 10 label_gone || fail "the label stays after an evict: $(cat "$WORK/api.log")"
"$AQUIFER" warmup "$kub/p1/mount" >/dev/null || fail "warmup failed"
wait_for 10 sh -c "[ \$(grep -c 'datasets.set1\": \"true\"' '$WORK/api.log') -ge 2 ]" \
  || fail "no label after warming again: $(cat "$WORK/api.log")"
note "an evict removes the label, a warmup sets it again"

kill -9 "$driver"
wait "$driver" 2>/dev/null || true
[ "$(cat "$kub/p1/mount/written")" = "by p1" ] || fail "target gone with the plugin"
[ "$(in_pod cat "$kub/p2/mount/written")" = "by p1" ] || fail "the pod lost its volume with the plugin"
note "kill -9 of the plugin: targets keep working"

# A restart of the node daemon's container: it and every filesystem daemon in it die.
kill -9 "$mounter"
wait "$mounter" 2>/dev/null || true
pkill -9 -f -- "--log $state2/log/" || fail "no filesystem daemon of the node daemon"
sleep 0.3
if stat -f "$kub/p1/mount" >/dev/null 2>&1; then fail "the target answers with its daemon killed"; fi
t0=$(date +%s.%N)
start_mounter
wait_for 30 stat -f "$kub/p1/mount" || fail "the node daemon did not bring the target back: $(tail -5 "$WORK/mounter.log")"
note "targets answer again $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s after the node daemon restarted"
[ "$(cat "$kub/p1/mount/written")" = "by p1" ] || fail "the target reads other bytes after the restart"
wait_for 10 in_pod stat -f "$kub/p2/mount" || fail "the pod's target stays dead"
[ "$(in_pod cat "$kub/p2/mount/part-0")" = "dataset bytes" ] || fail "the pod reads other bytes"
in_pod sh -c "echo again > $kub/p1/mount/from-pod" || fail "the pod cannot write after the restart"
[ "$(cat "$kub/p2/mount/from-pod")" = "again" ] || fail "the pod's write is not seen"
if touch "$kub/p2/mount/nope" 2>/dev/null; then fail "the read-only target became writable"; fi
note "node daemon restarted: targets bound again, in the host and in the pod, ro kept"

# Again, with the metadata engine away while the node daemon comes back: the dead mount is
# kept until the filesystem answers, so the targets to bind again are not forgotten, and a
# mount that pods show is tried until it works.
kill -9 "$mounter"
wait "$mounter" 2>/dev/null || true
pkill -9 -f -- "--log $state2/log/" || fail "no filesystem daemon after the restart"
restart_redis 3 &
outage=$!
sleep 0.2
start_mounter
wait "$outage"
wait_for 30 stat -f "$kub/p1/mount" || fail "targets not back after the outage: $(tail -5 "$WORK/mounter.log")"
wait_for 10 in_pod stat -f "$kub/p2/mount" || fail "the pod's target stays dead after the outage"
[ "$(in_pod cat "$kub/p1/mount/from-pod")" = "again" ] || fail "the pod reads other bytes after the outage"
grep -q "cannot mount filesystem=csivol" "$WORK/mounter.log" || fail "the node daemon never met the outage"
note "node daemon restarted while Redis was away: targets bound again once it is back"

start_driver
client ext-unpublish
released() {
  ! grep -q " $state2/mnt/" /proc/self/mounts && [ -z "$(ls "$specs2"/*.json 2>/dev/null)" ] \
    && ! pgrep -f -- "--log $state2/log/"
}
wait_for 30 released || fail "the mount is not released: $(grep " $state2/" /proc/self/mounts); $(ls "$specs2"); $(tail -5 "$WORK/mounter.log")"
note "the last unpublish releases the filesystem's mount"
kill "$driver" "$mounter"
wait "$driver" "$mounter" 2>/dev/null || true

# A Fluid ThinRuntime's FUSE container: the configuration Fluid writes, mounted in the
# foreground at its targetPath.
cat >"$WORK/fluid.json" <<EOF
{"mounts": [{"mountPoint": "$META", "name": "csivol", "options": {"read-only": "true"}}],
 "targetPath": "$WORK/fluid/thin-fuse"}
EOF
"$AQUIFER" fluid-mount --config "$WORK/fluid.json" 2>>"$WORK/fluid.err" &
fluid=$!
CLEANUPS+=("kill -9 $fluid")
wait_for 20 mountpoint -q "$WORK/fluid/thin-fuse" || fail "fluid-mount did not mount: $(tail -3 "$WORK/fluid.err")"
[ "$(cat "$WORK/fluid/thin-fuse/datasets/set1/part-0")" = "dataset bytes" ] || fail "fluid-mount shows other bytes"
if touch "$WORK/fluid/thin-fuse/x" 2>/dev/null; then fail "the read-only option was not applied"; fi
kill "$fluid"
wait "$fluid" 2>/dev/null || true
! mountpoint -q "$WORK/fluid/thin-fuse" || fail "fluid-mount left its mount after SIGTERM"
echo '{"mounts": [], "targetPath": "/x"}' >"$WORK/fluid-bad.json"
"$AQUIFER" fluid-mount --config "$WORK/fluid-bad.json" 2>"$WORK/err" && fail "a Dataset without mounts was taken"
grep -q "exactly one mount" "$WORK/err" || fail "bad Fluid configuration error: $(cat "$WORK/err")"
note "aquifer fluid-mount mounts what a Fluid runtime configuration says"
echo "  ok"
