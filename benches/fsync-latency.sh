#!/usr/bin/env bash
# Latency of a small durable write: N (default 500) rounds of a 4 KiB pwrite at a random
# page of a 1 MiB file, then fsync (the pattern of msync after a mapped write, or of a
# database commit), on the local disk and on aquifer's embedded default, alternating which
# goes first for ROUNDS rounds (default 2). Prints the median and p99 per run and the ratio
# of medians.
#   benches/fsync-latency.sh [WORKDIR]      (needs root)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=${1:-/var/tmp/aquifer-fsync-latency}
aquifer=${AQUIFER:-${CARGO_TARGET_DIR:-$root/target}/release/aquifer}
[ -x "$aquifer" ] || (cd "$root" && cargo build --release --locked -p aquifer-cli)
rm -rf "$work"; mkdir -p "$work"/{local,mnt}
"$aquifer" format "rocksdb://$work/meta" fsynclat --bucket "$work/blocks" >/dev/null
"$aquifer" mount -d "rocksdb://$work/meta" "$work/mnt" --log "$work/aq.log" >/dev/null
trap '"$aquifer" umount "$work/mnt" 2>/dev/null || true' EXIT
run() {  # run DIR: "median_ms p99_ms" of one run in DIR
  python3 - "$1/bench-fsync" "${N:-500}" <<'PY'
import os, random, statistics, sys, time
path, n = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, os.urandom(1 << 20)); os.fsync(fd)
rng, lat = random.Random(1), []
for _ in range(n):
    off = rng.randrange(256) * 4096
    t = time.perf_counter()
    os.pwrite(fd, os.urandom(4096), off); os.fsync(fd)
    lat.append((time.perf_counter() - t) * 1000)
os.close(fd); os.unlink(path)
lat.sort()
print(f"{statistics.median(lat):.3f} {lat[int(len(lat) * 0.99) - 1]:.3f}")
PY
}
: >"$work/results"
for r in $(seq 1 "${ROUNDS:-2}"); do
  order="local mnt"; [ $((r % 2)) -eq 0 ] && order="mnt local"
  for t in $order; do
    read -r med p99 < <(run "$work/$t")
    echo "round $r: $([ "$t" = mnt ] && echo aquifer || echo local) median $med ms p99 $p99 ms" | tee -a "$work/results"
  done
done
python3 - "$work/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = lambda t: statistics.median(float(r[4]) for r in rows if r[2] == t)
l, a = med("local"), med("aquifer")
print(f"median fsync: local {l:.2f} ms, aquifer {a:.2f} ms, aquifer / local {a / l:.2f}x")
PY
