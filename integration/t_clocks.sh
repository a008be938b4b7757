#!/usr/bin/env bash
# Liveness on one clock (Redis): mount A runs 5 minutes behind (libfaketime), mount B on
# the true clock, both with a 2 s session timeout.
# - A takes an fcntl lock and a flock and holds them: well past twice the timeout, B still
#   cannot take them and A's session is listed (heartbeats are stamped with the Redis
#   server's clock, not A's);
# - A's daemon is stopped (kill -STOP): B reaps it after the timeout and takes the locks;
# - A resumes: it finds itself reaped, says so in its log, and fails with EIO instead of
#   acting on what it no longer holds.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
# libfaketime, preloaded by hand: the `faketime` wrapper would wait for the daemon to exit.
libfaketime=$(ls /usr/lib/*/faketime/libfaketimeMT.so.1 2>/dev/null | head -1)
[ -n "$libfaketime" ] || fail "libfaketime is not installed (scripts/install-deps.sh --test)"

start_redis
redis_meta
BLOCKS=$WORK/blocks
"$AQUIFER" format "$META" clocks --storage file --bucket "$BLOCKS" >/dev/null
ma=$WORK/ma; mb=$WORK/mb
mkdir -p "$ma"
# The daemon keeps the environment of the command that starts it; only the wall clock is
# moved, not the monotonic one.
out=$(LD_PRELOAD=$libfaketime FAKETIME=-5m FAKETIME_DONT_FAKE_MONOTONIC=1 "$AQUIFER" mount -d "$META" "$ma" \
  --log "$WORK/ma.log" --session-timeout 2 --cache-dir "$WORK/cache-a") || fail "mount of $ma failed"
pa=$(sed -n 's/.*(pid \([0-9]*\),.*/\1/p' <<<"$out")
MOUNTS+=("$ma")
mount_volume "$mb" --session-timeout 2 --cache-dir "$WORK/cache-b"

note "A's daemon runs 5 minutes behind"
touch "$ma/stamp"
lag=$(( $(date +%s) - $(stat -c %Y "$mb/stamp") ))
[ "$lag" -ge 280 ] && [ "$lag" -le 320 ] || fail "A's clock is not 5 minutes behind (a file it made is ${lag}s old)"

note "A holds its locks past twice the session timeout"
echo locked >"$ma/locked"
python3 "$here/hold.py" "$ma/locked" "$ma/stamp" "$WORK/holder.ready" &
holder=$!
CLEANUPS+=("kill -9 $holder")
for i in $(seq 1 100); do [ -e "$WORK/holder.ready" ] && break; sleep 0.1; done
[ -e "$WORK/holder.ready" ] || fail "the lock holder on A did not start"
trylock() { python3 "$here/hold.py" --try "$1"; }
for i in $(seq 1 10); do
  sleep 0.5
  ! trylock "$mb/locked" || fail "B took the locks of a live mount whose clock is 5 minutes behind"
done
sessions=$("$AQUIFER" status "$META" | python3 -c '
import json, sys
s = json.load(sys.stdin)["sessions"]
# Ages on the server clock: a live mount heartbeated within the timeout, whatever its clock.
assert all(0 <= x["heartbeat_age_secs"] <= 3 for x in s), s
print(len(s))')
[ "$sessions" = 2 ] || fail "status lists $sessions sessions, not 2"
kill -0 "$holder" || fail "the lock holder on A died"

note "A stopped: B reaps it and takes the locks"
kill -STOP "$pa"
CLEANUPS+=("kill -CONT $pa")
got=0
for i in $(seq 1 100); do
  if trylock "$mb/locked"; then got=1; break; fi
  sleep 0.2
done
[ "$got" = 1 ] || fail "B never got the locks of the stopped mount"

note "A resumed: it knows it was reaped and fails with EIO"
kill -CONT "$pa"
for i in $(seq 1 50); do
  grep -q "taken for dead" "$WORK/ma.log" && break
  sleep 0.2
done
grep -q "taken for dead" "$WORK/ma.log" || fail "A's log does not say its session was lost"
err=$(stat "$ma/never-looked-up" 2>&1) && fail "a lookup on the reaped mount succeeded"
[[ "$err" == *"Input/output error"* ]] || fail "a lookup on the reaped mount failed with: $err"
err=$(touch "$ma/new" 2>&1) && fail "a create on the reaped mount succeeded"
[[ "$err" == *"Input/output error"* ]] || fail "a create on the reaped mount failed with: $err"
# It does not come back to life: B's lock stands and only B is listed.
n=$("$AQUIFER" status "$META" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["sessions"]))')
[ "$n" = 1 ] || fail "status lists $n sessions after A was reaped"
kill -9 "$holder"; wait "$holder" 2>/dev/null || true
umount_volume "$mb"
echo "t_clocks: ok"
