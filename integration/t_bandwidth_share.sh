#!/usr/bin/env bash
# The bandwidth share: eight ranks write and fsync a checkpoint burst on one mount while a
# reader on another mount of the same object store reads its whole dataset once, cold, every
# byte checked. With no upload limit on the checkpoint mount, the reader keeps completing
# reads while the burst runs (they are not queued behind its uploads); with --upload-limit
# 50 it also finishes its whole pass before the ranks finish theirs. How fast each side
# goes is noted, not asserted (the benchmark records it).
source "$(dirname "$0")/lib.sh"
own_s3_server
writers=
stop_all() {
  # Writers a failure left running are stopped before their files go.
  [ -z "$writers" ] || { kill "$writers" 2>/dev/null; wait "$writers" 2>/dev/null; } || true
  cleanup
}
trap stop_all EXIT
dropcaches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
secs() { printf '%d.%d' $(($1 / 1000)) $(($1 % 1000 / 100)); }  # secs MS (MS >= 0)

# Two volumes, each its own bucket on the one server: D holds the dataset, C the checkpoint.
"$AQUIFER" format "rocksdb://$WORK/d/meta" data --storage s3 --bucket "http://127.0.0.1:$S3_PORT/data" >/dev/null
"$AQUIFER" format "rocksdb://$WORK/c/meta" ckpt --storage s3 --bucket "http://127.0.0.1:$S3_PORT/ckpt" >/dev/null
MPD=$WORK/dmnt MPC=$WORK/cmnt
mount_d() { META=rocksdb://$WORK/d/meta mount_volume "$MPD" --cache-dir "$WORK/dcache"; DPID=$DAEMON_PID; }
mount_c() { META=rocksdb://$WORK/c/meta mount_volume "$MPC" --cache-dir "$WORK/ccache" "$@"; CPID=$DAEMON_PID; }
# cold_d: a fresh daemon on D with its disk cache and the page cache empty, so that every
# block of the reader's pass comes from the store.
cold_d() {
  DAEMON_PID=$DPID umount_volume "$MPD"
  rm -rf "$WORK/dcache"
  dropcaches
  mount_d
}

# The dataset: 200 files of 256 KiB and two of 16 MiB, with their checksums.
mkdir -p "$WORK/ds"
python3 - "$WORK/ds" <<'PY'
import hashlib, os, sys
d = sys.argv[1]
sizes = [(f"s{i:03d}", 256 << 10) for i in range(200)] + [("big1", 16 << 20), ("big2", 16 << 20)]
with open(f"{d}.sums", "w") as sums:
    for name, size in sizes:
        data = os.urandom(size)
        with open(f"{d}/{name}", "wb") as f:
            f.write(data)
        sums.write(f"{name} {hashlib.sha256(data).hexdigest()}\n")
PY
mount_d
cp "$WORK"/ds/* "$MPD/"
sync

# The reader: one pass over the dataset, each file whole, checked against its checksum.
# Prints the pass's end (ms since the epoch), its seconds, the longest wait for one file and
# the files that were wrong.
# The reader: one pass over the dataset, each file whole and checked against its checksum;
# WORK/timeline gets "END_MS NAME" as each file is done. Prints the pass's end (ms since the
# epoch), its seconds and the files that were wrong.
cat >"$WORK/reader.py" <<'PY'
import hashlib, sys, time
mp, sums, timeline = sys.argv[1], sys.argv[2], sys.argv[3]
start, bad = time.time(), []
with open(timeline, "w") as tl:
    for line in open(sums):
        name, want = line.split()
        h = hashlib.sha256()
        with open(f"{mp}/{name}", "rb") as f:
            while b := f.read(1 << 20):
                h.update(b)
        if h.hexdigest() != want:
            bad.append(name)
        tl.write(f"{int(time.time() * 1000)} {name}\n")
end = time.time()
print(int(end * 1000), f"{end - start:.2f}", " ".join(bad))
PY
read_pass() {  # read_pass LABEL: one cold pass; sets READ_END and READ_SECS
  local out bad
  out=$(timeout 300 python3 "$WORK/reader.py" "$MPD" "$WORK/ds.sums" "$WORK/timeline") \
    || fail "$1: the reader failed"
  read -r READ_END READ_SECS bad <<<"$out"
  [ -z "$bad" ] || fail "$1: the reader read wrong data in $bad"
}
cold_d
read_pass "alone"
alone=$READ_SECS
note "reader alone: 82 MiB (200 x 256 KiB, 2 x 16 MiB) in ${alone}s, cold"

# The ranks: each writes its shard (PREFIX.N) in 1 MiB pieces and fsyncs; WORK/started.N
# appears once rank N has written its first 8 MiB, and WORK/done gets "N END_MS ok|error"
# per rank.
N=8
cat >"$WORK/writers.py" <<'PY'
import os, sys, threading, time
mp, prefix, work = sys.argv[1], sys.argv[2], sys.argv[3]
n, mib = int(sys.argv[4]), int(sys.argv[5])
piece = os.urandom(1 << 20)
out, lock = [], threading.Lock()

def rank(i):
    status = "ok"
    try:
        fd = os.open(f"{mp}/{prefix}.{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for m in range(mib):
                os.write(fd, piece[m:] + piece[:m])
                if m == 7:
                    open(f"{work}/started.{i}", "w").close()
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        status = f"error {e}"
    with lock:
        out.append(f"{i} {int(time.time() * 1000)} {status}\n")

ts = [threading.Thread(target=rank, args=(i,)) for i in range(n)]
for t in ts:
    t.start()
for t in ts:
    t.join()
with open(f"{work}/done", "w") as f:
    f.write("".join(out))
PY

# burst LIMIT MIB: C mounted with --upload-limit LIMIT, the ranks writing MIB each; once
# every rank has written its first MiBs (the burst is uploading: 64 MiB fill the write
# half of the default buffers), a cold reader pass on D. Sets START, READ_START, FIRST and
# LAST (when the first and the last rank were done), all in ms.
burst() {
  local limit=$1 mib=$2
  mount_c --upload-limit "$limit"
  cold_d
  rm -f "$WORK"/started.* "$WORK/done"
  START=$(now_ms)
  timeout 300 python3 "$WORK/writers.py" "$MPC" "limit$limit" "$WORK" $N "$mib" &
  writers=$!
  for _ in $(seq 1 1200); do
    [ "$(find "$WORK" -maxdepth 1 -name 'started.*' | wc -l)" -eq $N ] && break
    kill -0 $writers 2>/dev/null || break
    sleep 0.05
  done
  [ "$(find "$WORK" -maxdepth 1 -name 'started.*' | wc -l)" -eq $N ] \
    || fail "upload limit $limit: the burst did not start"
  READ_START=$(now_ms)
  read_pass "upload limit $limit"
  wait $writers || fail "upload limit $limit: the writers did not finish"
  writers=
  [ "$(grep -c ' ok$' "$WORK/done")" -eq $N ] || fail "upload limit $limit: $(grep -v ' ok$' "$WORK/done" | head -1)"
  FIRST=$(awk '{print $2}' "$WORK/done" | sort -n | head -1)
  LAST=$(awk '{print $2}' "$WORK/done" | sort -n | tail -1)
  DAEMON_PID=$CPID umount_volume "$MPC"
  note "upload limit $limit: burst of $N x $mib MiB fsynced in $(secs $((LAST - START)))s; the reader, started $(secs $((READ_START - START)))s in, took ${READ_SECS}s (${alone}s alone)"
}
# done_before MS: how many of the reader's files were done before MS.
done_before() { awk -v t="$1" '$1 < t' "$WORK/timeline" | wc -l; }

# No upload limit: on loopback the burst takes the store and the CPUs (about 250 MiB/s here)
# and may well end before the reader's pass; what must hold is that reads go on meanwhile.
# Were they queued behind the uploads, none would be done before the first rank is.
burst 0 96
during=$(done_before "$FIRST")
if [ "$READ_END" -gt "$LAST" ]; then ended="$(secs $((READ_END - LAST)))s after"; else ended="$(secs $((LAST - READ_END)))s before"; fi
note "upload limit 0: $during of 202 files read while every rank was still writing; the pass ended $ended the last rank"
[ "$during" -ge 3 ] || fail "upload limit 0: only $during files were read while the burst ran"

# --upload-limit 50: the burst lasts at least its size over the limit (less the token
# bucket's burst, a tenth of a second's worth), sized here to three times the reader's pass alone and 3 s more:
# the reader, given its share, is done first.
limit=50
mib=$(awk -v a="$alone" -v l=$limit -v n=$N 'BEGIN {m = int(l * (3 * a + 4) / n) + 1; print (m < 32 ? 32 : m)}')
burst $limit "$mib"
[ "$READ_END" -lt "$LAST" ] || fail "upload limit $limit: the reader finished $((READ_END - LAST)) ms after the burst"
note "upload limit $limit: $(done_before "$FIRST") of 202 files read while every rank was still writing; the pass ended $(secs $((LAST - READ_END)))s before the last rank"
note "ok"
