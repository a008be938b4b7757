#!/usr/bin/env bash
# Bounded read memory: a daemon mounted with --buffer-size 64 --mem-cache-size 32 reads
# 384 MiB of files, sequentially and at random offsets from 8 threads at once, twice; its
# peak RSS stays within the idle daemon + buffer-size + mem-cache-size + 64 MiB (the bound
# the Kubernetes manifests size their memory limits by), and every byte read is right.
source "$(dirname "$0")/lib.sh"
new_volume readmem
mp=$WORK/mnt
mount_volume "$mp"
python3 - "$mp" <<'PY' || fail "writing the files"
import os, sys
mp = sys.argv[1]
for i in range(48):
    with open(f"{mp}/f{i}", "wb") as f:
        f.write(bytes([i]) * (8 << 20))
PY
umount_volume "$mp"
mount_volume "$mp" --buffer-size 64 --mem-cache-size 32
base=$(awk '/VmRSS/ {print $2}' "/proc/$DAEMON_PID/status")
python3 - "$mp" <<'PY' || fail "reading"
import os, random, sys, threading
mp = sys.argv[1]
errors = []

def check(i, off, b):
    if b != bytes([i]) * len(b):
        errors.append(f"f{i} at {off}: other bytes")

def sequential(files):
    for i in files:
        with open(f"{mp}/f{i}", "rb") as f:
            off = 0
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                check(i, off, b)
                off += len(b)

def scattered(seed):
    r = random.Random(seed)
    for _ in range(300):
        i = r.randrange(48)
        off = r.randrange(0, (8 << 20) - (256 << 10))
        with open(f"{mp}/f{i}", "rb") as f:
            f.seek(off)
            check(i, off, f.read(256 << 10))

for _ in range(2):
    ts = [threading.Thread(target=sequential, args=(range(k, 48, 4),)) for k in range(4)]
    ts += [threading.Thread(target=scattered, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
if errors:
    sys.exit("; ".join(errors[:5]))
PY
peak=$(awk '/VmHWM/ {print $2}' "/proc/$DAEMON_PID/status")
note "768 MiB read by 8 threads, --buffer-size 64 --mem-cache-size 32: peak RSS $((peak / 1024)) MiB (idle $((base / 1024)) MiB)"
# The files are 12 times what the buffers and cache may hold: unbounded read-ahead or cache
# would show here.
[ "$peak" -lt $(( (64 + 32 + 64) * 1024 + base )) ] || fail "peak RSS $((peak / 1024)) MiB over the bound"
umount_volume "$mp"
note "ok"
