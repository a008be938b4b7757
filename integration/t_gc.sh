#!/usr/bin/env bash
# Leaks are found and collected: kill -9 during a large write leaves uploaded, uncommitted
# blocks; gc reports them, spares young ones, and gc --delete removes exactly them (every
# file still reads, nothing is left to collect). fsck passes on the intact volume and names
# the file whose block was removed.
source "$(dirname "$0")/lib.sh"
new_volume gc
mp=$WORK/mnt
mount_volume "$mp"
for i in 1 2 3; do
  head -c $((i * 3000000)) /dev/urandom >"$WORK/f$i"
  cp "$WORK/f$i" "$mp/f$i"
done
# A large write killed half-way: chunk 0 (64 MiB) is committed, the blocks uploaded for
# chunk 1 are not.
python3 - "$mp/big" "$WORK/half" <<'PY' &
import os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644)
block = os.urandom(1 << 20)
for i in range(100):
    os.write(fd, block)
open(sys.argv[2], "w").close()
time.sleep(60)
PY
writer=$!
for _ in $(seq 1 300); do [ -e "$WORK/half" ] && break; sleep 0.1; done
[ -e "$WORK/half" ] || fail "writer did not get half-way"
sleep 1  # let the uploads of chunk 1 land
kill -9 "$DAEMON_PID"
kill "$writer" 2>/dev/null || true
wait "$writer" 2>/dev/null || true
fusermount3 -uz "$mp" 2>/dev/null || umount -l "$mp"
sleep 0.5
# A temp file of a put killed long ago.
tmpf=$(find "$BLOCKS" -type f -name '*_0_*' | head -1).tmp-999.0
echo half >"$tmpf"
touch -d '2 hours ago' "$tmpf"

field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
"$AQUIFER" gc "$META" --min-age 0 >"$WORK/gc1.json" 2>/dev/null || fail "gc failed"
leaked=$(field "$WORK/gc1.json" leaked)
note "gc: $leaked leaked objects ($(field "$WORK/gc1.json" leaked_bytes) bytes)"
[ "$leaked" -ge 3 ] || fail "expected the uncommitted blocks of chunk 1 and the temp file, got $leaked"
# Default --min-age (1h) spares everything but the old temp file.
"$AQUIFER" gc "$META" --delete >"$WORK/gc2.json" 2>/dev/null || fail "gc --delete failed"
[ "$(field "$WORK/gc2.json" deleted)" = 1 ] || fail "gc --delete with the default min age: $(cat "$WORK/gc2.json")"
[ -e "$tmpf" ] && fail "the old temp file is still there"
# Objects, not the store's pool of freed inodes.
objects() { find "$BLOCKS" -path '*/.free' -prune -o -type f -print | wc -l; }
before=$(objects)
"$AQUIFER" gc "$META" --delete --min-age 0 >"$WORK/gc3.json" 2>/dev/null || fail "gc --delete failed"
deleted=$(field "$WORK/gc3.json" deleted)
after=$(objects)
[ "$deleted" = $((leaked - 1)) ] || fail "deleted $deleted of $((leaked - 1)) leaked objects"
[ $((before - after)) = "$deleted" ] || fail "$((before - after)) files went, gc says $deleted"
"$AQUIFER" gc "$META" --min-age 0 >"$WORK/gc4.json" 2>/dev/null
[ "$(field "$WORK/gc4.json" leaked)" = 0 ] || fail "leaks left after gc --delete"
"$AQUIFER" fsck "$META" --deep >"$WORK/fsck1" || fail "fsck of an intact volume: $(cat "$WORK/fsck1")"
mount_volume "$mp"
for i in 1 2 3; do cmp "$WORK/f$i" "$mp/f$i" || fail "f$i differs after gc"; done
[ "$(stat -c %s "$mp/big")" -ge $((64 << 20)) ] || fail "the committed chunk of big is gone"
head -c $((64 << 20)) "$mp/big" >/dev/null || fail "the committed chunk of big does not read"
umount_volume "$mp"

# Remove one block of f2: fsck names f2 and fails.
"$AQUIFER" fsck "$META" >/dev/null || fail "fsck before the damage"
# f2 is 6,000,000 bytes: its second block is the only one of 1,805,696 bytes.
victim=$(find "$BLOCKS" -type f -name '*_1_1805696')
[ "$(wc -l <<<"$victim")" = 1 ] || fail "expected one tail block of f2: $victim"
rm -f "$victim"
if "$AQUIFER" fsck "$META" >"$WORK/fsck2"; then fail "fsck passed with a block missing"; fi
grep -q "^broken: /f2 " "$WORK/fsck2" || fail "fsck did not name /f2: $(cat "$WORK/fsck2")"
grep -v "^broken: /f2 " "$WORK/fsck2" | grep -q "^broken:" && fail "fsck blamed other files: $(cat "$WORK/fsck2")"
grep -q "missing" "$WORK/fsck2" || fail "fsck did not say the block is missing"
note "$(tail -1 "$WORK/fsck2")"
note "ok"
