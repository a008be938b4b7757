#!/usr/bin/env bash
# Many processes at once: parallel writers of large and small files, creates and renames in
# one directory, readers of files being written by others; every byte checked.
source "$(dirname "$0")/lib.sh"
new_volume par
mp=$WORK/mnt
mount_volume "$mp"
mkdir "$mp/big" "$mp/small" "$mp/shared"
for i in $(seq 1 6); do head -c $((3000000 * i + 12345)) /dev/urandom >"$WORK/src-$i"; done

pids=()
for i in $(seq 1 6); do
  ( dd if="$WORK/src-$i" of="$mp/big/f$i" bs=$((64 * 1024 + i * 4096)) status=none conv=fsync ) & pids+=($!)
done
for j in $(seq 1 4); do
  ( for k in $(seq 1 300); do
      printf 'file %s %s\n' "$j" "$k" >"$mp/shared/t$j-$k"
      mv "$mp/shared/t$j-$k" "$mp/shared/f$j-$k"
    done ) & pids+=($!)
done
( for k in $(seq 1 400); do head -c 20000 /dev/zero | tr '\0' "$((k % 10))" >"$mp/small/s$k"; done ) & pids+=($!)
for p in "${pids[@]}"; do wait "$p" || fail "a writer failed"; done

for i in $(seq 1 6); do cmp "$WORK/src-$i" "$mp/big/f$i" || fail "big file $i differs"; done
[ "$(ls "$mp/shared" | wc -l)" = 1200 ] || fail "shared dir has $(ls "$mp/shared" | wc -l) entries, want 1200"
ls "$mp/shared" | grep -q '^t' && fail "a temporary name survived its rename"
for j in 1 4; do [ "$(cat "$mp/shared/f$j-300")" = "file $j 300" ] || fail "content of f$j-300"; done
for k in 7 123 400; do
  [ "$(tr -d "$((k % 10))" <"$mp/small/s$k" | wc -c)" = 0 ] || fail "small file s$k"
  [ "$(stat -c %s "$mp/small/s$k")" = 20000 ] || fail "size of s$k"
done

# A reader chases a writer that appends: whatever it reads is a prefix of what was written.
head -c 50000 "$WORK/src-1" | tail -c 250 >"$WORK/piece"
for k in $(seq 1 200); do cat "$WORK/piece"; done >"$WORK/grow"
( for k in $(seq 1 200); do cat "$WORK/piece" >>"$mp/big/grow"; done ) & w=$!
checks=0
while kill -0 "$w" 2>/dev/null; do
  cat "$mp/big/grow" >"$WORK/seen" 2>/dev/null || continue
  cmp -s "$WORK/seen" <(head -c "$(stat -c %s "$WORK/seen")" "$WORK/grow") || fail "reader saw bytes never written"
  checks=$((checks + 1))
done
wait $w || fail "appender failed"
note "reader checked $checks snapshots of the growing file"
cmp "$WORK/grow" "$mp/big/grow" || fail "appended file differs"
umount_volume "$mp"
mount_volume "$mp"
for i in $(seq 1 6); do cmp "$WORK/src-$i" "$mp/big/f$i" || fail "big file $i differs after remount"; done
cmp "$WORK/grow" "$mp/big/grow" || fail "appended file differs after remount"
umount_volume "$mp"
note "ok"
