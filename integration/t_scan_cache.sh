#!/usr/bin/env bash
# The disk tier keeps a re-read set through a one-pass scan (issue 26): a hot set read twice
# — the second time from the RAM tier, so the disk tier sees it only if the RAM tier's hits
# are counted there too — then one pass over a file three times the disk cache, then a burst
# of small files written (cached on their way: smaller than a block). With the object store
# stopped and the kernel's and the daemon's memory emptied (a remount first), the hot set is still
# read, byte for byte, from the disk cache.
source "$(dirname "$0")/lib.sh"
own_s3_server
META=rocksdb://$WORK/v/meta
"$AQUIFER" format "$META" scan --storage s3 --bucket "http://127.0.0.1:$S3_PORT/scan" >/dev/null
MP=$WORK/mnt
CACHE=$WORK/cache
dropcaches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# A RAM tier larger than the hot set: the second read is a RAM hit.
mount_volume "$MP" --cache-dir "$CACHE" --cache-size 200M --mem-cache-size 96M

mkdir -p "$WORK/hot" "$MP/hot" "$MP/scan" "$MP/burst"
for i in $(seq 1 24); do head -c $((2 << 20)) /dev/urandom >"$WORK/hot/f$i"; done
cp "$WORK"/hot/* "$MP/hot/"
# The scanned file goes in before the hot set is read, so its write leaves no trace.
head -c $((600 << 20)) /dev/urandom >"$MP/scan/big"
umount_volume "$MP"
rm -rf "$CACHE"
mount_volume "$MP" --cache-dir "$CACHE" --cache-size 200M --mem-cache-size 96M

# The hot set, read twice (a second apart: the caches count one pass over a block as one
# access).
for pass in 1 2; do
  dropcaches
  for i in $(seq 1 24); do cat "$MP/hot/f$i" >/dev/null; done
  sleep 1.2
done
# One pass over three times the cache, then a writer's burst of cached small files.
dropcaches
cat "$MP/scan/big" >/dev/null
for i in $(seq 1 150); do head -c $((1 << 20)) /dev/urandom >"$MP/burst/s$i"; done
sync
note "$("$AQUIFER" warmup --check "$MP/hot")"

# Only the disk can serve it now: RAM and the page cache go with a remount, then the store
# stops.
umount_volume "$MP"
dropcaches
mount_volume "$MP" --cache-dir "$CACHE" --cache-size 200M --mem-cache-size 96M
"$ROOT/scripts/s3-server.sh" stop "$S3_DIR"
for i in $(seq 1 24); do
  timeout 60 cmp "$WORK/hot/f$i" "$MP/hot/f$i" \
    || fail "hot f$i not served from the disk cache after a scan 3x its size"
done
note "the hot set (48 MiB) kept through a 600 MiB scan and a 150 MiB burst of writes"
echo "t_scan_cache: ok"
