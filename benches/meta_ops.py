#!/usr/bin/env python3
"""Metadata operations per second on DIR: create (open O_CREAT+close), stat, unlink."""
import os, sys, time

d, n = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
names = [os.path.join(d, f"f{i:06d}") for i in range(n)]
t = time.perf_counter()
for p in names:
    os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
create = n / (time.perf_counter() - t)
t = time.perf_counter()
for p in names:
    os.stat(p)
stat = n / (time.perf_counter() - t)
t = time.perf_counter()
for p in names:
    os.unlink(p)
unlink = n / (time.perf_counter() - t)
print(f"create_per_s\t{create:.0f}\nstat_per_s\t{stat:.0f}\nunlink_per_s\t{unlink:.0f}")
