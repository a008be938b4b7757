#!/usr/bin/env bash
# Locks with the daemon in a PID namespace of its own, as a node daemon runs in a pod of its
# own under Kubernetes: the lockers' pids are not visible to it, so their requests carry
# pid 0. Blocking flock and F_SETLKW wait until granted, end early only on a signal, and a
# stopping daemon ends the waits. Then POSIX locks and clone(CLONE_FILES).
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
command -v unshare >/dev/null || fail "unshare (util-linux) is needed"
new_volume podlocks
mp=$WORK/mnt
mkdir -p "$mp"
# In the foreground: the namespace ends with its first process. No --mount-proc: that would
# also make a mount namespace of its own, where the mount would not be seen from here.
unshare --pid --fork "$AQUIFER" mount "$META" "$mp" --log "$WORK/mnt.log" >"$WORK/ns.out" 2>&1 &
NS_PID=$!
MOUNTS+=("$mp")
for _ in $(seq 1 100); do
  grep -q " $mp fuse" /proc/self/mounts && break
  kill -0 "$NS_PID" 2>/dev/null || fail "mount in a PID namespace failed: $(tail -3 "$WORK/ns.out")"
  sleep 0.1
done
grep -q " $mp fuse" /proc/self/mounts || fail "not mounted after 10 s"
: >"$mp/f"

# Each part runs whatever the one before found; failures are reported at the end.
bad=()
note "blocking locks from outside the daemon's PID namespace"
python3 "$here/pod_locks.py" "$mp/f" || bad+=("locks from outside the daemon's PID namespace")

note "POSIX locks are dropped by a close through clone(CLONE_FILES)"
command -v cc >/dev/null || fail "a C compiler (cc) is needed"
cc -O1 -o "$WORK/clonefiles" "$here/clonefiles.c" || fail "cannot build clonefiles.c"
: >"$mp/g"
"$WORK/clonefiles" "$mp/g" >"$WORK/clonefiles.out" ||
  bad+=("a lock survived the close of a descriptor by its owner")
sed 's/^/    /' "$WORK/clonefiles.out"
[ ${#bad[@]} = 0 ] || fail "$(IFS=';'; echo "${bad[*]}")"

note "a stopping daemon ends lock waits"
flock -x "$mp/f" -c "touch $WORK/held; while [ ! -e $WORK/release ]; do sleep 0.05; done" &
holder=$!
for _ in $(seq 1 100); do [ -e "$WORK/held" ] && break; sleep 0.05; done
[ -e "$WORK/held" ] || fail "the holder did not get the lock"
flock -x "$mp/f" true 2>"$WORK/waiter.err" &
waiter=$!
sleep 0.5
kill -0 "$waiter" 2>/dev/null || fail "the waiter returned while the lock was held: $(cat "$WORK/waiter.err")"
# The daemon is the first process of the namespace, the child of unshare.
daemon=$(pgrep -P "$NS_PID" | head -1)
[ -n "$daemon" ] || fail "no daemon under unshare"
kill -TERM "$daemon"
# The mount stays busy (both lockers hold the file open), so it is detached lazily.
for _ in $(seq 1 100); do kill -0 "$waiter" 2>/dev/null || break; sleep 0.05; done
kill -0 "$waiter" 2>/dev/null && fail "the waiter still waits 5 s after the daemon was told to stop"
wait "$waiter" && fail "the waiter got the lock from a stopping daemon"
grep -q "No locks available" "$WORK/waiter.err" || fail "the waiter's error: $(cat "$WORK/waiter.err")"
touch "$WORK/release"
wait "$holder" || true
note "ok"
