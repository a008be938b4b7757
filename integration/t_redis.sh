#!/usr/bin/env bash
# Two mounts of one volume on Redis (separate daemons, separate cache dirs):
# - close-to-open: after close on A, an open on B sees the new size and bytes, even with
#   B's attributes of the file cached;
# - fcntl locks across mounts: conflicts, byte ranges, F_GETLK naming the holder, a blocking
#   F_SETLKW on B woken when A unlocks, and interrupted by a signal; flock exclusive;
# - creates and renames racing in one directory from both mounts leave one consistent tree;
# - a file unlinked on A while B reads it stays readable on B to the end;
# - kill -9 of mount A holding locks and an open unlinked file: B takes the locks after the
#   session timeout, and the file's blocks are freed;
# - Redis restarted (kill -9) under a metadata workload: it carries on, the tree checks out.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)

start_redis
redis_meta
BLOCKS=$WORK/blocks
"$AQUIFER" format "$META" shared --storage file --bucket "$BLOCKS" >/dev/null
ma=$WORK/ma; mb=$WORK/mb
mount_volume "$ma" --session-timeout 3 --free-grace 0 --cache-dir "$WORK/cache-a"; pa=$DAEMON_PID
mount_volume "$mb" --session-timeout 3 --free-grace 0 --cache-dir "$WORK/cache-b"; pb=$DAEMON_PID
sessions=$("$AQUIFER" status "$META" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["sessions"]))')
[ "$sessions" = 2 ] || fail "status lists $sessions sessions, not 2"

note "close-to-open"
echo first >"$ma/f"
[ "$(cat "$mb/f")" = first ] || fail "B does not see A's file"
stat "$mb/f" >/dev/null  # B's kernel now caches the size (6)
head -c 3000000 /dev/urandom >"$WORK/src"
cp "$WORK/src" "$ma/f"
cmp "$WORK/src" "$mb/f" || fail "after close on A, an open on B read other bytes"
[ "$(stat -c %s "$mb/f")" = 3000000 ] || fail "B reports size $(stat -c %s "$mb/f") after opening"

note "fcntl and flock locks across mounts"
python3 "$here/locks.py" "$ma/f" "$mb/f" || fail "locks across mounts"

note "creates and renames racing in one directory"
mkdir "$ma/d"
race() { # MOUNT TAG
  local i
  for i in $(seq 1 150); do
    echo "$2-$i" >"$1/d/$2-$i"
    if [ $((i % 3)) = 0 ]; then mv "$1/d/$2-$i" "$1/d/$2-$i.r" 2>/dev/null || true; fi
    # Both mounts rename the same shared names back and forth.
    mv "$1/d/shared-$((i % 7))" "$1/d/shared-$(((i + 1) % 7))" 2>/dev/null || true
  done
}
for i in 0 1 2; do echo "s$i" >"$ma/d/shared-$i"; done
race "$ma" a & r1=$!
race "$mb" b & r2=$!
wait $r1 $r2
sleep 1.2  # past the entry and attribute caches
la=$(cd "$ma/d" && ls | sort); lb=$(cd "$mb/d" && ls | sort)
[ "$la" = "$lb" ] || fail "the mounts list different trees"
[ "$(grep -c '^a-' <<<"$la")" = 150 ] || fail "A's creates: $(grep -c '^a-' <<<"$la") of 150"
[ "$(grep -c '^b-' <<<"$lb")" = 150 ] || fail "B's creates: $(grep -c '^b-' <<<"$lb") of 150"
shared=$(grep -c '^shared-' <<<"$la")
[ "$shared" -ge 1 ] && [ "$shared" -le 3 ] || fail "$shared shared names left of 3 (renames over each other may merge them)"
for n in $(grep -E '^(a|b)-' <<<"$la"); do
  want=${n%.r}
  [ "$(cat "$mb/d/$n")" = "$want" ] || fail "$n holds $(cat "$mb/d/$n")"
done
[ "$(stat -c %h "$ma/d")" = 2 ] || fail "link count of d is $(stat -c %h "$ma/d")"

note "unlink on A while B reads"
head -c 20000000 /dev/urandom >"$WORK/big"
cp "$WORK/big" "$ma/big"
python3 - "$mb/big" "$ma/big" "$WORK/big" <<'EOF' || fail "B lost a file A unlinked while B read it"
import os, sys, hashlib
path_b, path_a, src = sys.argv[1:]
want = hashlib.sha256(open(src, "rb").read()).hexdigest()
with open(path_b, "rb") as f:
    h = hashlib.sha256(f.read(1 << 20))
    os.unlink(path_a)
    while True:
        b = f.read(1 << 20)
        if not b:
            break
        h.update(b)
sys.exit(0 if h.hexdigest() == want else 1)
EOF
[ ! -e "$mb/big" ] || fail "the unlinked file is still listed on B"

note "kill -9 of a mount holding locks and an open unlinked file"
echo locked >"$ma/locked"
head -c 9000000 /dev/urandom >"$ma/held"
sync
before=$(find "$BLOCKS" -type f -not -path '*/.free/*' | wc -l)
python3 "$here/hold.py" "$ma/locked" "$ma/held" "$WORK/holder.ready" &
holder=$!
for i in $(seq 1 100); do [ -e "$WORK/holder.ready" ] && break; sleep 0.1; done
[ -e "$WORK/holder.ready" ] || fail "the lock holder on A did not start"
trylock() { python3 "$here/hold.py" --try "$1"; }
! trylock "$mb/locked" || fail "B got the locks A holds"
rm "$mb/held"
kill -9 "$pa"
{ kill -9 "$holder"; wait "$holder"; } 2>/dev/null || true
fusermount3 -uz "$ma" 2>/dev/null || umount -l "$ma" 2>/dev/null || true
# B takes the locks once the session timeout (3 s) has passed and B's heartbeat reaped A.
for i in $(seq 1 150); do
  trylock "$mb/locked" && break
  sleep 0.2
done
trylock "$mb/locked" || fail "B never got the locks of the dead mount"
# The dead session's records go once B's heartbeat finds it stale.
for i in $(seq 1 150); do
  n=$("$AQUIFER" status "$META" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["sessions"]))')
  [ "$n" = 1 ] && break
  sleep 0.2
done
[ "$n" = 1 ] || fail "the dead session is still listed after 30 s"
for i in $(seq 1 100); do
  after=$(find "$BLOCKS" -type f -not -path '*/.free/*' | wc -l)
  [ $((before - after)) -ge 3 ] && break
  sleep 0.2
done
[ $((before - after)) -ge 3 ] || fail "the open unlinked file's blocks were not freed ($before -> $after objects)"

note "Redis restarted under a metadata workload"
# Operations wait through the restart (the retry deadline is 30 s): none may fail.
start_creates "$mb/w"
sleep 0.5
before=$(creates_done)
restart_redis 1
sleep 1
stop_creates
n=$CREATED
note "$before files before the restart, $n in all"
[ "$n" -gt "$before" ] || fail "the workload made no progress after the restart"
[ ! -s "$WL_ERR" ] || fail "the workload failed through a restart: $(head -3 "$WL_ERR")"
sleep 1.2
for i in $(seq 1 "$n"); do
  [ "$(cat "$mb/w/f$i")" = "$i" ] || fail "w/f$i lost or wrong after the restart"
done
[ "$(ls "$mb/w" | wc -l)" = "$n" ] || fail "$(ls "$mb/w" | wc -l) files in w, not $n"

DAEMON_PID=$pb; umount_volume "$mb"
"$AQUIFER" fsck "$META" >"$WORK/fsck" 2>&1 || fail "fsck after it all: $(tail -5 "$WORK/fsck")"
note "ok"
