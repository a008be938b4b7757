#!/usr/bin/env bash
# The disk cache on a volume whose blocks are in the S3 test server, counting GETs in the
# mount's store layer (`aquifer stats --json`): warmup --check reports 0% then 100%; after a
# warm-up, and after a restart, a full read makes no GET; a flipped byte in a cache file is
# a miss (right bytes) and the file is replaced; the cache disk made read-only, or its
# directory deleted, under a reader costs no error; `du` of the cache stays within its quota
# while reading 3x its size. The cache is on its own ext4 (a loop device) so read-only and
# free space are real.
source "$(dirname "$0")/lib.sh"
: "${AQUIFER_TEST_S3:?needs the S3 test server (scripts/test.sh starts it)}"
AQUIFER_TEST_STORAGE=s3 new_volume cached
uuid=$("$AQUIFER" status "$META" | python3 -c 'import json,sys; print(json.load(sys.stdin)["setting"]["uuid"])')

cdisk=$WORK/cdisk
mkfs_image "$WORK/cache.img" 256M
mount_image "$WORK/cache.img" "$cdisk"
croot=$cdisk/c/$uuid

quota=$((48 << 20))
mp=$WORK/mnt
flags=(--cache-dir "$cdisk/c" --cache-size 48M --mem-cache-size 8M --metrics none --cache-retry 2)
mount_volume "$mp" "${flags[@]}"

gets() { "$AQUIFER" stats --json "$mp" | python3 -c 'import json,sys; print(json.load(sys.stdin)["store"]["gets"])'; }
readall() { # compare every file with its source
  local f
  for f in "$WORK"/src/*; do cmp "$f" "$mp/data/$(basename "$f")" || fail "wrong bytes in $(basename "$f")"; done
}
dropcaches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# A cold read of big through the mount in the background, while a test does something to
# the cache; end_big_read WHILE: it must return the right bytes and no error.
start_big_read() {
  rm -f "$WORK/big.ok"
  dropcaches
  ( cmp "$WORK/big" "$mp/big" && touch "$WORK/big.ok" ) &
  reader=$!
}
end_big_read() {
  wait "$reader" || true
  [ -f "$WORK/big.ok" ] || fail "wrong bytes or an error reading big $1"
}

mkdir -p "$WORK/src" "$mp/data"
for i in $(seq 1 40); do head -c $(( (16 + i * 7) << 10 )) /dev/urandom >"$WORK/src/small$i"; done
head -c $((12 << 20)) /dev/urandom >"$WORK/src/large"
cp "$WORK"/src/* "$mp/data/"

# Written blocks were cached on the way (write-through); evict to start cold.
"$AQUIFER" warmup --evict "$mp/data" >/dev/null
out=$("$AQUIFER" warmup --check "$mp/data")
note "$out"
[[ "$out" == *"(0.0%)"* ]] || fail "expected 0% cached after --evict: $out"
out=$("$AQUIFER" warmup --threads 4 "$mp/data")
note "$out"
out=$("$AQUIFER" warmup --check "$mp/data")
note "$out"
[[ "$out" == *"(100.0%)"* ]] || fail "expected 100% cached after warmup: $out"
dropcaches
g0=$(gets); readall; g1=$(gets)
note "GETs for a full read after warmup: $((g1 - g0))"
[ "$g1" -eq "$g0" ] || fail "a full read after warmup made $((g1 - g0)) GETs"

# Restart: the index is rebuilt from the files; still no GET.
umount_volume "$mp"
mount_volume "$mp" "${flags[@]}"
dropcaches
g0=$(gets); readall; g1=$(gets)
note "GETs for a full read after a restart: $((g1 - g0))"
[ "$g1" -eq "$g0" ] || fail "a full read after a restart made $((g1 - g0)) GETs"

# A flipped byte in every cache file: right bytes (from the store), files replaced.
umount_volume "$mp"
n=0
while IFS= read -r -d '' f; do
  size=$(stat -c %s "$f")
  python3 - "$f" $((size / 2)) <<'PY'
import sys
p, at = sys.argv[1], int(sys.argv[2])
with open(p, "r+b") as f:
    f.seek(at); b = f.read(1); f.seek(at); f.write(bytes([b[0] ^ 0x40]))
PY
  n=$((n + 1))
done < <(find "$croot/blocks" -type f -print0)
note "flipped a byte in $n cache files"
[ "$n" -gt 0 ] || fail "no cache files under $croot"
mount_volume "$mp" "${flags[@]}"
dropcaches
g0=$(gets); readall; g1=$(gets)
note "GETs re-fetching the damaged blocks: $((g1 - g0))"
[ "$g1" -gt "$g0" ] || fail "damaged cache files were served"
"$AQUIFER" warmup "$mp/data" >/dev/null   # replaced files land before the next check
dropcaches
g0=$(gets); readall; g1=$(gets)
[ "$g1" -eq "$g0" ] || fail "the damaged cache files were not replaced ($((g1 - g0)) GETs)"

# 3x the quota read through a cache of 48 MiB: du stays within it.
head -c $((144 << 20)) /dev/urandom >"$WORK/big"
cp "$WORK/big" "$mp/big"
"$AQUIFER" warmup --evict "$mp/big" >/dev/null
maxdu=0
start_big_read
while kill -0 "$reader" 2>/dev/null; do
  d=$(du -s -B1 "$croot" | cut -f1)
  [ "$d" -gt "$maxdu" ] && maxdu=$d
  sleep 0.2
done
end_big_read "(3x the cache)"
note "largest du of the cache dir while reading 3x its quota: $maxdu (quota $quota)"
# One block may be in flight (being written, not yet counted).
[ "$maxdu" -le $((quota + (4 << 20) + 8192)) ] || fail "du $maxdu over the quota $quota"

"$AQUIFER" warmup --evict "$mp/big" >/dev/null
# The cache directory deleted under a reader: right bytes, no error; the cache comes back.
start_big_read
sleep 0.1
logpos=$(wc -l <"$WORK/mnt.log")
# The daemon may make directories again while rm walks the tree ("not empty"): that is
# the race under test, not a failure of it.
rm -rf "$croot" 2>/dev/null || rm -rf "$croot" 2>/dev/null || true
end_big_read "with its cache directory deleted"
readall
# Noticed at the next write or housekeeping round (every second): made again at once, or,
# when a write failed half-way through the removal, after --cache-retry; then filled.
for _ in $(seq 1 50); do [ -d "$croot/blocks" ] && break; sleep 0.1; done
sleep 2.5
tail -n +"$((logpos + 1))" "$WORK/mnt.log" | grep -qE "cache directory vanished|cache disk out of use" ||
  fail "the deleted cache directory was not noticed"
"$AQUIFER" warmup "$mp/data" >/dev/null
out=$("$AQUIFER" warmup --check "$mp/data")
[[ "$out" == *"(100.0%)"* ]] || fail "the cache did not come back after its directory was deleted: $out"
# The cache disk made read-only under a reader: right bytes, no error.
"$AQUIFER" warmup --evict "$mp/big" >/dev/null
start_big_read
sleep 0.1
logpos=$(wc -l <"$WORK/mnt.log")
# A remount to read-only fails (busy) while a cache file is open for writing: the reader
# fills the cache as it goes, so try again until a moment between two block writes.
for i in $(seq 1 100); do
  mount -o remount,ro "$cdisk" 2>/dev/null && break
  [ "$i" = 100 ] && fail "the cache disk could not be made read-only"
  sleep 0.02
done
end_big_read "with its cache disk read-only"
mount -o remount,rw "$cdisk"
tail -n +"$((logpos + 1))" "$WORK/mnt.log" | grep -q "cache disk out of use" ||
  fail "the read-only cache disk was not noticed"
# Tried again after --cache-retry (2s here): back in use.
sleep 3
"$AQUIFER" warmup "$mp/data" >/dev/null
out=$("$AQUIFER" warmup --check "$mp/data")
[[ "$out" == *"(100.0%)"* ]] || fail "the cache disk was not back in use after it became writable: $out"
readall

# Failures are named and the exit code says so.
if out=$("$AQUIFER" warmup "$mp/data/small1" "$mp/data/missing" 2>&1); then
  fail "warmup of a missing path exited 0"
fi
[[ "$out" == *"$mp/data/missing"* ]] || fail "warmup did not name the missing path: $out"
if "$AQUIFER" warmup --check "$WORK/src" >/dev/null 2>&1; then
  fail "warmup of files outside any aquifer mount exited 0"
fi
umount_volume "$mp"
echo "  ok"
