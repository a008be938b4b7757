#!/usr/bin/env bash
# Two aquifer builds side by side, to tell whether a change moved a figure: the same jobs
# on each, in alternating order (A B, B A, ...), on one machine, in one run. For when a
# ratio to a peer fell between two runs of benches/compare.sh, s3.sh or meta-redis.sh and
# the question is whether our change or the machine moved.
#
#   benches/ab.sh MODE A_BIN B_BIN [ROUNDS]       (needs root)
#
# MODE:
#   redis      meta_bench.py (create, stat, readdir, rename, unlink of FILES=4000 files with
#              THREADS=8 threads) on two volumes of one Redis server (appendfsync everysec),
#              kernel caches off, plus each daemon's and the server's CPU per create;
#   embedded   fio seq-write (1 GiB, fsync at the end), small-write, and meta_ops.py's
#              create on the embedded default (RocksDB, blocks in a local directory);
#   s3         fio seq-write (2 GiB) and small-write to one s3s-fs server on 127.0.0.1,
#              with each daemon's CPU per GiB written.
# Prints one line per build per round.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
mode=${1:?usage: benches/ab.sh redis|embedded|s3 A_BIN B_BIN [ROUNDS]}
declare -A BIN=([A]=${2:?A_BIN} [B]=${3:?B_BIN})
rounds=${4:-4}
work=${WORK:-/var/tmp/aquifer-ab}
rm -rf "$work"; mkdir -p "$work"
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do
    "${BIN[A]}" umount "$m" >/dev/null 2>&1 || fusermount3 -uz "$m" 2>/dev/null || true
  done
  [ -n "${rport:-}" ] && redis-cli -p "$rport" shutdown nosave >/dev/null 2>&1
  [ -d "$work/s3" ] && "$root/scripts/s3-server.sh" stop "$work/s3"
  true
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
daemon() { pgrep -f "aquifer mount.* $1( |$)" | head -1; }
fio_job() { # DIR JOB -> "MiB/s ops/s"
  (cd "$1" && fio --output-format=json "$here/fio/$2.fio") | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"]
bw = sum(x["read"]["bw_bytes"] + x["write"]["bw_bytes"] for x in j) / 2**20
iops = sum(x["read"]["iops"] + x["write"]["iops"] for x in j)
print(f"{bw:.1f} {iops:.0f}")'
}
order() { [ $(($1 % 2)) = 1 ] && echo "A B" || echo "B A"; }

case $mode in
  redis)
    rport=$(free_port)
    mkdir -p "$work/redis"
    redis-server --port "$rport" --bind 127.0.0.1 --dir "$work/redis" --save "" --appendonly yes \
      --appendfsync everysec --daemonize yes --logfile "$work/redis/log" --pidfile "$work/redis/pid" >/dev/null
    sleep 0.5
    rpid=$(cat "$work/redis/pid")
    db=0
    for s in A B; do
      db=$((db + 1))
      "${BIN[$s]}" format "redis://127.0.0.1:$rport/$db" ab --storage file --bucket "$work/blocks-$s" >/dev/null
      mkdir -p "$work/mnt-$s"
      "${BIN[$s]}" mount -d "redis://127.0.0.1:$rport/$db" "$work/mnt-$s" --attr-cache 0 --entry-cache 0 \
        --metrics none --log "$work/$s.log" >/dev/null
      mounts+=("$work/mnt-$s")
    done
    files=${FILES:-4000}
    for r in $(seq "$rounds"); do
      for s in $(order "$r"); do
        d=$(daemon "$work/mnt-$s"); c0=$(ticks "$d"); r0=$(ticks "$rpid")
        out=$(python3 "$here/meta_bench.py" "$work/mnt-$s/r$r" "$files" "${THREADS:-8}" | tr '\n\t' ' =')
        c1=$(ticks "$d"); r1=$(ticks "$rpid")
        # (CPU over all five operations, per file.)
        echo "$s round $r: $out daemon_cpu_us_per_file=$(((c1 - c0) * 10000 / files)) redis_cpu_us_per_file=$(((r1 - r0) * 10000 / files))"
        rmdir "$work/mnt-$s/r$r"
      done
    done
    ;;
  embedded)
    for s in A B; do
      "${BIN[$s]}" format "rocksdb://$work/$s/meta" ab --bucket "$work/$s/blocks" >/dev/null
      mkdir -p "$work/mnt-$s"
      "${BIN[$s]}" mount -d "rocksdb://$work/$s/meta" "$work/mnt-$s" --log "$work/$s.log" >/dev/null
      mounts+=("$work/mnt-$s")
    done
    export SIZE=1G NRFILES=500
    for r in $(seq "$rounds"); do
      for s in $(order "$r"); do
        d=$work/mnt-$s/r$r; mkdir -p "$d/small"; export DIR=$d/small
        read -r bw _ < <(fio_job "$d" seq-write)
        sync; echo 3 >/proc/sys/vm/drop_caches
        read -r _ fps < <(fio_job "$d" small-write)
        create=$(python3 "$here/meta_ops.py" "$d/meta" 5000 | sed -n 's/^create_per_s\t//p')
        echo "$s round $r: seq_write_MiBps=$bw small_write_files_per_s=$fps create_per_s=$create"
        rm -rf "$d"; sync
      done
    done
    ;;
  s3)
    port=$(free_port)
    eval "$("$root/scripts/s3-server.sh" start "$work/s3" "$port")"
    export SIZE=2G NRFILES=200
    for s in A B; do
      "${BIN[$s]}" format "rocksdb://$work/$s/meta" ab --storage s3 --bucket "http://127.0.0.1:$port/ab-${s,,}" >/dev/null
    done
    for r in $(seq "$rounds"); do
      for s in $(order "$r"); do
        m=$work/mnt-$s; rm -rf "$work/cache-$s"; mkdir -p "$m"
        "${BIN[$s]}" mount -d "rocksdb://$work/$s/meta" "$m" --cache-dir "$work/cache-$s" --log "$work/$s.log" >/dev/null
        mounts+=("$m")
        sync; echo 3 >/proc/sys/vm/drop_caches
        d=$(daemon "$m"); c0=$(ticks "$d")
        read -r bw _ < <(fio_job "$m" seq-write)
        c1=$(ticks "$d")
        mkdir -p "$m/small"; export DIR=$m/small
        read -r _ fps < <(fio_job "$m" small-write)
        echo "$s round $r: seq_write_MiBps=$bw seq_write_cpu_s_per_GiB=$(echo "$c0 $c1" | awk -v t="$(getconf CLK_TCK)" '{printf "%.2f", ($2 - $1) / t / 2}') small_write_files_per_s=$fps"
        rm -rf "$m/bench-seq" "$m/small"
        "${BIN[$s]}" umount "$m"
      done
    done
    ;;
  *) echo "unknown mode $mode: redis, embedded or s3" >&2; exit 2 ;;
esac
