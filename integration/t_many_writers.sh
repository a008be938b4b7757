#!/usr/bin/env bash
# Bounded write memory: 200 files written at once, none closed, each holding a partial
# block; the daemon's peak RSS stays within --buffer-size plus a fixed overhead (the
# writers wait for uploads instead), and every file is intact after the closes.
source "$(dirname "$0")/lib.sh"
new_volume many
mp=$WORK/mnt
mkdir -p "$mp"
out=$("$AQUIFER" mount -d "$META" "$mp" --log "$WORK/mnt.log" --buffer-size 64) || fail "mount failed"
DAEMON_PID=$(sed -n 's/.*(pid \([0-9]*\),.*/\1/p' <<<"$out")
MOUNTS+=("$mp")
base=$(awk '/VmRSS/ {print $2}' "/proc/$DAEMON_PID/status")
python3 - "$mp" <<'PY' || fail "many writers"
import hashlib, os, sys
mp = sys.argv[1]
n, per, piece = 200, 2 << 20, 64 << 10
fds = [os.open(f"{mp}/w{i}", os.O_CREAT | os.O_WRONLY, 0o644) for i in range(n)]
sums = [hashlib.sha256() for _ in range(n)]
for off in range(0, per, piece):
    for i, fd in enumerate(fds):
        b = bytes([(i + off // piece) % 251]) * piece
        os.write(fd, b)
        sums[i].update(b)
for fd in fds:
    os.close(fd)
for i in range(n):
    with open(f"{mp}/w{i}", "rb") as f:
        assert hashlib.sha256(f.read()).digest() == sums[i].digest(), f"w{i} differs"
PY
peak=$(awk '/VmHWM/ {print $2}' "/proc/$DAEMON_PID/status")
note "200 open writers x 2 MiB, --buffer-size 64: peak RSS $((peak / 1024)) MiB (idle $((base / 1024)) MiB)"
# 64 MiB of buffers (half of it for writes) plus the idle daemon and allocator slack; the
# 400 MiB written would all be resident if tails were unbounded.
[ "$peak" -lt $(( (64 + 96) * 1024 + base )) ] || fail "peak RSS $((peak / 1024)) MiB"
umount_volume "$mp"
note "ok"
