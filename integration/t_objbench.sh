#!/usr/bin/env bash
# objbench measures a store alone and cleans up after itself; bandwidth limits are accepted
# by mounts and data still round-trips through them.
source "$(dirname "$0")/lib.sh"
"$AQUIFER" objbench --bucket "$WORK/store" --objects 8 --small-objects 32 --threads 2 >"$WORK/bench.txt" \
  || fail "objbench failed: $(cat "$WORK/bench.txt")"
for op in put get head delete "put small" "get small" "delete small"; do
  grep -q "^$op " "$WORK/bench.txt" || fail "objbench output lacks '$op': $(cat "$WORK/bench.txt")"
done
[ -z "$(find "$WORK/store" -type f)" ] || fail "objbench left objects behind"
touch "$WORK/not-a-dir"
if "$AQUIFER" objbench --bucket "$WORK/not-a-dir/x" --objects 1 2>"$WORK/err"; then fail "objbench on a bad bucket succeeded"; fi
[ "$(wc -l <"$WORK/err")" -eq 1 ] || fail "objbench error is not one line: $(cat "$WORK/err")"
note "bad bucket: $(cat "$WORK/err")"

new_volume limited
mp=$WORK/mnt
mkdir -p "$mp"
out=$("$AQUIFER" mount -d "$META" "$mp" --log "$WORK/limited.log" --upload-limit 64 --download-limit 64 --buffer-size 16 --max-downloads 3) || fail "mount with limits"
DAEMON_PID=$(sed -n 's/.*(pid \([0-9]*\),.*/\1/p' <<<"$out"); MOUNTS+=("$mp")
head -c 20000000 /dev/urandom >"$WORK/data"
cp "$WORK/data" "$mp/data"
umount_volume "$mp"
mount_volume "$mp"
cmp "$WORK/data" "$mp/data" || fail "data differs through rate-limited mount"
umount_volume "$mp"

# The limit holds: 32 MiB at 8 MiB/s (with at most 8 MiB of burst) cannot be stored in
# under 3 s (2.5 s allows for clock slack). Only a lower bound, so a slow machine cannot make this fail.
new_volume slow
out=$("$AQUIFER" mount -d "$META" "$mp" --log "$WORK/slow.log" --upload-limit 8) || fail "mount with --upload-limit"
DAEMON_PID=$(sed -n 's/.*(pid \([0-9]*\),.*/\1/p' <<<"$out")
head -c 33554432 /dev/urandom >"$WORK/d32"
start=$(date +%s.%N)
dd if="$WORK/d32" of="$mp/limited" bs=1M conv=fsync status=none || fail "write through the limit"
elapsed=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.2f", b - a}')
note "32 MiB through --upload-limit 8 took ${elapsed}s"
awk -v e="$elapsed" 'BEGIN {exit !(e >= 2.5)}' || fail "--upload-limit 8 let 32 MiB through in ${elapsed}s"
umount_volume "$mp"
mount_volume "$mp"
cmp "$WORK/d32" "$mp/limited" || fail "data differs after the limited write"
umount_volume "$mp"
note "ok"
