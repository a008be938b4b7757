#!/usr/bin/env bash
# fsx: random reads, writes, truncates, fallocates, hole punches, mmaps and copies checked
# against a model, 100,000 operations in all over several seeds, on a volume with 64 KiB
# blocks so block and slice edges are crossed constantly.
source "$(dirname "$0")/lib.sh"
conf=$(cd "$(dirname "$0")" && pwd)/fsx.toml
new_volume fsx --block-size 64
mp=$WORK/mnt
mount_volume "$mp"
seeds=(1 7 42 1234)
ops=25000
if [ "${AQUIFER_TEST_STORAGE:-file}" = s3 ]; then
  # Every uncached read is a request to the S3 server: fewer operations, same coverage of
  # the store-specific paths.
  seeds=(3 99)
  ops=4000
fi
for seed in "${seeds[@]}"; do
  note "fsx seed $seed, $ops operations"
  (cd "$WORK" && fsx -q -f "$conf" -N "$ops" -S "$seed" -P "$WORK" "$mp/fsx-$seed") >"$WORK/fsx-$seed.log" 2>&1 \
    || { tail -40 "$WORK/fsx-$seed.log"; fail "fsx seed $seed"; }
done
umount_volume "$mp"
note "ok"
