#!/usr/bin/env bash
# Eight writers fsyncing checkpoint shards at once while the object store fails 10 % of the
# requests (integration/s3_fault_proxy.py between the daemon and the S3 test server: 500
# InternalError, 503 SlowDown, connections dropped mid-request, replies lost after the
# server acted, GET bodies cut short). Every shard is acknowledged (write, fsync and close
# all succeed) or reports an error, never neither; every acknowledged shard reads back byte
# for byte through the failing store, and again cold from it after a remount with the disk
# cache emptied; the daemon's peak RSS stays within --buffer-size + --mem-cache-size + 64 MiB.
source "$(dirname "$0")/lib.sh"
own_s3_server
pport=$(free_port)
proxy=
stop_all() {
  # Waited for: it writes its counts into WORK as it exits.
  [ -z "$proxy" ] || { kill "$proxy" 2>/dev/null; wait "$proxy" 2>/dev/null; } || true
  cleanup
}
trap stop_all EXIT

# The proxy starts without faults: format probes the store once, without retries.
FAULTS=$WORK/faults
echo 0 >"$WORK/share"
python3 "$ROOT/integration/s3_fault_proxy.py" "$pport" "$S3_PORT" "$FAULTS" \
  --seed "${FAULT_SEED:-24}" --control "$WORK/share" 2>"$WORK/proxy.log" &
proxy=$!
for _ in $(seq 1 50); do [ -s "$FAULTS" ] && break; sleep 0.1; done
[ -s "$FAULTS" ] || fail "the fault proxy did not start: $(cat "$WORK/proxy.log")"
faults() {  # faults NAME: what the proxy counted (as of the last fault or SIGUSR1)
  awk -v k="$1" '$1 == k {n = $2} END {print n + 0}' "$FAULTS"
}
recount() { kill -USR1 "$proxy"; sleep 0.2; }  # the counts as of now

# The bucket URL names the proxy: the client signs the proxy's address as Host, and the
# proxy passes that header on unchanged.
META=rocksdb://$WORK/v/meta
"$AQUIFER" format "$META" ckpt --storage s3 --bucket "http://127.0.0.1:$pport/ckpt" >/dev/null
echo 0.10 >"$WORK/share"
MP=$WORK/mnt
CACHE=$WORK/cache
BUF=64 MEMCACHE=16
# The bound: buffers and RAM cache as given, and 64 MiB for the rest of the daemon
# (runtimes, thread stacks, RocksDB, FUSE request buffers).
bound=$((BUF + MEMCACHE + 64))
mount_volume "$MP" --buffer-size $BUF --mem-cache-size ${MEMCACHE}M --cache-dir "$CACHE"
DAEMON1=$DAEMON_PID

N=8 MIB=32
mkdir -p "$WORK/src" "$MP/ckpt"
for i in $(seq 1 $N); do head -c $((MIB << 20)) /dev/urandom >"$WORK/src/shard$i"; done

# Each rank writes its shard in 1 MiB pieces, fsyncs and closes; a shard is acknowledged
# only when all three succeeded, and otherwise it reports the error.
cat >"$WORK/writers.py" <<'PY'
import os, sys, threading
src, dst, n, results = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
out, lock = [], threading.Lock()

def rank(i):
    name = f"shard{i}"
    try:
        fd = os.open(f"{dst}/{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            with open(f"{src}/{name}", "rb") as f:
                while piece := f.read(1 << 20):
                    mv = memoryview(piece)
                    while mv:
                        mv = mv[os.write(fd, mv):]
            os.fsync(fd)
        finally:
            os.close(fd)
        line = f"{name} ok"
    except OSError as e:
        line = f"{name} error {e}"
    with lock:
        out.append(line)

ts = [threading.Thread(target=rank, args=(i,)) for i in range(1, n + 1)]
for t in ts:
    t.start()
for t in ts:
    t.join()
with open(results, "w") as f:
    f.write("".join(l + "\n" for l in sorted(out)))
PY
start=$(date +%s%N)
timeout 300 python3 "$WORK/writers.py" "$WORK/src" "$MP/ckpt" $N "$WORK/results" \
  || fail "the writers did not finish"
ms=$(( ($(date +%s%N) - start) / 1000000 ))
acked=$(grep -c ' ok$' "$WORK/results" || true)
errored=$(grep -c ' error ' "$WORK/results" || true)
note "$N writers x $MIB MiB fsynced in $((ms / 1000)).$((ms % 1000 / 100))s: $acked acknowledged, $errored errors$(grep ' error ' "$WORK/results" | head -3 | sed 's/^/; /' | tr -d '\n')"
[ $((acked + errored)) -eq $N ] || fail "$((acked + errored)) of $N shards reported: $(cat "$WORK/results")"
# A tenth of requests failing is what the retries are for: every shard is acknowledged.
[ "$acked" -eq $N ] || fail "only $acked of $N shards acknowledged through retried faults: $(cat "$WORK/results")"
recount
put_faults=$(faults injected.PUT)
note "faults injected on PUTs while writing: $put_faults of $(faults requests.PUT) PUTs"
# The kinds take turns per method: four faults on PUTs were one of each kind a PUT gets.
[ "$put_faults" -ge 4 ] || fail "only $put_faults faults on PUTs: the writes were not tested"

# check LABEL: every acknowledged shard reads back byte for byte, eight readers at once.
check() {
  local name pids=() bad=0
  : >"$WORK/bad"
  for name in $(awk '$2 == "ok" {print $1}' "$WORK/results"); do
    ( timeout 300 cmp "$WORK/src/$name" "$MP/ckpt/$name" >/dev/null 2>&1 || echo "$name" >>"$WORK/bad" ) &
    pids+=($!)
  done
  wait "${pids[@]}"
  bad=$(wc -l <"$WORK/bad")
  recount
  [ "$bad" -eq 0 ] || fail "$1: not what was written: $(tr "\n" " " <"$WORK/bad")"
  note "$1: $acked acknowledged shards read back byte for byte ($(faults injected.GET) faults on $(faults requests.GET) GETs so far)"
}
sync; echo 3 >/proc/sys/vm/drop_caches
check "through the failing store"
peak1=$(awk '/VmHWM/ {print $2}' "/proc/$DAEMON1/status")

# Cold: a fresh daemon, no disk cache, no page cache; every block comes through the proxy.
umount_volume "$MP"
rm -rf "$CACHE"
sync; echo 3 >/proc/sys/vm/drop_caches
mount_volume "$MP" --buffer-size $BUF --mem-cache-size ${MEMCACHE}M --cache-dir "$CACHE"
check "after a remount, cold from the failing store"
peak2=$(awk '/VmHWM/ {print $2}' "/proc/$DAEMON_PID/status")
umount_volume "$MP"

summary=$(awk '$1 !~ /\./ {printf "%s %s, ", $1, $2}' "$FAULTS")
note "the proxy's counts: ${summary%, }"
for kind in 500 503 drop_request drop_reply cut_reply; do
  [ "$(faults "$kind")" -gt 0 ] || fail "no $kind fault was injected: $summary"
done

note "peak RSS: $((peak1 / 1024)) MiB writing and reading back, $((peak2 / 1024)) MiB reading cold; bound --buffer-size $BUF + --mem-cache-size $MEMCACHE + 64 = $bound MiB"
for p in "$peak1" "$peak2"; do
  [ "$p" -le $((bound * 1024)) ] || fail "peak RSS $((p / 1024)) MiB over the bound of $bound MiB"
done
note "ok"
