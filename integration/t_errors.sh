#!/usr/bin/env bash
# Bad input gets one clear line on stderr and a non-zero exit, never a panic.
source "$(dirname "$0")/lib.sh"

# expect_error DESCRIPTION PATTERN CMD...: CMD must fail with exactly one stderr line
# matching PATTERN.
expect_error() {
  local what=$1 pattern=$2; shift 2
  local rc=0
  "$@" >"$WORK/out" 2>"$WORK/err" </dev/null || rc=$?
  [ $rc -ne 0 ] || fail "$what: exit status 0"
  grep -q panicked "$WORK/err" && fail "$what: panicked: $(cat "$WORK/err")"
  [ "$(wc -l <"$WORK/err")" -eq 1 ] || fail "$what: expected one line, got: $(cat "$WORK/err")"
  grep -qi -- "$pattern" "$WORK/err" || fail "$what: message $(cat "$WORK/err") lacks '$pattern'"
  note "$what: $(cat "$WORK/err")"
}

mkdir -p "$WORK/empty" "$WORK/full"
touch "$WORK/full/x" "$WORK/file"
new_volume errs

expect_error "invalid URL" "invalid metadata URL" "$AQUIFER" mount not-a-url "$WORK/empty"
expect_error "unknown engine" "unsupported metadata engine" "$AQUIFER" mount "tikv://x" "$WORK/empty"
expect_error "missing mount point" "does not exist" "$AQUIFER" mount "$META" "$WORK/nope"
expect_error "mount point is a file" "not a directory" "$AQUIFER" mount "$META" "$WORK/file"
expect_error "mount point not empty" "not empty" "$AQUIFER" mount "$META" "$WORK/full"
expect_error "unformatted volume" "no metadata database" "$AQUIFER" mount "rocksdb://$WORK/none" "$WORK/empty"
expect_error "status of unformatted" "no metadata database" "$AQUIFER" status "rocksdb://$WORK/none"
expect_error "format twice" "already formatted" "$AQUIFER" format "$META" errs --storage file --bucket "$WORK/b"
expect_error "format without bucket" "bucket" "$AQUIFER" format "rocksdb://$WORK/v2" v2 --storage file
expect_error "bad block size" "block-size" "$AQUIFER" format "rocksdb://$WORK/v3" v3 --bucket "$WORK/b3" --block-size 3
expect_error "umount of something not mounted" "not mounted" "$AQUIFER" umount "$WORK/empty"

# An empty rocksdb directory that was never formatted.
mkdir -p "$WORK/blank"
"$AQUIFER" format "rocksdb://$WORK/blank/meta" b --bucket "$WORK/blank/blocks" >/dev/null
mp=$WORK/mnt
mount_volume "$mp"
expect_error "already mounted" "already mounted" "$AQUIFER" mount "rocksdb://$WORK/other" "$mp"
expect_error "volume in use" "in use by another process" "$AQUIFER" mount "$META" "$WORK/empty"
"$AQUIFER" status "$META" | grep -q '"sessions"' || fail "status while mounted"
umount_volume "$mp"
note "ok"
