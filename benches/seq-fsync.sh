#!/usr/bin/env bash
# Sequential write of SIZE (default 1G) in 1 MiB writes with fsync at the end (fio
# benches/fio/seq-write.fio, end_fsync=1) on the local disk and on aquifer's embedded
# default, alternating which goes first for ROUNDS rounds (default 2); page caches dropped
# before each. Prints one line per run and the ratio of medians.
#   benches/seq-fsync.sh [WORKDIR]      (needs root and fio)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=${1:-/var/tmp/aquifer-seq-fsync}
aquifer=${AQUIFER:-${CARGO_TARGET_DIR:-$root/target}/release/aquifer}
[ -x "$aquifer" ] || (cd "$root" && cargo build --release --locked -p aquifer-cli)
command -v fio >/dev/null || apt-get install -y -qq fio
export SIZE=${SIZE:-1G}
rm -rf "$work"; mkdir -p "$work"/{local,mnt}
"$aquifer" format "rocksdb://$work/meta" seqfsync --bucket "$work/blocks" >/dev/null
"$aquifer" mount -d "rocksdb://$work/meta" "$work/mnt" --log "$work/aq.log" >/dev/null
trap '"$aquifer" umount "$work/mnt" 2>/dev/null || true' EXIT
run() {  # run DIR: MiB/s of one fio run in DIR
  sync; echo 3 >/proc/sys/vm/drop_caches
  (cd "$1" && fio --output-format=json "$here/fio/seq-write.fio") |
    python3 -c "import json, sys; print(round(json.load(sys.stdin)['jobs'][0]['write']['bw'] / 1024, 1))"
  rm -f "$1/bench-seq"
}
: >"$work/results"
for r in $(seq 1 "${ROUNDS:-2}"); do
  order="local mnt"; [ $((r % 2)) -eq 0 ] && order="mnt local"
  for t in $order; do
    bw=$(run "$work/$t")
    echo "round $r: $([ "$t" = mnt ] && echo aquifer || echo local) $bw MiB/s" | tee -a "$work/results"
  done
done
python3 - "$work/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = lambda t: statistics.median(float(r[3]) for r in rows if r[2] == t)
l, a = med("local"), med("aquifer")
print(f"median: local {l:.0f} MiB/s, aquifer {a:.0f} MiB/s, aquifer / local {a / l:.2f}x")
PY
