#!/usr/bin/env bash
# Nothing acknowledged is lost: data that was fsync'ed or closed survives kill -9 of the
# daemon and a remount.
source "$(dirname "$0")/lib.sh"
new_volume durable
mp=$WORK/mnt
mount_volume "$mp"

mkdir "$mp/d"
# Files closed normally (close = acknowledged), of several sizes across block and chunk edges.
for s in 0 1 4095 4194304 4194305 9000000 70000000; do
  head -c "$s" /dev/urandom >"$WORK/src-$s"
  cp "$WORK/src-$s" "$mp/d/closed-$s"
done
# A file written and fsync'ed but still open when the daemon dies.
head -c 5000000 /dev/urandom >"$WORK/src-open"
python3 - "$mp/d/open-fsynced" "$WORK/src-open" "$WORK/ready" <<'PY' &
import os, sys, time
dst, src, ready = sys.argv[1:4]
fd = os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644)
os.write(fd, open(src, "rb").read())
os.fsync(fd)
open(ready, "w").close()
time.sleep(60)
PY
writer=$!
for _ in $(seq 1 200); do [ -e "$WORK/ready" ] && break; sleep 0.05; done
[ -e "$WORK/ready" ] || fail "writer did not fsync"
# Metadata-only changes.
mkdir -p "$mp/d/x/y"; ln -s target "$mp/d/sym"; mv "$mp/d/closed-1" "$mp/d/renamed-1"

note "kill -9 the daemon $DAEMON_PID"
kill -9 "$DAEMON_PID"
kill "$writer" 2>/dev/null || true
wait "$writer" 2>/dev/null || true
fusermount3 -uz "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
sleep 0.5

mount_volume "$mp"
for s in 0 4095 4194304 4194305 9000000 70000000; do
  cmp "$WORK/src-$s" "$mp/d/closed-$s" || fail "closed file of $s bytes differs after kill -9"
done
cmp "$WORK/src-1" "$mp/d/renamed-1" || fail "renamed file differs"
cmp "$WORK/src-open" "$mp/d/open-fsynced" || fail "fsynced file differs after kill -9"
[ -d "$mp/d/x/y" ] || fail "directory lost"
[ "$(readlink "$mp/d/sym")" = target ] || fail "symlink lost"
umount_volume "$mp"
note "ok"
