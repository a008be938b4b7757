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
echo "t_follow: ok"
