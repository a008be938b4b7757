#!/usr/bin/env bash
# A checkpoint burst — shards of full blocks, fsynced, three times the cache disk's size —
# written while a reader keeps re-reading a small hot set: the burst's blocks stay out of
# the disk cache (--cache-writes small, the default, keeps only the blocks of files smaller
# than one block, stored at close or fsync), and afterwards the hot set is still served with the object store stopped. With
# --cache-writes all, written full blocks are cached: the option does what it says.
source "$(dirname "$0")/lib.sh"
own_s3_server
META=rocksdb://$WORK/v/meta
"$AQUIFER" format "$META" ckpt --storage s3 --bucket "http://127.0.0.1:$S3_PORT/ckpt" >/dev/null
MP=$WORK/mnt
CACHE=$WORK/cache
dropcaches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
mount_volume "$MP" --cache-dir "$CACHE" --cache-size 64M --mem-cache-size 8M

mkdir -p "$WORK/hot" "$MP/hot" "$MP/ckpt"
for i in $(seq 1 16); do head -c $((512 << 10)) /dev/urandom >"$WORK/hot/f$i"; done
cp "$WORK"/hot/* "$MP/hot/"
for i in 1 2 3 4; do head -c $((48 << 20)) /dev/urandom >"$WORK/shard$i"; done

# The reader: the hot set again and again, past the kernel's page cache, until told to stop.
(
  while [ ! -e "$WORK/stop" ]; do
    echo 1 >/proc/sys/vm/drop_caches
    for i in $(seq 1 16); do cat "$MP/hot/f$i" >/dev/null; done
  done
) &
reader=$!
sleep 1

# The burst: four ranks, each its shard, fsynced (192 MiB, three times the cache).
writers=()
for i in 1 2 3 4; do
  dd if="$WORK/shard$i" of="$MP/ckpt/shard$i" bs=1M conv=fsync status=none &
  writers+=($!)
done
for p in "${writers[@]}"; do wait "$p" || { touch "$WORK/stop"; fail "a checkpoint writer failed"; }; done
touch "$WORK/stop"
wait "$reader" || fail "the hot-set reader failed during the burst"

out=$("$AQUIFER" warmup --check "$MP/ckpt")
note "checkpoint in the disk cache: $out"
[[ "$out" == *"(0.0%)"* ]] || fail "the checkpoint's full blocks entered the disk cache: $out"
out=$("$AQUIFER" warmup --check "$MP/hot")
note "hot set: $out"

# The store goes away: the hot set is still read, from the cache.
"$ROOT/scripts/s3-server.sh" stop "$S3_DIR"
dropcaches
for i in $(seq 1 16); do
  timeout 60 cmp "$WORK/hot/f$i" "$MP/hot/f$i" || fail "hot f$i not served with the store stopped"
done
note "hot set served with the object store stopped"

# --cache-writes all: written full blocks are cached on their way.
umount_volume "$MP"
eval "$("$ROOT/scripts/s3-server.sh" start "$S3_DIR" "$S3_PORT")"
mount_volume "$MP" --cache-dir "$CACHE" --cache-size 64M --cache-writes all
# (Read back only now: reads are cached, as they should be.)
for i in 1 2 3 4; do cmp "$WORK/shard$i" "$MP/ckpt/shard$i" || fail "shard$i differs"; done
dd if="$WORK/shard2" of="$MP/ckpt/again" bs=1M count=16 conv=fsync status=none
out=$("$AQUIFER" warmup --check "$MP/ckpt/again")
note "with --cache-writes all: $out"
[[ "$out" != *"(0.0%)"* ]] || fail "--cache-writes all cached nothing: $out"
echo "t_checkpoint_cache: ok"
