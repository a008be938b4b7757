#!/usr/bin/env bash
# The kernel keeps a file's cached pages across opens while the file is unchanged
# (FOPEN_KEEP_CACHE, decided at open: close-to-open), and drops them at the first open after
# a change. fincore opens the file itself, so its count is what that next open kept. Then
# the FUSE requests a warm file costs (issue 26): its open and release, nothing else — no
# LOOKUP or GETATTR (entries and attributes are kept while the mount keeps them true), no
# READ (pages kept), no FLUSH (read-only descriptors).
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

# FUSE requests per warm file: 200 files in 4 directories, read once, then read again.
for d in 0 1 2 3; do
  mkdir -p "$mp/w$d"
  for i in $(seq 1 50); do head -c $((i * 997)) /dev/urandom >"$mp/w$d/f$i"; done
done
# By name, not by a glob: a listing would give the kernel fresh entries and attributes.
each() { local d i; for d in 0 1 2 3; do for i in $(seq 1 50); do cat "$mp/w$d/f$i"; done; done >/dev/null; }
each
ops() { "$AQUIFER" stats --json "$mp" >"$WORK/ops$1.json"; }
# A READ makes the kernel drop the file's atime (even on a noatime mount), so the pass after
# the one that filled the page cache costs a GETATTR per file: measure the pass after that.
each
# Past a 1 s cache time: kept entries and attributes must be kept for longer than that.
sleep 1.5
ops 0
each
ops 1
per=$(python3 - "$WORK/ops0.json" "$WORK/ops1.json" <<'PY'
import json, sys
a, b = (json.load(open(p))["fuse_ops"] for p in sys.argv[1:3])
n = 200
d = {k: (b.get(k, 0) - a.get(k, 0)) / n for k in b}
print(" ".join(f"{k}={v:.2f}" for k, v in sorted(d.items()) if v))
bad = [k for k in ("lookup", "getattr", "read", "flush") if d.get(k, 0) > 0.02]
bad += [k for k in ("open", "release") if d.get(k, 0) > 1.02]
sys.exit(f"per warm file: {d}" if bad else 0)
PY
) || fail "a warm file costs more FUSE requests than an open and a release: $per"
echo "  FUSE requests per warm file: $per"
echo "  ok"
