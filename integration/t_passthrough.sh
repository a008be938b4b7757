#!/usr/bin/env bash
# FUSE passthrough: a file opened read-only whose blocks are all on the cache disk is read
# by the kernel from a whole-file copy, with no READ request reaching the daemon; a file
# changed since its copy was made is never served from the old copy; writers beside a
# passthrough reader work, and what they wrote is the file's after a remount; without
# CAP_SYS_ADMIN the daemon serves reads as before.
source "$(dirname "$0")/lib.sh"

new_volume pt
MP=$WORK/mnt
CACHE=$WORK/cache
mount_volume "$MP" --cache-dir "$CACHE" --cache-size 1G --passthrough

# stat_field NAME: a number from the mount's figures.
stat_field() { "$AQUIFER" stats "$MP" --json | python3 -c "import json,sys; f=json.load(sys.stdin); print($1)"; }
reads() { stat_field "f['fuse_ops'].get('read',0)"; }
pt_opens() { stat_field "f.get('passthrough_opens',0)"; }

mkdir "$MP/d"
for i in $(seq 1 20); do
  head -c $((i * 37000 + 1)) /dev/urandom >"$WORK/src$i"
  cp "$WORK/src$i" "$MP/d/f$i"
done
head -c $((9 << 20)) /dev/urandom >"$WORK/big"
cp "$WORK/big" "$MP/d/big"
# Small files' blocks are written through to the disk tier in the background; big's full
# blocks are not (--cache-writes small): its first read below caches them.
sync
sleep 1

check_all() {
  local i
  for i in $(seq 1 20); do
    cmp "$WORK/src$i" "$MP/d/f$i" || fail "f$i differs ($1)"
  done
  cmp "$WORK/big" "$MP/d/big" || fail "big differs ($1)"
}

# Drop the kernel's page cache of the mount, so reads that reach the daemon are counted.
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

check_all "first read"
# Blocks read enter the disk tier in the background: wait until all are there.
for _ in $(seq 1 100); do
  [[ "$("$AQUIFER" warmup --check "$MP/d")" == *"(100.0%)"* ]] && break
  sleep 0.1
done
drop_caches
r0=$(reads); p0=$(pt_opens)
check_all "warm read"
drop_caches
r1=$(reads); p1=$(pt_opens)
note "warm pass: $((r1 - r0)) READs, $((p1 - p0)) passthrough opens"
if grep -q "kernel has no FUSE passthrough" "$WORK/mnt.log"; then
  # A kernel before 6.9: what is left to check is that reads were right (above).
  note "SKIP: this kernel has no FUSE passthrough"; echo "t_passthrough: ok"; exit 0
fi
[ "$((p1 - p0))" -ge 21 ] || fail "warm files were not opened in passthrough ($((p1 - p0)) of 21)"
[ "$((r1 - r0))" -eq 0 ] || fail "$((r1 - r0)) READ requests reached the daemon for wholly cached files"
[ -n "$(find "$CACHE" -path '*/files/*' -type f | head -1)" ] || fail "no whole-file copies in the cache dir"

# A file larger than 256 MiB: its copy is made in the background after an open finds all
# its blocks cached (that open reads through the daemon); once made, it is read by the
# kernel.
head -c $((300 << 20)) /dev/urandom >"$WORK/huge"
cp "$WORK/huge" "$MP/d/huge"
cmp "$WORK/huge" "$MP/d/huge" || fail "huge differs (first read)"
drop_caches
cmp "$WORK/huge" "$MP/d/huge" || fail "huge differs (read while its copy is made)"
# An open starts the copy only once every block is on the cache disk (they land in the
# background, and on a busy machine some may be dropped from the disk's queue): warm what
# is missing and open it now and then until the copy is there.
for i in $(seq 1 1200); do
  [ -n "$(find "$CACHE" -path '*/files/*' -type f -size +299M | head -1)" ] && break
  [ $((i % 20)) -eq 1 ] && "$AQUIFER" warmup "$MP/d/huge" >/dev/null
  head -c 1 "$MP/d/huge" >/dev/null
  sleep 0.1
done
[ -n "$(find "$CACHE" -path '*/files/*' -type f -size +299M | head -1)" ] \
  || fail "no copy of the 300 MiB file was made: $(grep -i 'whole-file' "$WORK/mnt.log" | tail -2)"
drop_caches
r0=$(reads); p0=$(pt_opens)
cmp "$WORK/huge" "$MP/d/huge" || fail "huge differs (passthrough)"
r1=$(reads); p1=$(pt_opens)
[ "$((p1 - p0))" -ge 1 ] && [ "$((r1 - r0))" -eq 0 ] \
  || fail "the 300 MiB file was not read through the kernel ($((p1 - p0)) passthrough opens, $((r1 - r0)) READs)"
note "a 300 MiB file: copied in the background, then read with no READ reaching the daemon"
rm "$MP/d/huge" "$WORK/huge"

# A rewrite (same length, new bytes) through the mount: the next open must see new bytes.
head -c $((3 * 37000 + 1)) /dev/urandom >"$WORK/src3"
cp "$WORK/src3" "$MP/d/f3"
cmp "$WORK/src3" "$MP/d/f3" || fail "rewritten file served stale"
# An append while a passthrough reader holds the old version open.
exec 7<"$MP/d/f5"
printf 'tail' >>"$WORK/src5" 2>/dev/null || true
if cat "$WORK/src5" >"$MP/d/f5.new" && mv "$MP/d/f5.new" "$MP/d/f5"; then
  cmp "$WORK/src5" "$MP/d/f5" || fail "replaced file served stale"
fi
# Writers beside a passthrough reader (the kernel allows no other kind of open then): each
# write open shares the reader's copy, and what it writes reaches the file at its close.
# Every step is done to the mount's file and to a local reference copy, and the reader's
# descriptor, opened before, sees what a local file's reader would.
f0=$(stat_field "f.get('shared_opens',0)")
python3 - "$MP/d/f7" "$WORK/src7" <<'PY' || fail "writers beside a passthrough reader"
import mmap, os, sys
mnt, ref = sys.argv[1], sys.argv[2]
reader = os.open(mnt, os.O_RDONLY)
def both(fn):
    for p in (mnt, ref):
        fn(p)
    a = open(mnt, "rb").read(); b = open(ref, "rb").read()
    if a != b:
        sys.exit(f"{fn.__name__}: new open reads {len(a)} bytes, want {len(b)}")
    seen = os.pread(reader, len(b) + 10, 0)
    if seen != b:
        sys.exit(f"{fn.__name__}: the reader opened before sees {len(seen)} bytes, want {len(b)}")
def pwrite(p):
    fd = os.open(p, os.O_WRONLY); os.pwrite(fd, b"HELLO" * 300, 1000); os.close(fd)
def append(p):
    with open(p, "ab") as f: f.write(b"tail" * 5000)
def cut(p):
    os.truncate(p, 50_000)
def through_mmap(p):
    fd = os.open(p, os.O_RDWR)
    m = mmap.mmap(fd, 50_000); m[100:110] = b"mmapmmapmm"; m.flush(); m.close(); os.close(fd)
def rewrite(p):
    with open(p, "wb") as f: f.write(bytes(range(256)) * 400)
def fsynced(p):
    fd = os.open(p, os.O_RDWR); os.pwrite(fd, b"SYNC", 7); os.fsync(fd); os.close(fd)
for step in (pwrite, append, cut, through_mmap, rewrite, fsynced):
    both(step)
os.close(reader)
PY
f1=$(stat_field "f.get('shared_opens',0)")
[ "$((f1 - f0))" -ge 6 ] || fail "the writers did not share the reader's backing ($((f1 - f0)) shared opens)"
note "writers beside a passthrough reader: $((f1 - f0)) opens shared its copy"
exec 7<&-
sync; sleep 1
check_all "after rewrites"

# A copy damaged on the cache disk is never served: a changed copy is checked again at its next open.
copy=$(find "$CACHE" -path '*/files/*' -type f -size +100k | head -1)
[ -n "$copy" ] || fail "no copy to damage"
printf 'XXXX' | dd of="$copy" bs=1 seek=1000 conv=notrunc status=none
drop_caches
check_all "after damaging a copy"

# SIGTERM while a writer beside a passthrough reader has not closed: the daemon stores what
# was written into the copy before it exits.
exec 7<"$MP/d/f9"
rm -f "$WORK/ready"
python3 - "$MP/d/f9" "$WORK/src9" "$WORK/ready" <<'PY' &
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY)
os.pwrite(fd, b"written before SIGTERM", 500)
with open(sys.argv[2], "r+b") as f:
    f.seek(500); f.write(b"written before SIGTERM")
open(sys.argv[3], "w").close()
time.sleep(120)
PY
writer=$!
for _ in $(seq 1 100); do [ -e "$WORK/ready" ] && break; sleep 0.1; done
[ -e "$WORK/ready" ] || fail "the writer beside the reader did not start"
kill -TERM "$DAEMON_PID"
# Open files keep the mount busy: the daemon flushes, detaches lazily and waits for them.
# Once it has flushed, it is killed, so that the writer's close (a FLUSH that would store
# the copy too) cannot be what stored the bytes.
for _ in $(seq 1 100); do grep -q "detaching lazily" "$WORK/mnt.log" && break; sleep 0.1; done
grep -q "detaching lazily" "$WORK/mnt.log" || fail "SIGTERM: the daemon did not flush and detach"
kill -9 "$DAEMON_PID"
kill "$writer" 2>/dev/null || true
wait "$writer" 2>/dev/null || true
exec 7<&-
umount -l "$MP" 2>/dev/null || true
mount_volume "$MP" --cache-dir "$CACHE" --cache-size 1G --no-passthrough
cmp "$WORK/src9" "$MP/d/f9" || fail "a write through the copy was lost at SIGTERM"
note "SIGTERM with a writer beside a passthrough reader: its bytes stored"

# Without CAP_SYS_ADMIN the kernel refuses backing files: reads go through the daemon.
# The daemon runs as nobody (fusermount3 mounts for it) and so do the readers, since a
# FUSE mount without allow_other admits only its owner.
umount_volume "$MP"
chmod 755 "$WORK"
chown -R 65534:65534 "$WORK/pt" "$CACHE" "$MP" "$WORK/data" 2>/dev/null || chown -R 65534:65534 "$WORK/pt" "$CACHE" "$MP"
# fusermount3 opens /dev/fuse as the user (Debian makes it 0666; some images do not).
fuse_mode=$(stat -c %a /dev/fuse)
chmod 666 /dev/fuse
CLEANUPS+=("chmod $fuse_mode /dev/fuse")
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
as_nobody "$AQUIFER" mount -d "$META" "$MP" --cache-dir "$CACHE" --cache-size 1G --passthrough \
  --log "$WORK/pt/unpriv.log" >/dev/null || fail "mount as an unprivileged user failed"
MOUNTS+=("$MP")
chmod 644 "$WORK"/src* "$WORK/big"
stats_nobody() { as_nobody "$AQUIFER" stats "$MP" --json | python3 -c "import json,sys; f=json.load(sys.stdin); print($1)"; }
r0=$(stats_nobody "f['fuse_ops'].get('read',0)")
for i in $(seq 1 20); do
  as_nobody cmp "$WORK/src$i" "$MP/d/f$i" || fail "f$i differs without CAP_SYS_ADMIN"
done
as_nobody cmp "$WORK/big" "$MP/d/big" || fail "big differs without CAP_SYS_ADMIN"
r1=$(stats_nobody "f['fuse_ops'].get('read',0)")
p1=$(stats_nobody "f.get('passthrough_opens',0)")
[ "$p1" -eq 0 ] || fail "passthrough used without CAP_SYS_ADMIN"
[ "$((r1 - r0))" -gt 0 ] || fail "no READs counted without passthrough"
note "without CAP_SYS_ADMIN: $((r1 - r0)) READs, no passthrough"
as_nobody "$AQUIFER" umount "$MP"
echo "t_passthrough: ok"
