#!/usr/bin/env python3
"""Emulated accelerators in the manner of MLPerf Storage: N accelerators share the samples
of DIR (every file under it, shuffled with SEED). As in its data loaders, each accelerator
has READERS threads that read samples whole ahead of it into a queue of PREFETCH samples;
the accelerator takes one and sleeps COMPUTE seconds (its compute time for it).
Accelerator utilisation = compute time / (N x wall time).

usage: mlperf_reader.py DIR N COMPUTE [SEED]      prints: samples utilisation seconds
       (READERS, default 4, and PREFETCH, default 8, from the environment)
"""
import os
import queue
import random
import sys
import threading
import time

d, n, compute = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
seed = int(sys.argv[4]) if len(sys.argv) > 4 else 1
files = sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs)
random.Random(seed).shuffle(files)
lock = threading.Lock()
it = iter(files)
done = [0]
errors = []


READERS = int(os.environ.get("READERS", "4"))
PREFETCH = int(os.environ.get("PREFETCH", "8"))


def reader(q):
    while True:
        with lock:
            p = next(it, None)
        if p is None:
            q.put(None)
            return
        try:
            with open(p, "rb", buffering=0) as f:
                while f.read(4 << 20):
                    pass
        except OSError as e:
            errors.append(e)
            q.put(None)
            return
        q.put(p)


def accelerator():
    q = queue.Queue(PREFETCH)
    rs = [threading.Thread(target=reader, args=(q,)) for _ in range(READERS)]
    for r in rs:
        r.start()
    ended = 0
    while ended < READERS:
        if q.get() is None:
            ended += 1
            continue
        time.sleep(compute)
        with lock:
            done[0] += 1
    for r in rs:
        r.join()


t0 = time.monotonic()
ts = [threading.Thread(target=accelerator) for _ in range(n)]
for t in ts:
    t.start()
for t in ts:
    t.join()
wall = time.monotonic() - t0
if errors:
    sys.exit(f"read failed: {errors[0]}")
print(done[0], f"{done[0] * compute / (n * wall):.3f}", f"{wall:.2f}")
