#!/usr/bin/env bash
# aquifer dump / load: a tree made on a RocksDB volume, dumped, loaded into Redis, mounted:
# tree, attributes, xattrs, symlinks, hard links and file contents identical; dumped again
# from Redis (through a pipe, `-`) and loaded back into RocksDB: the dumps are the same text.
# A load into a formatted database and a cut dump are refused with one error line.
source "$(dirname "$0")/lib.sh"

manifest() { # DIR: one line per path with everything a user can see of it
  python3 - "$1" <<'EOF'
import hashlib, os, stat, sys
root = sys.argv[1]
for d, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(dirs + files):
        p = os.path.join(d, name)
        st = os.lstat(p)
        rel = os.path.relpath(p, root)
        x = sorted((a, os.getxattr(p, a, follow_symlinks=False)) for a in
                   os.listxattr(p, follow_symlinks=False))
        if stat.S_ISLNK(st.st_mode):
            what = "-> " + os.readlink(p)
        elif stat.S_ISREG(st.st_mode):
            what = hashlib.sha256(open(p, "rb").read()).hexdigest()
        else:
            what = ""
        print(rel, oct(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_nlink,
              st.st_mtime_ns, x, what)
EOF
}

new_volume src
mp=$WORK/m1
mount_volume "$mp"
mkdir -p "$mp/a/b/c" "$mp/empty"
head -c 9000000 /dev/urandom >"$mp/a/big"
head -c 100 /dev/urandom >"$mp/a/b/small"
printf 'sparse' | dd of="$mp/a/sparse" bs=1 seek=70000000 conv=notrunc 2>/dev/null
: >"$mp/a/b/c/zero"
printf 'x' >"$mp/$(printf 'odd\001name é')"
ln "$mp/a/big" "$mp/a/b/hardlink"
ln -s ../big "$mp/a/b/link"
ln -s /nowhere "$mp/dangling"
mkfifo "$mp/a/fifo"
setfattr -n user.tag -v hello "$mp/a/big"
setfattr -n user.bin -v 0x00ff10 "$mp/a/b/small"
chown 1234:5678 "$mp/a/b/small"
chmod 4751 "$mp/a/b/c"
touch -d '2001-02-03 04:05:06.789' "$mp/a/b/small"
for i in $(seq 1 1200); do : >"$mp/empty/f$i"; done
rm -r "$mp/empty"; mkdir "$mp/many"
for i in $(seq 1 1200); do echo "$i" >"$mp/many/f$i"; done
manifest "$mp" >"$WORK/before"
umount_volume "$mp"
src=$META

"$AQUIFER" dump "$src" "$WORK/d1.json" 2>"$WORK/dump.err" || fail "dump: $(cat "$WORK/dump.err")"
python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$WORK/d1.json" || fail "the dump is not one JSON document"

redis_meta
"$AQUIFER" load "$META" "$WORK/d1.json" 2>"$WORK/load.err" || fail "load into Redis: $(cat "$WORK/load.err")"
mp2=$WORK/m2
mount_volume "$mp2"
manifest "$mp2" >"$WORK/after"
diff "$WORK/before" "$WORK/after" >"$WORK/diff" || fail "the tree on Redis differs: $(head -20 "$WORK/diff")"
[ "$(stat -c %i "$mp2/a/big")" = "$(stat -c %i "$mp2/a/b/hardlink")" ] || fail "the hard link is two files on Redis"
umount_volume "$mp2"

# Redis to RocksDB through a pipe; the dumps are the same text.
back="rocksdb://$WORK/back/meta"
redis=$META
"$AQUIFER" dump "$META" - 2>/dev/null | tee "$WORK/d2.json" | "$AQUIFER" load "$back" - 2>"$WORK/load2.err" \
  || fail "dump | load back into RocksDB: $(cat "$WORK/load2.err")"
cmp "$WORK/d1.json" "$WORK/d2.json" || fail "the dump from Redis differs from the dump from RocksDB"
"$AQUIFER" dump "$back" "$WORK/d3.json" 2>/dev/null
cmp "$WORK/d1.json" "$WORK/d3.json" || fail "the round trip changed the dump"
grep -q '"secret_key"' "$WORK/d1.json" && grep -q '"secret_key":"[^r]' "$WORK/d1.json" && fail "a secret in the dump"

META=$redis
mount_volume "$mp2"
# The loaded volume is a working one: writes get new ids that collide with nothing.
head -c 5000000 /dev/urandom >"$WORK/new"
cp "$WORK/new" "$mp2/a/new"
cmp "$WORK/new" "$mp2/a/new" || fail "a new file on the loaded volume"
rm "$mp2/a/new"
manifest "$mp2" >"$WORK/after2"
# (Directories' times changed, of course: compare everything else.)
diff <(grep -v " 0o40" "$WORK/before") <(grep -v " 0o40" "$WORK/after2") >/dev/null ||
  fail "writing on the loaded volume changed old files"
umount_volume "$mp2"

# Refusals: one line each, non-zero exit.
if "$AQUIFER" load "$back" "$WORK/d1.json" 2>"$WORK/err"; then fail "loaded over a formatted volume"; fi
[ "$(wc -l <"$WORK/err")" = 1 ] || fail "not one error line: $(cat "$WORK/err")"
head -c 3000 "$WORK/d1.json" >"$WORK/cut.json"
redis_meta
if "$AQUIFER" load "$META" "$WORK/cut.json" 2>"$WORK/err"; then fail "loaded a cut dump"; fi
[ "$(wc -l <"$WORK/err")" = 1 ] || fail "not one error line: $(cat "$WORK/err")"
note "ok"
