#!/usr/bin/env bash
# The kernel keeps a file's cached pages across opens while the file is unchanged
# (FOPEN_KEEP_CACHE, decided at open: close-to-open), and drops them at the first open after
# a change. fincore opens the file itself, so its count is what that next open kept.
source "$(dirname "$0")/lib.sh"
new_volume kcache
mp=$WORK/mnt
mount_volume "$mp"
head -c $((8 << 20)) /dev/urandom >"$WORK/src"
cp "$WORK/src" "$mp/f"
pages() { fincore -n -o PAGES "$mp/f" | tr -d ' '; }
cat "$mp/f" >/dev/null
kept=$(pages)
echo "  pages cached at the next open of the unchanged file: $kept"
[ "$kept" -gt 0 ] || fail "the page cache was dropped at an open of an unchanged file"
# Rewrite one byte in place through the mount: same length, new mtime.
printf 'Z' | dd of="$mp/f" bs=1 seek=4096 conv=notrunc status=none
printf 'Z' | dd of="$WORK/src" bs=1 seek=4096 conv=notrunc status=none
after=$(pages)
echo "  pages cached at the first open after a rewrite: $after"
[ "$after" -eq 0 ] || fail "the page cache was kept across a change"
cmp "$WORK/src" "$mp/f" || fail "wrong bytes after the rewrite"
# And across a remount: nothing stale comes back.
umount_volume "$mp"
mount_volume "$mp"
cmp "$WORK/src" "$mp/f" || fail "wrong bytes after a remount"
echo "  ok"
