#!/usr/bin/env bash
# Listings survive concurrent change, on two mounts of one Redis volume:
# - a listing with an lstat per entry on mount A (os.scandir + lstat, as `ls -l` does) of a
#   directory of 2,500 files, while mount B removes 250 of them and creates 100, in two
#   waves in the middle of the listing: every name never removed is listed, once;
# - `rm -rf` of a directory of 1,500 files on A while B unlinks in it (and another process on
#   A stats files in it) succeeds.
source "$(dirname "$0")/lib.sh"

start_redis
redis_meta
# Durability is not under test here: no fsync per write keeps 4,000 creates to seconds.
redis-cli -p "$REDIS_PORT" config set appendfsync no >/dev/null
"$AQUIFER" format "$META" listings --storage file --bucket "$WORK/blocks" >/dev/null
ma=$WORK/ma; mb=$WORK/mb
mount_volume "$ma" --cache-dir "$WORK/cache-a"
mount_volume "$mb" --cache-dir "$WORK/cache-b"

# make_files DIR N: N empty files f00000... in DIR.
make_files() {
  python3 - "$1" "$2" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
os.mkdir(d)
for i in range(n):
    os.close(os.open(f"{d}/f{i:05}", os.O_CREAT | os.O_WRONLY, 0o644))
EOF
}

note "a listing with a stat per entry on A while B removes and creates"
make_files "$ma/d" 2500
python3 - "$ma/d" "$mb/d" <<'EOF' || fail "the listing on A missed entries"
import os, sys, threading
on_a, on_b = sys.argv[1:]
n = 2500
# Two waves of changes on B, each while A's listing is held at a point of its own.
waves = [
    (100, [i for i in range(n) if i % 20 == 0], "a"),
    (1200, [i for i in range(n) if i % 20 == 10], "m"),
]
reached = [threading.Event() for _ in waves]
changed = [threading.Event() for _ in waves]
removed = set()
errors = []

def change():
    try:
        for w, (_, victims, tag) in enumerate(waves):
            if not reached[w].wait(60):
                raise RuntimeError(f"the listing never reached wave {w}")
            for i in victims:
                os.unlink(f"{on_b}/f{i:05}")
                removed.add(f"f{i:05}")
            for j in range(50):
                # Before, among and after the names of the directory.
                name = f"{tag}-new-{j}" if j % 2 else f"f{(j * 61) % n:05}-new"
                os.close(os.open(f"{on_b}/{name}", os.O_CREAT | os.O_WRONLY, 0o644))
            changed[w].set()
    except BaseException as e:
        errors.append(e)
        for ev in changed:
            ev.set()

t = threading.Thread(target=change)
t.start()
listed = []
with os.scandir(on_a) as it:
    for k, e in enumerate(it):
        listed.append(e.name)
        try:
            os.lstat(e.path)
        except FileNotFoundError:
            pass  # removed on B since it was listed: `ls -l` says so too
        for w, (at, _, _) in enumerate(waves):
            if k == at:
                reached[w].set()
                changed[w].wait(60)
t.join()
if errors:
    raise errors[0]
dups = len(listed) - len(set(listed))
kept = {f"f{i:05}" for i in range(n)} - removed
missed = sorted(kept - set(listed))
print(f"  listed {len(listed)} names; {len(removed)} removed on B; "
      f"{len(missed)} never removed but not listed; {dups} listed twice")
sys.exit(1 if missed or dups else 0)
EOF

note "rm -rf on A while B unlinks in it and another process on A stats in it"
# Made on B: A has none of the names cached, so its lookups reach the daemon.
make_files "$mb/r" 1500
python3 - "$mb/r" "$WORK/unlinking" <<'EOF' &
import os, sys
d, flag = sys.argv[1:]
# From the end backwards, so that A's listing meets entries removed ahead of it.
for k, i in enumerate(range(1499, -1, -3)):
    try:
        os.unlink(f"{d}/f{i:05}")
    except FileNotFoundError:
        pass  # A's rm got there first
    if k == 20:
        open(flag, "w").close()
EOF
unlinker=$!
# Lookups in the directory on A (a monitor, a loader) make the kernel ask for attributes
# with the entries (READDIRPLUS) in the middle of rm's listing too.
python3 - "$ma/r" "$WORK/stating" "$WORK/stop-stats" <<'EOF' &
import os, sys
d, flag, stop = sys.argv[1:]
i = 0
while not os.path.exists(stop):
    try:
        os.lstat(f"{d}/f{i % 1500:05}")
    except FileNotFoundError:
        pass
    i += 7
    if i == 7 * 20:
        open(flag, "w").close()
EOF
statter=$!
for i in $(seq 1 100); do [ -e "$WORK/unlinking" ] && [ -e "$WORK/stating" ] && break; sleep 0.05; done
[ -e "$WORK/unlinking" ] || fail "the unlinks on B did not start"
[ -e "$WORK/stating" ] || fail "the lstat loop on A did not start"
rm -rf "$ma/r" || fail "rm -rf on A failed while B unlinked in the directory"
touch "$WORK/stop-stats"
wait "$unlinker" || fail "the unlinks on B failed"
wait "$statter" || fail "the lstat loop on A failed"
[ ! -e "$ma/r" ] || fail "rm -rf left the directory"

note "listings ok"
