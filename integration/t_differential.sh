#!/usr/bin/env bash
# The same random operations on the mount and on a local directory must give the same
# results and the same final tree, across a remount.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
new_volume diff
mp=$WORK/mnt
mount_volume "$mp"
# Fixed seeds, plus one new seed per run (printed, so a failure can be replayed).
extra=${DIFF_SEED:-$(( (RANDOM << 15) | RANDOM ))}
for seed in 1 2 3 "$extra"; do
  mkdir -p "$mp/s$seed" "$WORK/local/s$seed"
  python3 "$here/differential.py" "$mp/s$seed" "$WORK/local/s$seed" "$seed" 3000 \
    || fail "seed $seed diverged (replay: DIFF_SEED=$seed)"
done
umount_volume "$mp"
mount_volume "$mp"
diff -r --no-dereference "$mp" "$WORK/local" || fail "trees differ after remount"
umount_volume "$mp"
note "ok"
