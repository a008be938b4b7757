#!/usr/bin/env bash
# --read-only --no-open (issue 26): the kernel opens files without asking the daemon (FUSE
# no-open mode). A warm file then costs no FUSE request at all: no OPEN, RELEASE, FLUSH,
# LOOKUP, GETATTR or READ. What another mount of the Redis volume changes (overwrite in
# place, truncate, create, unlink, chmod) is seen within the invalidation bound, by new
# opens and by a descriptor held open; locks work (this node's own); writes are EROFS; the
# flag without --read-only is refused with one line.
source "$(dirname "$0")/lib.sh"
start_redis
redis_meta
"$AQUIFER" format "$META" noopen --storage file --bucket "$WORK/blocks" >/dev/null
ma=$WORK/ma; mb=$WORK/mb
BOUND=5
mount_volume "$ma" --cache-dir "$WORK/cache-a"
for d in 0 1 2 3; do
  mkdir -p "$ma/w$d" "$WORK/src/w$d"
  for i in $(seq 1 50); do
    head -c $((i * 997)) /dev/urandom >"$WORK/src/w$d/f$i"
    cp "$WORK/src/w$d/f$i" "$ma/w$d/f$i"
  done
done
head -c $((5 << 20)) /dev/urandom >"$WORK/src/big"
cp "$WORK/src/big" "$ma/big"

out=$("$AQUIFER" mount -d "$META" "$mb" --no-open 2>&1) && fail "--no-open without --read-only was accepted"
[ "$(wc -l <<<"$out")" -eq 1 ] && [[ "$out" == *--read-only* ]] || fail "--no-open without --read-only: $out"
note "--no-open without --read-only: refused"
mount_volume "$mb" --cache-dir "$WORK/cache-b" --read-only --no-open

each() { local d i; for d in 0 1 2 3; do for i in $(seq 1 50); do cat "$mb/w$d/f$i"; done; done >/dev/null; }
check_all() {
  local d i
  for d in 0 1 2 3; do for i in $(seq 1 50); do
    cmp "$WORK/src/w$d/f$i" "$mb/w$d/f$i" || fail "w$d/f$i differs ($1)"
  done; done
  cmp "$WORK/src/big" "$mb/big" || fail "big differs ($1)"
}
check_all "first read"
each
ops() { "$AQUIFER" stats --json "$mb" >"$WORK/ops$1.json"; }
sleep 1.5
ops 0
each
ops 1
per=$(python3 - "$WORK/ops0.json" "$WORK/ops1.json" <<'PY'
import json, sys
a, b = (json.load(open(p))["fuse_ops"] for p in sys.argv[1:3])
d = {k: (b.get(k, 0) - a.get(k, 0)) / 200 for k in b}
print(" ".join(f"{k}={v:.2f}" for k, v in sorted(d.items()) if v) or "none")
bad = [k for k in ("open", "release", "flush", "lookup", "getattr", "read") if d.get(k, 0) > 0.02]
sys.exit(f"per warm file: {d}" if bad else 0)
PY
) || fail "a warm file on a no-open mount costs FUSE requests: $per"
note "FUSE requests per warm file: $per"

# Page cache dropped: reads reach the daemon (with no handle) and are right.
sync; echo 3 >/proc/sys/vm/drop_caches
ops 2
check_all "page cache dropped"
ops 3
reads=$(python3 -c "import json,sys; a,b=(json.load(open(p))['fuse_ops'] for p in sys.argv[1:3]); print(b.get('read',0)-a.get('read',0))" "$WORK/ops2.json" "$WORK/ops3.json")
[ "$reads" -gt 0 ] || fail "no READ reached the daemon with the page cache dropped"

# Changes on A, seen on B within the bound: by a descriptor B holds open and by new opens.
python3 - "$ma" "$mb" "$BOUND" <<'PY' || fail "a change on the writable mount was not seen by the no-open mount"
import os, sys, time
a, b, bound = sys.argv[1], sys.argv[2], float(sys.argv[3])
def read(p):
    with open(p, "rb") as f: return f.read()
def within(what, ok):
    t0 = time.monotonic()
    while True:
        try:
            if ok(): return round((time.monotonic() - t0) * 1000, 1)
        except FileNotFoundError:
            pass
        if time.monotonic() - t0 > bound:
            sys.exit(f"{what}: not seen on B within {bound} s")
        time.sleep(0.005)
held = os.open(f"{b}/w0/f10", os.O_RDONLY)
os.pread(held, 1 << 20, 0)
new = os.urandom(10 * 997)
fd = os.open(f"{a}/w0/f10", os.O_WRONLY); os.pwrite(fd, new, 0); os.close(fd)
took = {"overwrite": within("overwrite", lambda: read(f"{b}/w0/f10") == new)}
if os.pread(held, 1 << 20, 0) != new:
    sys.exit("a descriptor held open on B reads stale bytes after the change was seen")
os.close(held)
os.truncate(f"{a}/w1/f20", 100)
old = read(f"{a}/w1/f20")
took["truncate"] = within("truncate", lambda: os.stat(f"{b}/w1/f20").st_size == 100 and read(f"{b}/w1/f20") == old)
body = os.urandom(5000)
with open(f"{a}/w2/new", "wb") as f: f.write(body)
took["create"] = within("create", lambda: read(f"{b}/w2/new") == body)
os.unlink(f"{a}/w3/f30")
took["unlink"] = within("unlink", lambda: not os.path.exists(f"{b}/w3/f30"))
os.chmod(f"{a}/w3/f31", 0o600)
took["chmod"] = within("chmod", lambda: os.stat(f"{b}/w3/f31").st_mode & 0o777 == 0o600)
print("  ms until B saw it:", took)
PY

# Locks are the node's own but work; writes are refused.
flock -s "$mb/big" true || fail "flock on the no-open mount failed"
python3 - "$mb/big" <<'PY' || fail "a POSIX read lock on the no-open mount failed"
import fcntl, sys
with open(sys.argv[1], "rb") as f:
    fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB); fcntl.lockf(f, fcntl.LOCK_UN)
PY
if (echo x >"$mb/w0/f1") 2>/dev/null; then fail "a write on the read-only mount succeeded"; fi
cmp "$WORK/src/big" "$mb/big" || fail "big differs at the end"
umount_volume "$mb"
umount_volume "$ma"
echo "t_no_open: ok"
