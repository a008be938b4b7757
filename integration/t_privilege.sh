#!/usr/bin/env bash
# Shared state changes need privilege. A mount run by root (its owner), read by the `tests`
# user (scripts/install-deps.sh makes it):
# - the user is refused evict, warm and mark (EPERM from the control ioctl, one line and a
#   non-zero exit from `aquifer warmup`), and the cache stays as it was; `warmup --check`
#   and `stats` work for it;
# - root (the owner) may, and so may the user holding CAP_SYS_ADMIN (an ambient capability),
#   unless the daemon cannot see the caller's pid (it runs in a PID namespace of its own);
# - a cache directory owned by another user, or open to others (mode 0777, also as the
#   --cache-dir it is made in), and a staging directory owned by another user, are refused
#   at mount with one line; a missing one is made 0700.
source "$(dirname "$0")/lib.sh"
id tests >/dev/null 2>&1 || fail "no user 'tests' (scripts/install-deps.sh --test makes it)"
chmod 755 "$WORK"
# A copy the user can run, wherever the build is.
install -m 755 "$AQUIFER" "$WORK/aquifer"
as_tests() { setpriv --reuid=tests --regid=tests --clear-groups "$@"; }
new_volume priv
cache=$WORK/cache
mp=$WORK/mnt
mount_volume "$mp" --cache-dir "$cache" --cache-size 64M --mem-cache-size 4M --metrics none
uuid=$(ls "$cache")
[ "$(stat -c %a "$cache/$uuid")" = 700 ] || fail "the cache directory was made $(stat -c %a "$cache/$uuid"), not 700"
mkdir -p "$mp/d"
head -c $((3 << 20)) /dev/urandom >"$mp/d/f"
chmod 755 "$mp/d"
chmod 644 "$mp/d/f"
"$AQUIFER" warmup "$mp/d" >/dev/null || fail "root (the owner) cannot warm"
check() { "$1" warmup --check "$mp/d/f" 2>&1; }

# The raw ioctl: its errno, for each op (1 warm, 2 check, 3 evict, 4 mark, 5 unmark).
cat >"$WORK/warm.py" <<'PY'
import errno, fcntl, os, struct, sys
WARM = (3 << 30) | (32 << 16) | (0xAC << 8) | 2
path, op = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDONLY)
buf = bytearray(32)
struct.pack_into("<I4xQQ", buf, 0, op, 0, 1 << 30)
try:
    fcntl.ioctl(fd, WARM, buf, True)
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])
PY
chmod 644 "$WORK/warm.py"
for op in 1 3; do
  r=$(as_tests /usr/bin/python3 "$WORK/warm.py" "$mp/d/f" "$op")
  [ "$r" = EPERM ] || fail "op $op on a file by another user: $r, not EPERM"
done
for op in 4 5; do
  r=$(as_tests /usr/bin/python3 "$WORK/warm.py" "$mp/d" "$op")
  [ "$r" = EPERM ] || fail "op $op on a directory by another user: $r, not EPERM"
done
[ "$(as_tests /usr/bin/python3 "$WORK/warm.py" "$mp/d/f" 2)" = ok ] || fail "check refused to another user"
note "another user: warm, evict, mark, unmark get EPERM; check works"

for args in "--evict $mp/d" "$mp/d" "--evict $mp/d/f"; do
  # shellcheck disable=SC2086
  if as_tests "$WORK/aquifer" warmup $args >"$WORK/out" 2>"$WORK/err"; then
    fail "warmup $args by another user succeeded"
  fi
  [ "$(wc -l <"$WORK/err")" -eq 1 ] || fail "warmup $args refused with $(wc -l <"$WORK/err") lines: $(cat "$WORK/err")"
  grep -q "not permitted" "$WORK/err" || fail "warmup $args refusal: $(cat "$WORK/err")"
done
note "refused: $(cat "$WORK/err")"
out=$(check "$AQUIFER")
[[ "$out" == *"(100.0%)"* ]] || fail "a refused evict evicted: $out"
out=$(as_tests "$WORK/aquifer" warmup --check "$mp/d") || fail "warmup --check by another user failed: $out"
[[ "$out" == *"(100.0%)"* ]] || fail "warmup --check by another user: $out"
as_tests "$WORK/aquifer" stats --json "$mp" | python3 -c 'import json,sys; json.load(sys.stdin)' \
  || fail "stats by another user failed"
note "another user: warmup --check and stats work, the cache is untouched"

"$AQUIFER" warmup --evict "$mp/d" >/dev/null || fail "root (the owner) cannot evict"
out=$(check "$AQUIFER")
[[ "$out" == *"(0.0%)"* ]] || fail "the owner's evict did not evict: $out"
setpriv --reuid=tests --regid=tests --clear-groups --inh-caps=+sys_admin --ambient-caps=+sys_admin \
  "$WORK/aquifer" warmup "$mp/d" >/dev/null || fail "another user with CAP_SYS_ADMIN cannot warm"
out=$(check "$AQUIFER")
[[ "$out" == *"(100.0%)"* ]] || fail "the warm-up with CAP_SYS_ADMIN did not warm: $out"
note "the owner evicts, a user with CAP_SYS_ADMIN warms"
umount_volume "$mp"

# The daemon in a PID namespace of its own (a node daemon's pod): callers outside it come
# with pid 0, so their capabilities cannot be looked up and only the uid counts.
unshare --pid --fork -- "$AQUIFER" mount "$META" "$mp" --cache-dir "$cache" --cache-size 64M \
  --metrics none --log "$WORK/pidns.log" >/dev/null 2>&1 &
pidns=$!
MOUNTS+=("$mp")
for _ in $(seq 1 100); do grep -q " $mp fuse" /proc/self/mounts && break; sleep 0.1; done
grep -q " $mp fuse" /proc/self/mounts || fail "the mount in its own PID namespace did not come up: $(tail -3 "$WORK/pidns.log")"
if setpriv --reuid=tests --regid=tests --clear-groups --inh-caps=+sys_admin --ambient-caps=+sys_admin \
  "$WORK/aquifer" warmup --evict "$mp/d" >/dev/null 2>"$WORK/err"; then
  fail "a caller the daemon cannot see was trusted with its capability"
fi
grep -q "not permitted" "$WORK/err" || fail "unseen caller with CAP_SYS_ADMIN: $(cat "$WORK/err")"
"$AQUIFER" warmup --evict "$mp/d" >/dev/null || fail "the owner (uid 0) was refused from another PID namespace"
note "daemon in its own PID namespace: an unseen caller's capability does not count, its uid does"
"$AQUIFER" umount "$mp"
wait "$pidns" 2>/dev/null || true

# Cache and staging directories that are not the mount's own.
refused() { # refused WHAT PATTERN FLAGS...: the mount fails with one line matching PATTERN
  local what=$1 pattern=$2; shift 2
  mkdir -p "$WORK/m2"
  if "$AQUIFER" mount -d "$META" "$WORK/m2" --log "$WORK/m2.log" --metrics none "$@" >"$WORK/out" 2>"$WORK/err"; then
    MOUNTS+=("$WORK/m2")
    fail "mounted with $what"
  fi
  [ "$(wc -l <"$WORK/err")" -eq 1 ] || fail "$what refused with: $(cat "$WORK/err")"
  grep -q -- "$pattern" "$WORK/err" || fail "$what: $(cat "$WORK/err")"
  note "$what: $(cat "$WORK/err")"
}
chown tests:tests "$cache/$uuid"
refused "a cache directory owned by another user" "owned by uid $(id -u tests)" --cache-dir "$cache" --cache-size 64M
chown root:root "$cache/$uuid"
chmod 777 "$cache/$uuid"
refused "a cache directory of mode 777" "mode 777" --cache-dir "$cache" --cache-size 64M
chmod 700 "$cache/$uuid"
open=$WORK/open
mkdir -m 777 "$open"
refused "a --cache-dir of mode 777" "replace the cache" --cache-dir "$open" --cache-size 64M
mkdir -p "$cache/$uuid/staging"
chown tests:tests "$cache/$uuid/staging"
refused "a staging directory owned by another user" "owned by uid" --cache-dir "$cache" --cache-size 64M --writeback
chown root:root "$cache/$uuid/staging"
mount_volume "$mp" --cache-dir "$cache" --cache-size 64M --writeback --metrics none
head -c 1 "$mp/d/f" >/dev/null || fail "cannot read after the directories were fixed"
note "the mount's own directories are taken again"
echo "  ok"
