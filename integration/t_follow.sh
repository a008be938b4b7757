#!/usr/bin/env bash
# Two mounts of one Redis volume with kernel caches an hour long (issue 26): what one
# changes (create, overwrite in place, truncate, chmod, rename, unlink, mkdir, rmdir) the
# other's next open reads at once, and its stat shows within the bound docs/semantics.md
# states, told by the follower of the volume's changes (FUSE notify), not by expiry. Again
# after the followers' connections are cut (a gap: everything cached is dropped), and on
# the default cache times.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
start_redis
redis_meta
"$AQUIFER" format "$META" follow --storage file --bucket "$WORK/blocks" >/dev/null
ma=$WORK/ma; mb=$WORK/mb
long=(--attr-cache 3600 --entry-cache 3600)
mount_volume "$ma" "${long[@]}" --cache-dir "$WORK/cache-a"
mount_volume "$mb" "${long[@]}" --cache-dir "$WORK/cache-b"
# The bound docs/semantics.md states for a mount that reaches Redis.
BOUND=5

out=$(python3 "$here/follow_check.py" "$ma" "$mb" "$BOUND") || fail "long cache times: $out"
note "A -> B, ms until B's stat showed it: $out"
out=$(python3 "$here/follow_check.py" "$mb" "$ma" "$BOUND") || fail "long cache times, B -> A: $out"
note "B -> A: $out"

# B's kernel holds the file; the followers' connections are cut; A changes it. B's follower
# comes back with a gap and drops everything its kernel held.
echo one >"$ma/cut"
stat "$mb/cut" >/dev/null
redis-cli -p "$REDIS_PORT" client list | grep -o 'id=[0-9]* .*name=aquifer-feed' \
  | sed 's/^id=\([0-9]*\) .*/\1/' | while read -r id; do
    redis-cli -p "$REDIS_PORT" client kill id "$id" >/dev/null
  done
chmod 600 "$ma/cut"
for i in $(seq 1 $((BOUND * 10))); do
  [ "$(stat -c %a "$mb/cut")" = 600 ] && break
  sleep 0.1
done
[ "$(stat -c %a "$mb/cut")" = 600 ] || fail "after the followers' connections were cut, B still shows mode $(stat -c %a "$mb/cut")"
note "a change made while the followers reconnected: seen after the gap"

# The defaults (no cache flags): the same, on mounts that chose their times themselves.
umount_volume "$mb"; umount_volume "$ma"
mount_volume "$ma" --cache-dir "$WORK/cache-a"
mount_volume "$mb" --cache-dir "$WORK/cache-b"
rm -rf "$ma/fc"
out=$(python3 "$here/follow_check.py" "$ma" "$mb" "$BOUND") || fail "default cache times: $out"
note "defaults, A -> B: $out"

# Passthrough on B: B's kernel reads a whole-file copy, and holds it open while A rewrites
# the file. B's next open reads A's bytes (the copy is brought up to date, never served
# stale); a writer on B beside its reader writes into the copy, and A reads those bytes
# after B's close.
umount_volume "$mb"
mount_volume "$mb" --cache-dir "$WORK/cache-b" --passthrough
head -c 3000000 /dev/urandom >"$ma/pt"
cmp "$ma/pt" "$mb/pt" || fail "B read other bytes than A wrote (passthrough mount)"
for _ in $(seq 1 100); do
  [[ "$("$AQUIFER" warmup --check "$mb/pt")" == *"(100.0%)"* ]] && break
  sleep 0.1
done
pt_opens() { "$AQUIFER" stats "$mb" --json | python3 -c "import json,sys; print(json.load(sys.stdin).get('passthrough_opens',0))"; }
p0=$(pt_opens)
python3 - "$ma/pt" "$mb/pt" <<'PY' || fail "passthrough on B beside changes on A"
import os, sys
a, b = sys.argv[1], sys.argv[2]
def read(p):
    with open(p, "rb") as f: return f.read()
held = os.open(b, os.O_RDONLY)          # in passthrough on B from here on
new = os.urandom(3000000)
fd = os.open(a, os.O_WRONLY); os.pwrite(fd, new, 0); os.close(fd)
if read(b) != new:
    sys.exit("B's open after A's close read the stale copy")
fd = os.open(b, os.O_WRONLY); os.pwrite(fd, b"from B" * 1000, 123456); os.close(fd)
new = new[:123456] + b"from B" * 1000 + new[123456 + 6000:]
if read(a) != new:
    sys.exit("A's open after B's close did not read what B wrote beside its reader")
os.close(held)
PY
p1=$(pt_opens)
[ "$((p1 - p0))" -ge 1 ] || fail "B did not open the file in passthrough"
note "passthrough on B: A's rewrite read by B's next open, B's write beside its reader read by A"
echo "t_follow: ok"
