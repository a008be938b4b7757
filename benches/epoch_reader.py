#!/usr/bin/env python3
"""One training epoch: every file under ROOT read whole, in an order shuffled by SEED, by
THREADS threads. Prints `files seconds bytes`."""
import os
import random
import sys
import threading
import time

root, seed, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# Hidden names are skipped: JuiceFS serves virtual files (.accesslog, .stats) in its root,
# and .accesslog never ends.
files = sorted(
    os.path.join(d, f)
    for d, _, fs in os.walk(root)
    for f in fs
    if not f.startswith(".")
)
random.Random(seed).shuffle(files)
lock = threading.Lock()
total = [0]
it = iter(files)


def work():
    n = 0
    buf = bytearray(1 << 20)
    while True:
        with lock:
            p = next(it, None)
        if p is None:
            break
        fd = os.open(p, os.O_RDONLY)
        try:
            while True:
                k = os.readv(fd, [buf])
                if k == 0:
                    break
                n += k
        finally:
            os.close(fd)
    with lock:
        total[0] += n


start = time.monotonic()
ts = [threading.Thread(target=work) for _ in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
print(len(files), f"{time.monotonic() - start:.3f}", total[0])
