#!/usr/bin/env bash
# The CSI driver (`aquifer csi`) on a unix socket, called by a real gRPC client (grpcio,
# integration/csi_client.py) with a volume on Redis:
# - every call, error codes, idempotency (CreateVolume, DeleteVolume, publish, unpublish);
# - a publish gives a working mount at the target; a second pod shares it; a read-only
#   publish refuses writes; a static PV publishes an existing path;
# - kill -9 of the driver between publish and unpublish: the targets keep working and the
#   restarted driver finds them;
# - kill -9 of the filesystem daemon: publishing the target again repairs it;
# - unpublish leaves nothing mounted; delete removes the volume.
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
start_driver() {
  "$AQUIFER" csi --endpoint "unix://$sock" --node-id node-1 --mode all --state-dir "$state" \
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

note "kill -9 of the filesystem daemon"
pkill -9 -f -- "--log $state/log/" || fail "no filesystem daemon found"
sleep 0.5
if pgrep -f -- "--log $state/log/" >/dev/null; then
  fail "filesystem daemon still running: $(pgrep -af -- "--log $state/log/")"
fi
client stale || { grep " $WORK/" /proc/self/mountinfo; tail -20 "$WORK/csi.log"; ps -ef | grep -E "aquifer (mount|csi)" | grep -v grep; exit 1; }

client cleanup
kill "$driver"
wait "$driver" 2>/dev/null || true
[ ! -S "$sock" ] || fail "the socket is left after SIGTERM"
echo "  ok"
