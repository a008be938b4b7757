#!/usr/bin/env bash
# A corrupt or truncated block is EIO with the object named in the log, never wrong bytes;
# the blocks around it still read. No disk cache: it would hold intact copies (written
# through), which is the point of it but not of this test.
source "$(dirname "$0")/lib.sh"
new_volume corrupt
mp=$WORK/mnt
mount_volume "$mp" --cache-dir memory
head -c 6000000 /dev/urandom >"$WORK/data"
cp "$WORK/data" "$mp/f"
cp "$WORK/data" "$mp/g"
umount_volume "$mp"

# Each file has a 4 MiB block (_0_4194304) and a tail block (_1_1805696).
mapfile -t tails < <(find "$BLOCKS" -type f -name '*_1_1805696' | sort)
[ ${#tails[@]} -eq 2 ] || fail "expected two tail blocks, found ${#tails[@]}"
# Flip one byte in the middle of f's tail block; cut g's tail block short.
python3 - "${tails[0]}" <<'PY'
import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
b[500000] ^= 0x01
open(p, "wb").write(bytes(b))
PY
truncate -s 1000000 "${tails[1]}"

mount_volume "$mp" --cache-dir memory
for f in f g; do
  if cat "$mp/$f" >"$WORK/out-$f" 2>"$WORK/err-$f"; then fail "reading corrupt $f succeeded"; fi
  grep -q "Input/output error" "$WORK/err-$f" || fail "reading $f: $(cat "$WORK/err-$f")"
  # The intact first block still reads, and what was returned before the error is correct.
  head -c 4194304 "$mp/$f" | cmp - <(head -c 4194304 "$WORK/data") || fail "first block of $f"
  cmp -n "$(stat -c %s "$WORK/out-$f")" "$WORK/out-$f" "$WORK/data" || fail "wrong bytes returned from $f"
done
grep -q "$(basename "${tails[0]}")" "$WORK/mnt.log" || fail "log does not name the corrupt object"
umount_volume "$mp"
note "ok"
