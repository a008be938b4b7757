#!/usr/bin/env python3
"""The side-by-side table of benches/s3.sh and benches/checkpoint.sh.

    table.py WORKDIR ROUNDS

WORKDIR/aquifer.tsv and WORKDIR/juicefs.tsv hold one "metric<TAB>value" line per metric
and round; prints a markdown table of each metric's median for both systems and their
ratio, and with several rounds the range of the per-round ratios.
"""
import statistics, sys
w, rounds = sys.argv[1], int(sys.argv[2])
def load(t):
    d = {}
    for line in open(f"{w}/{t}.tsv").read().split("\n"):
        if line:
            k, v = line.split("\t")
            d.setdefault(k, []).append(float(v))
    return d
A, J = load("aquifer"), load("juicefs")
med = statistics.median
if rounds > 1:
    print(f"Medians of {rounds} rounds; the last column is the range of the per-round ratios.")
    print()
print("| metric | aquifer | JuiceFS 1.4 | aquifer / JuiceFS |" + (" per round |" if rounds > 1 else ""))
print("|---|---|---|---|" + ("---|" if rounds > 1 else ""))
for k in A:
    a, j = med(A[k]), med(J.get(k, [0]))
    ratio = f"{a / j:.2f}x" if j else "-"
    row = f"| {k} | {a:.2f} | {j:.2f} | {ratio} |"
    if rounds > 1:
        rs = [x / y for x, y in zip(A[k], J.get(k, [])) if y]
        row += f" {min(rs):.2f}-{max(rs):.2f}x |" if rs else " - |"
    print(row)
