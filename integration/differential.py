#!/usr/bin/env python3
"""Differential test: the same random namespace and data operations on the aquifer mount and
on a local directory; every result (bytes or errno) and the final trees must match.

    differential.py MOUNT_DIR LOCAL_DIR SEED OPS
"""
import errno, os, random, stat, sys

mnt, local, seed, nops = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
NAMES = ["a", "b", "c", "d", "e"]


def rel():
    depth = rng.randint(1, 3)
    return "/".join(rng.choice(NAMES) for _ in range(depth))


def run(root, op, args):
    """Apply op under root; return a comparable result."""
    p = lambda r: os.path.join(root, r)
    try:
        if op == "write":
            r, off, data = args
            fd = os.open(p(r), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, data, off)
            finally:
                os.close(fd)
            return "ok"
        if op == "read":
            r, off, n = args
            fd = os.open(p(r), os.O_RDONLY)
            try:
                return os.pread(fd, n, off)
            finally:
                os.close(fd)
        if op == "truncate":
            os.truncate(p(args[0]), args[1])
            return "ok"
        if op == "mkdir":
            os.mkdir(p(args[0]), 0o755)
            return "ok"
        if op == "rmdir":
            os.rmdir(p(args[0]))
            return "ok"
        if op == "unlink":
            os.unlink(p(args[0]))
            return "ok"
        if op == "rename":
            os.rename(p(args[0]), p(args[1]))
            return "ok"
        if op == "link":
            os.link(p(args[0]), p(args[1]))
            return "ok"
        if op == "symlink":
            os.symlink(args[0], p(args[1]))
            return "ok"
        if op == "stat":
            st = os.lstat(p(args[0]))
            size = st.st_size if not stat.S_ISDIR(st.st_mode) else 0
            return (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), size, st.st_nlink)
        if op == "listdir":
            return sorted(os.listdir(p(args[0])))
        if op == "chmod":
            os.chmod(p(args[0]), args[1])
            return "ok"
    except OSError as e:
        return ("errno", errno.errorcode.get(e.errno, e.errno))
    raise ValueError(op)


def gen():
    op = rng.choice(["write"] * 6 + ["read"] * 4 + ["truncate", "mkdir", "mkdir", "rmdir", "unlink",
                     "rename", "rename", "link", "symlink", "stat", "stat", "listdir", "chmod"])
    if op == "write":
        off = rng.choice([0, rng.randint(0, 70000), rng.randint(0, 9_000_000)])
        n = rng.choice([1, rng.randint(1, 5000), rng.randint(1, 300_000)])
        return op, (rel(), off, rng.randbytes(n))
    if op == "read":
        return op, (rel(), rng.randint(0, 9_500_000), rng.randint(1, 400_000))
    if op == "truncate":
        return op, (rel(), rng.choice([0, rng.randint(0, 100_000), rng.randint(0, 10_000_000)]))
    if op in ("rename", "link"):
        return op, (rel(), rel())
    if op == "symlink":
        return op, (rng.choice(NAMES), rel())
    if op == "chmod":
        return op, (rel(), rng.choice([0o644, 0o600, 0o755, 0o4755]))
    if op == "listdir":
        return op, (rng.choice(["", "a", "b", "a/b"]),)
    return op, (rel(),)


def tree(root):
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(dirs + files):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            entry = [os.path.relpath(full, root), stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_nlink]
            if stat.S_ISREG(st.st_mode):
                entry.append(open(full, "rb").read())
            elif stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(full))
            out.append(entry)
    return out


for i in range(nops):
    op, args = gen()
    a, b = run(mnt, op, args), run(local, op, args)
    if a != b:
        show = lambda x: x if not isinstance(x, bytes) else f"<{len(x)} bytes, first diff at {next((k for k in range(min(len(x), len(b) if isinstance(b, bytes) else 0)) if x[k] != b[k]), None)}>"
        print(f"op {i} {op} {[x if not isinstance(x, bytes) else len(x) for x in args]}: mount {show(a)} local {show(b)}")
        sys.exit(1)
if tree(mnt) != tree(local):
    print("final trees differ")
    sys.exit(1)
print(f"seed {seed}: {nops} operations identical")
