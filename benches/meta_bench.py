#!/usr/bin/env python3
"""Metadata operations per second under DIR with THREADS threads (os calls release the GIL):
create (open O_CREAT|O_EXCL + close), stat, open (open O_RDONLY + close), readdir (entries
listed per second, each thread listing the whole directory), rename (within the directory),
unlink.

    meta_bench.py DIR FILES THREADS      prints "op<TAB>per_second" lines
"""
import os
import sys
import threading
import time

d, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(d, exist_ok=True)
names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
parts = [names[i::threads] for i in range(threads)]


def timed(work):
    errors = []

    def run(part):
        try:
            work(part)
        except OSError as e:
            errors.append(e)

    ts = [threading.Thread(target=run, args=(p,)) for p in parts]
    t = time.perf_counter()
    for x in ts:
        x.start()
    for x in ts:
        x.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t


def create(part):
    for p in part:
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))


def stat(part):
    for p in part:
        os.stat(p)


def open_close(part):
    for p in part:
        os.close(os.open(p, os.O_RDONLY))


listed = [0]


def readdir(part):
    # Each thread lists the whole directory (part only sets how many threads).
    k = len(os.listdir(d))
    listed[0] += k


def rename(part):
    for p in part:
        os.rename(p, p + ".r")


def unlink(part):
    for p in part:
        os.unlink(p + ".r")


out = {}
out["create"] = n / timed(create)
out["stat"] = n / timed(stat)
out["open"] = n / timed(open_close)
t = timed(readdir)
out["readdir_entries"] = listed[0] / t
out["rename"] = n / timed(rename)
out["unlink"] = n / timed(unlink)
for k, v in out.items():
    print(f"{k}\t{v:.0f}")
