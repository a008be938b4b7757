#!/usr/bin/env bash
# gc on a live volume (Redis: gc runs while mounts are up).
# - A slow appender: 9 MiB written to a file that stays open, nothing committed yet; `gc
#   --delete --min-age 0s` must spare its uploaded blocks (a live session may still commit
#   them), so after close the file reads back byte for byte, not EIO.
# - The blocks of a deleted file stay for the free grace period (measured on the Redis
#   server's clock) and go after it.
source "$(dirname "$0")/lib.sh"
redis_meta
BLOCKS=$WORK/blocks
"$AQUIFER" format "$META" live --storage file --bucket "$BLOCKS" >/dev/null
mp=$WORK/mnt
mount_volume "$mp" --free-grace 5s
objects() { find "$BLOCKS" -type f -not -path '*/.free/*' -name '*_*_*' | wc -l; }
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

note "gc --delete --min-age 0s while a file is open and uncommitted"
head -c $((9 << 20)) /dev/urandom >"$WORK/src"
python3 - "$mp/slow" "$WORK/src" "$WORK/written" "$WORK/close" <<'PY' &
import os, sys, time
dst, src, written, close = sys.argv[1:5]
fd = os.open(dst, os.O_CREAT | os.O_WRONLY, 0o644)
data = open(src, "rb").read()
os.write(fd, data)
open(written, "w").close()
while not os.path.exists(close):
    if os.getppid() == 1:  # the test is gone
        sys.exit(1)
    time.sleep(0.05)
os.close(fd)  # commits: fails if its blocks were deleted under it
open(close + ".done", "w").close()
PY
writer=$!
CLEANUPS+=("kill $writer")
for _ in $(seq 1 300); do [ -e "$WORK/written" ] && break; sleep 0.1; done
[ -e "$WORK/written" ] || fail "the writer did not write"
# Its full blocks (4 MiB each) are uploaded in the background: wait until they are there.
for _ in $(seq 1 100); do [ "$(objects)" -ge 2 ] && break; sleep 0.1; done
[ "$(objects)" -ge 2 ] || fail "the writer's blocks were not uploaded"
"$AQUIFER" gc "$META" --delete --min-age 0s >"$WORK/gc1.json" 2>"$WORK/gc1.err" \
  || fail "gc --delete on a live volume: $(cat "$WORK/gc1.err")"
note "gc: $(tr -d '\n ' <"$WORK/gc1.json")"
[ "$(field "$WORK/gc1.json" deleted)" = 0 ] || fail "gc deleted a live writer's blocks: $(cat "$WORK/gc1.json")"
[ "$(field "$WORK/gc1.json" spared_live)" -ge 2 ] || fail "gc did not say it spared the live writer's blocks"
touch "$WORK/close"
wait "$writer" || fail "close of the slow file failed"
[ -e "$WORK/close.done" ] || fail "the writer did not close"
cmp "$WORK/src" "$mp/slow" || fail "the slow file does not read back as written"
sleep 1.2  # past the attribute and page caches
echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
cmp "$WORK/src" "$mp/slow" || fail "the slow file does not read back as written (uncached)"
# Nothing is leaked now: a second gc finds nothing of the file's.
"$AQUIFER" gc "$META" --min-age 0s >"$WORK/gc2.json" 2>/dev/null || fail "gc"
[ "$(field "$WORK/gc2.json" leaked)" = 0 ] || fail "objects left unreferenced: $(cat "$WORK/gc2.json")"

note "freed blocks outlive the grace period (5 s on the server's clock)"
before=$(objects)
rm "$mp/slow"
sleep 1
[ "$(objects)" = "$before" ] || fail "blocks of the deleted file went before the grace period"
# Not by gc either: the trash it frees follows the same grace.
"$AQUIFER" gc "$META" --delete --min-age 0s --free-grace 5s >"$WORK/gc3.json" 2>/dev/null || fail "gc"
[ "$(field "$WORK/gc3.json" trash_freed)" = 0 ] || fail "gc freed young trash: $(cat "$WORK/gc3.json")"
[ "$(objects)" = "$before" ] || fail "gc deleted blocks of young trash"
for _ in $(seq 1 200); do [ "$(objects)" = 0 ] && break; sleep 0.1; done
[ "$(objects)" = 0 ] || fail "$(objects) of $before blocks left long after the grace period"
umount_volume "$mp"
note "ok"
