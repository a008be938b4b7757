#!/usr/bin/env python3
"""Changes made on mount A, watched for on mount B (both with long kernel cache times).

usage: follow_check.py A_DIR B_DIR BOUND_SECONDS

For each change (write, overwrite in place, truncate, chmod, rename, unlink, mkdir), B has
already looked at the file (its kernel caches the entry, the attributes and the pages);
the change is made on A and closed, then:
- B's next open reads exactly the new bytes, at once (close-to-open: no waiting);
- B's stat shows the change within BOUND_SECONDS (the follower's invalidation); the time
  it took is printed.
Exits 1 on the first miss.
"""
import json
import os
import sys
import time

a, b, bound = sys.argv[1], sys.argv[2], float(sys.argv[3])
took = {}


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def write(path, data, trunc=True):
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if trunc else 0)
    fd = os.open(path, flags, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def watch(name, seen):
    """Poll seen() on B until true; record how long it took."""
    t0 = time.monotonic()
    while True:
        try:
            if seen():
                break
        except FileNotFoundError:
            pass
        if time.monotonic() - t0 > bound:
            fail(f"{name}: B did not see A's change within {bound} s")
        time.sleep(0.001)
    took[name] = round((time.monotonic() - t0) * 1000, 1)


def gone(path):
    try:
        os.stat(path)
        return False
    except FileNotFoundError:
        return True


def look(path):
    """B looks at a file: entry, attributes and pages now in its kernel's caches."""
    os.stat(path)
    read(path)
    os.stat(path)


os.makedirs(f"{a}/fc", exist_ok=True)
one = os.urandom(200_000)
write(f"{a}/fc/f", one)
watch("create", lambda: os.stat(f"{b}/fc/f").st_size == len(one))
if read(f"{b}/fc/f") != one:
    fail("B read other bytes than A wrote")
look(f"{b}/fc/f")

# Overwritten in place: same length, other bytes. The next open on B reads them at once.
two = os.urandom(len(one))
write(f"{a}/fc/f", two, trunc=False)
if read(f"{b}/fc/f") != two:
    fail("B's open after A's close read stale bytes (same length, overwritten in place)")
watch("overwrite", lambda: os.stat(f"{b}/fc/f").st_mtime_ns == os.stat(f"{a}/fc/f").st_mtime_ns)
look(f"{b}/fc/f")

# Truncated, then written back to the same length: the size is as before, the bytes not.
os.truncate(f"{a}/fc/f", 100)
watch("truncate", lambda: os.stat(f"{b}/fc/f").st_size == 100)
if read(f"{b}/fc/f") != two[:100]:
    fail("B read other bytes than the truncated file's")
look(f"{b}/fc/f")
three = two[:100] + os.urandom(len(two) - 100)
fd = os.open(f"{a}/fc/f", os.O_WRONLY)
os.pwrite(fd, three[100:], 100)
os.close(fd)
if read(f"{b}/fc/f") != three:
    fail("B read stale bytes after a truncate and a write back to the length")
look(f"{b}/fc/f")

os.chmod(f"{a}/fc/f", 0o600)
watch("chmod", lambda: os.stat(f"{b}/fc/f").st_mode & 0o777 == 0o600)

os.rename(f"{a}/fc/f", f"{a}/fc/g")
watch("rename", lambda: gone(f"{b}/fc/f") and os.stat(f"{b}/fc/g").st_size == len(three))
if read(f"{b}/fc/g") != three:
    fail("B read other bytes under the new name")
look(f"{b}/fc/g")

os.unlink(f"{a}/fc/g")
watch("unlink", lambda: gone(f"{b}/fc/g"))

sorted(os.listdir(f"{b}/fc"))
os.mkdir(f"{a}/fc/d")
watch("mkdir", lambda: "d" in os.listdir(f"{b}/fc") and os.path.isdir(f"{b}/fc/d"))
os.rmdir(f"{a}/fc/d")
watch("rmdir", lambda: gone(f"{b}/fc/d") and "d" not in os.listdir(f"{b}/fc"))

print(json.dumps(took))
