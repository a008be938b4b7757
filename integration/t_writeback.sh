#!/usr/bin/env bash
# --writeback: with the object store stopped, writes and fsyncs succeed (blocks staged on the
# cache disk); kill -9 of the daemon, restart with the store back: the staged blocks are
# uploaded first and every fsynced byte is there, read back through a mount with no cache
# at all (so from the store). Staged blocks survive eviction pressure on a small cache.
# Its own S3 server (scripts/s3-server.sh), since this test stops it.
source "$(dirname "$0")/lib.sh"
root=$(cd "$(dirname "$0")/.." && pwd)
s3dir=$WORK/s3
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
s3() { "$root/scripts/s3-server.sh" "$1" "$s3dir" "$port"; }
eval "$(s3 start)"
CLEANUPS+=("$root/scripts/s3-server.sh stop $s3dir")

META="rocksdb://$WORK/wb/meta"
"$AQUIFER" format "$META" wb --storage s3 --bucket "$AQUIFER_TEST_S3/wb" >/dev/null
mp=$WORK/mnt
flags=(--cache-dir "$WORK/cache" --cache-size 64M --mem-cache-size 8M --writeback --metrics none)
mount_volume "$mp" "${flags[@]}"
staged() { "$AQUIFER" stats --json "$mp" | python3 -c 'import json,sys; print(json.load(sys.stdin)["staged_blocks"])'; }

# Uploaded before the stop: the data that eviction pressure comes from later.
head -c $((40 << 20)) /dev/urandom >"$WORK/before"
cp "$WORK/before" "$mp/before"
sync "$mp/before"
for _ in $(seq 1 100); do [ "$(staged)" -eq 0 ] && break; sleep 0.1; done
[ "$(staged)" -eq 0 ] || fail "blocks still staged with the store up"

s3 stop
mkdir -p "$WORK/src"
python3 - "$mp" "$WORK/src" <<'PY'
import os, sys
mp, src = sys.argv[1], sys.argv[2]
for i in range(12):
    data = os.urandom(100_000 + i * 300_000)
    for d in (mp, src):
        fd = os.open(f"{d}/f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
PY
n=$(staged)
note "staged with the store down: $n blocks"
[ "$n" -gt 0 ] || fail "nothing staged while the store was down"
# Pressure on the cache: the staged bytes count in its quota, so with the 40 MiB written
# through before the stop the cache is past its high watermark and evicting; reading adds
# more (the blocks it lacks cannot come: the store is down).
sync; echo 3 >/proc/sys/vm/drop_caches
timeout 5 cat "$mp/before" >/dev/null 2>&1 || true
sleep 1.5
du_after=$(du -s -B1 "$WORK/cache" | cut -f1)
note "cache du with the staged blocks: $du_after (quota $((64 << 20)))"
[ "$du_after" -le $(( (64 << 20) + (4 << 20) )) ] || fail "cache over its quota with staged blocks: $du_after"
[ "$(staged)" -eq "$n" ] || fail "staged blocks went away under eviction pressure ($(staged) of $n)"
for i in $(seq 0 11); do cmp "$WORK/src/f$i" "$mp/f$i" || fail "wrong bytes in f$i while staged"; done

# The crash, then the store back and a new mount: staged blocks upload before anything.
kill -9 "$DAEMON_PID"
for _ in $(seq 1 50); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
fusermount3 -uz "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
eval "$(s3 start)"
mount_volume "$mp" "${flags[@]}"
for _ in $(seq 1 300); do [ "$(staged)" -eq 0 ] && break; sleep 0.1; done
[ "$(staged)" -eq 0 ] || fail "blocks staged before the crash were not uploaded ($(staged) left)"
grep -q "uploading them first" "$WORK/mnt.log" || fail "the restart did not find the staged blocks"
umount_volume "$mp"

# From the store alone: no cache dir, no staging.
mount_volume "$mp" --cache-dir memory --metrics none
for i in $(seq 0 11); do cmp "$WORK/src/f$i" "$mp/f$i" || fail "f$i lost or wrong after the crash"; done
cmp "$WORK/before" "$mp/before" || fail "the file written before the stop is wrong"
umount_volume "$mp"
echo "  ok"
