#!/usr/bin/env bash
# Real programs on a real mount: tar, diff, cp -a, git, sqlite3, rename-heavy and
# hard-link workloads.
source "$(dirname "$0")/lib.sh"
new_volume programs
mp=$WORK/mnt
mount_volume "$mp"

# On the S3 test server every cold small-file read is a request (~40 ms on s3s-fs): a
# smaller tree keeps that run within minutes.
if [ "${AQUIFER_TEST_STORAGE:-file}" = s3 ]; then src=/usr/include/linux; else src=/usr/include; fi
note "untar $src and diff -r"
tar -C "$(dirname $src)" -cf "$WORK/src.tar" "$(basename $src)"
mkdir "$mp/untar"
tar -C "$mp/untar" -xf "$WORK/src.tar"
diff -r --no-dereference "$src" "$mp/untar/$(basename $src)" >/dev/null || fail "untarred tree differs"

note "cp -a preserves content, modes, times and links"
mkdir -p "$WORK/tree/sub"
echo hello >"$WORK/tree/a"; chmod 640 "$WORK/tree/a"
ln -s a "$WORK/tree/link"; ln "$WORK/tree/a" "$WORK/tree/hard"
head -c 3000000 /dev/urandom >"$WORK/tree/sub/big"
touch -d '2001-02-03 04:05:06.123456789' "$WORK/tree/sub/big"
cp -a "$WORK/tree" "$mp/tree"
diff -r "$WORK/tree" "$mp/tree" || fail "cp -a tree differs"
(cd "$WORK/tree" && find . -printf '%p %m %y %l %T@\n' | sort) >"$WORK/a.txt"
(cd "$mp/tree" && find . -printf '%p %m %y %l %T@\n' | sort) >"$WORK/b.txt"
diff "$WORK/a.txt" "$WORK/b.txt" || fail "cp -a metadata differs"
[ "$(stat -c %h "$mp/tree/a")" = 2 ] || fail "hard link count"

note "git init/add/commit/log"
cp -r "$(dirname "$0")/../crates" "$mp/repo"
(
  cd "$mp/repo"
  git init -q
  git -c user.name=t -c user.email=t@t add -A
  git -c user.name=t -c user.email=t@t commit -qm first
  echo change >>aquifer-meta/Cargo.toml
  git -c user.name=t -c user.email=t@t commit -qam second
  [ "$(git log --oneline | wc -l)" = 2 ] || exit 1
  git fsck --no-progress >/dev/null 2>&1 || exit 1
  git status --porcelain | grep -q . && exit 1
  exit 0
) || fail "git workflow"

note "sqlite3 with transactions"
db="$mp/test.db"
sqlite3 "$db" "create table t(id integer primary key, v text);"
{
  echo "begin;"
  for i in $(seq 1 2000); do echo "insert into t(v) values('row$i');"; done
  echo "commit;"
  echo "begin; delete from t where id % 2 = 0; rollback;"
  echo "begin; update t set v = 'x' where id <= 10; commit;"
} | sqlite3 "$db"
[ "$(sqlite3 "$db" 'select count(*) from t;')" = 2000 ] || fail "sqlite row count"
[ "$(sqlite3 "$db" "select count(*) from t where v = 'x';")" = 10 ] || fail "sqlite update"
[ "$(sqlite3 "$db" 'pragma integrity_check;')" = ok ] || fail "sqlite integrity"

note "remount and compare again"
umount_volume "$mp"
mount_volume "$mp"
diff -r --no-dereference "$src" "$mp/untar/$(basename $src)" >/dev/null || fail "tree differs after remount"
diff -r "$WORK/tree" "$mp/tree" || fail "cp -a tree differs after remount"
[ "$(sqlite3 "$db" 'select count(*) from t;')" = 2000 ] || fail "sqlite after remount"
note "ok"
