#!/usr/bin/env bash
# fsync means durable: metadata and blocks on ext4 on a loop device; files are written and
# fsynced through the mount, then the device is copied with O_DIRECT at that instant (only
# what reached the disk is in the copy, as after a power cut: the kernel's periodic
# writeback is held off meanwhile, so nothing lands by luck). The copy is mounted and every
# fsynced file must read back byte for byte. Deletes must not have run ahead of the
# metadata that freed them either: fsck of the copy finds every fsynced file whole.
source "$(dirname "$0")/lib.sh"

img=$WORK/disk.img
disk=$WORK/disk
mkfs_image "$img" 768M
mount_image "$img" "$disk"
dev=$LOOPDEV

# Hold off periodic writeback so only explicit syncs reach the device.
for k in dirty_writeback_centisecs dirty_expire_centisecs; do
  CLEANUPS+=("echo $(cat /proc/sys/vm/$k) > /proc/sys/vm/$k")
done
echo 0 >/proc/sys/vm/dirty_writeback_centisecs
echo 360000 >/proc/sys/vm/dirty_expire_centisecs
sync

# Always the local-directory store: this is its durability under test.
META="rocksdb://$disk/meta"
"$AQUIFER" format "$META" cut --storage file --bucket "$disk/blocks" >/dev/null
mp=$WORK/mnt
mount_volume "$mp"

python3 - "$mp" "$WORK/expect" <<'PY'
import hashlib, os, random, sys
mp, expect = sys.argv[1:3]
rng = random.Random(7)
os.makedirs(os.path.join(mp, "ck", "deep"), exist_ok=True)
want = {}
def put(name, data, fsync):
    p = os.path.join(mp, name)
    fd = os.open(p, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    os.write(fd, data)
    if fsync:
        os.fsync(fd)
        want[name] = hashlib.sha256(data).hexdigest()
    os.close(fd)
# Checkpoint-like files across block and chunk edges, small files, a fresh directory.
for i, size in enumerate([1, 4096, 65537, 4 << 20, (4 << 20) + 1, 9_000_000, 70_000_000]):
    put(f"ck/shard-{i}", rng.randbytes(size), True)
for i in range(40):
    put(f"ck/deep/small-{i}", rng.randbytes(rng.randrange(1, 200_000)), True)
# Closed without fsync: no promise after a power cut (not checked, but must not break others).
for i in range(10):
    put(f"ck/unsynced-{i}", rng.randbytes(300_000), False)
# Rewritten and appended, then fsynced: the new content counts.
put("ck/shard-0", rng.randbytes(5_000_000), True)
p = os.path.join(mp, "ck/deep/small-0")
fd = os.open(p, os.O_WRONLY | os.O_APPEND)
extra = rng.randbytes(1_000_000)
os.write(fd, extra)
os.fsync(fd)
os.close(fd)
data = open(p, "rb").read()
want["ck/deep/small-0"] = hashlib.sha256(data).hexdigest()
# Deleted files: their blocks go only after the unlink is durable.
for i in range(30, 40):
    os.unlink(os.path.join(mp, f"ck/deep/small-{i}"))
    del want[f"ck/deep/small-{i}"]
fd = os.open(os.path.join(mp, "ck"), os.O_RDONLY)
os.fsync(fd)
os.close(fd)
with open(expect, "w") as f:
    for k, v in sorted(want.items()):
        f.write(f"{v}  {k}\n")
PY
sleep 1.5  # the trash worker runs: its deletes must wait for durable metadata

# power_cut DEVICE IMAGE: freeze the daemon, copy what reached DEVICE into IMAGE (a power
# cut at that instant), kill everything, then boot from the copy at the same path (the
# volume's settings name it) and mount it again. Sets $dev to the copy's loop device.
power_cut() {
  kill -STOP "$DAEMON_PID"
  dd if="$1" of="$2" bs=4M iflag=direct status=none
  kill -9 "$DAEMON_PID"
  kill -CONT "$DAEMON_PID" 2>/dev/null || true
  fusermount3 -uz "$mp" 2>/dev/null || umount -l "$mp"
  umount "$disk"
  mount_image "$2" "$disk"
  dev=$LOOPDEV
  mount_volume "$mp"
}
power_cut "$dev" "$WORK/copy.img"
n=$(wc -l <"$WORK/expect")
(cd "$mp" && sha256sum -c --quiet "$WORK/expect") || fail "fsynced files differ after the power cut"
note "$n fsynced files intact after the power cut"
umount_volume "$mp"
"$AQUIFER" fsck "$META" --path /ck/deep --deep >"$WORK/fsck.out" || {
  # Unsynced files may be broken; only the fsynced ones are promised.
  grep "broken:" "$WORK/fsck.out" | grep -v "unsynced-" && fail "fsck finds fsynced files broken"
}

# Small fsyncs are made durable through the metadata log (their block files are not synced
# yet): a power cut right after them, before any checkpoint, must find them whole, put back
# into the store from that log when the volume is mounted.
mount_volume "$mp"
python3 - "$mp" "$WORK/expect2" <<'PY'
import hashlib, os, random, sys
mp, expect = sys.argv[1:3]
rng = random.Random(11)
os.makedirs(os.path.join(mp, "j"), exist_ok=True)
want = {}
for i in range(50):
    data = rng.randbytes(rng.randrange(1, 100_000))
    fd = os.open(os.path.join(mp, f"j/f{i}"), os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    want[f"j/f{i}"] = data
# A page rewritten in place, as a database or msync does, then fdatasync.
fd = os.open(os.path.join(mp, "j/f0"), os.O_RDWR)
os.pwrite(fd, b"\xab" * 4096, 0)
os.fdatasync(fd)
os.close(fd)
want["j/f0"] = b"\xab" * 4096 + want["j/f0"][4096:]
with open(expect, "w") as f:
    for k, v in sorted(want.items()):
        f.write(f"{hashlib.sha256(v).hexdigest()}  {k}\n")
PY
before=$(grep -c "put back journaled objects" "$WORK/mnt.log" || true)
power_cut "$dev" "$WORK/copy2.img"
(cd "$mp" && sha256sum -c --quiet "$WORK/expect2") || fail "small fsynced files differ after the power cut"
after=$(grep -c "put back journaled objects" "$WORK/mnt.log" || true)
[ "$after" -gt "$before" ] || fail "the mount put nothing back from the journal (were the blocks synced after all?)"
note "51 small fsyncs intact after the power cut, put back from the journal"
umount_volume "$mp"
note "ok"
