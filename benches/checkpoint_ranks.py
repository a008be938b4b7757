#!/usr/bin/env python3
"""Checkpoint ranks as in MLPerf Storage's checkpointing workload: RANKS threads start
together; in `write` mode each writes its own shard DIR/rank-N.ckpt of SIZE bytes in 1 MiB
writes, fsyncs and closes it (the save is done when close returns); in `read` mode each
reads its shard whole (the restore). A checkpoint is done when its slowest rank is, so the
time that counts is the slowest rank's.
    checkpoint_ranks.py write|read DIR RANKS SIZE_BYTES [STARTED_FILE]
With STARTED_FILE, that file is created the moment the ranks start, so that a job meant to
run beside them can start then (setting up the ranks takes a fraction of a second).
Prints `slowest_rank_seconds total_bytes start_unix end_unix`: the end is when the last
rank finished, on the wall clock so that the caller can line it up with other jobs."""
import os
import sys
import threading
import time

mode, root, ranks, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
started = sys.argv[5] if len(sys.argv) > 5 else None
chunk = 1 << 20
# Random bytes, so that no layer can compress them; one pool reused at shifting offsets
# (neither system deduplicates), since drawing 2 GiB from urandom would cost seconds of the
# CPU the daemons and the S3 server need.
pool = os.urandom(64 << 20) if mode == "write" else b""
barrier = threading.Barrier(ranks + 1)
took = [0.0] * ranks
done = [0] * ranks


def write(rank):
    barrier.wait()
    start = time.monotonic()
    fd = os.open(f"{root}/rank-{rank}.ckpt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    off, n = rank * 7 * chunk, 0
    view = memoryview(pool)
    while n < size:
        k = min(chunk, size - n)
        if off + k > len(pool):
            off = 0
        n += os.write(fd, view[off:off + k])
        off += k
    os.fsync(fd)
    os.close(fd)
    took[rank], done[rank] = time.monotonic() - start, n


def read(rank):
    buf = bytearray(chunk)
    barrier.wait()
    start = time.monotonic()
    fd = os.open(f"{root}/rank-{rank}.ckpt", os.O_RDONLY)
    n = 0
    while True:
        k = os.readv(fd, [buf])
        if k == 0:
            break
        n += k
    os.close(fd)
    took[rank], done[rank] = time.monotonic() - start, n


ts = [threading.Thread(target=write if mode == "write" else read, args=(r,)) for r in range(ranks)]
for t in ts:
    t.start()
barrier.wait()
t0 = time.time()
if started:
    open(started, "w").close()
for t in ts:
    t.join()
if any(n != size for n in done):
    sys.exit(f"{mode}: a rank moved {min(done)} bytes of {size}")
slowest = max(took)
print(f"{slowest:.3f} {sum(done)} {t0:.3f} {t0 + slowest:.3f}")
