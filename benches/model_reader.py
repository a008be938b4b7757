#!/usr/bin/env python3
"""Load a safetensors-style file the way model loaders do: mmap it, read the header, then
touch every tensor in a random order (seeded), copying its bytes out of the mapping.

usage: model_reader.py FILE [make SIZE_MIB]   (make: write such a file first)
Prints: tensors bytes seconds
"""
import json
import mmap
import os
import random
import struct
import sys
import time

path = sys.argv[1]
if len(sys.argv) > 2 and sys.argv[2] == "make":
    size = int(sys.argv[3]) << 20
    r = random.Random(26)
    tensors, off = {}, 0
    i = 0
    while off < size:
        n = min(r.choice([1, 2, 4, 8, 16, 32]) << 20, size - off)
        tensors[f"layer.{i}.weight"] = {"dtype": "BF16", "shape": [n // 2], "data_offsets": [off, off + n]}
        off += n
        i += 1
    header = json.dumps(tensors).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        left = off
        while left:
            k = min(left, 8 << 20)
            f.write(os.urandom(k))
            left -= k
    sys.exit(0)

t0 = time.monotonic()
with open(path, "rb") as f:
    mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
(hlen,) = struct.unpack("<Q", mm[:8])
tensors = json.loads(mm[8 : 8 + hlen])
base = 8 + hlen
order = list(tensors.items())
random.Random(7).shuffle(order)
total = 0
for _, t in order:
    a, b = t["data_offsets"]
    buf = mm[base + a : base + b]
    total += len(buf)
mm.close()
print(len(order), total, f"{time.monotonic() - t0:.3f}")
