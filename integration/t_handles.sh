#!/usr/bin/env bash
# File handles work (NFS re-export, handle-based tools): name_to_handle_at, then
# open_by_handle_at after the kernel has dropped the inode from its caches, for a plain
# file, a hard-linked one and a directory.
source "$(dirname "$0")/lib.sh"
new_volume handles
mp=$WORK/mnt
mount_volume "$mp"
mkdir "$mp/d"
echo plain >"$mp/d/plain"
echo linked >"$mp/d/a"
ln "$mp/d/a" "$mp/b"
python3 - "$mp" <<'PY' || fail "file handles"
import ctypes, ctypes.util, os, sys
mp = sys.argv[1]
libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
class Handle(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_uint), ("type", ctypes.c_int), ("f", ctypes.c_ubyte * 128)]
def handle(path):
    h = Handle(bytes=128)
    mid = ctypes.c_int()
    if libc.name_to_handle_at(-100, path.encode(), ctypes.byref(h), ctypes.byref(mid), 0) != 0:
        raise OSError(ctypes.get_errno(), f"name_to_handle_at {path}")
    return h
handles = {p: handle(f"{mp}/{p}") for p in ["d/plain", "d/a", "b", "d"]}
# Forget every cached dentry and inode: the kernel must ask the filesystem again.
os.sync()
open("/proc/sys/vm/drop_caches", "w").write("2")
mfd = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
for p, h in handles.items():
    flags = os.O_RDONLY | (os.O_DIRECTORY if p == "d" else 0)
    fd = libc.open_by_handle_at(mfd, ctypes.byref(h), flags)
    if fd < 0:
        e = ctypes.get_errno()
        print(f"open_by_handle_at {p}: {os.strerror(e)}")
        sys.exit(1)
    if p != "d":
        data = os.read(fd, 100)
        want = b"plain\n" if p == "d/plain" else b"linked\n"
        assert data == want, (p, data)
    os.close(fd)
print("  4 handles reopened after the caches were dropped")
PY
umount_volume "$mp"
note "ok"
