#!/usr/bin/env bash
# SIGTERM and SIGINT: the daemon commits buffered writes, unmounts and exits 0.
source "$(dirname "$0")/lib.sh"
new_volume sig
mp=$WORK/mnt
for sig in TERM INT; do
  mount_volume "$mp"
  head -c 3000000 /dev/urandom >"$WORK/data"
  cp "$WORK/data" "$mp/file-$sig"
  kill -s "$sig" "$DAEMON_PID"
  for _ in $(seq 1 100); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$DAEMON_PID" 2>/dev/null && fail "daemon ignored SIG$sig"
  grep -q " $mp fuse" /proc/self/mounts && fail "still mounted after SIG$sig"
  mount_volume "$mp"
  cmp "$WORK/data" "$mp/file-$sig" || fail "data lost across SIG$sig"
  umount_volume "$mp"
  note "SIG$sig ok"
done
