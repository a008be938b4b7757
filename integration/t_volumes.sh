#!/usr/bin/env bash
# Volumes never share blocks, files are private, and a store that refuses writes reaches
# the writer:
# - a second volume of the same name on the same bucket (or on a second path naming the same
#   directory) is refused; volumes of other names on one bucket are isolated;
# - a mount whose store lost the volume's marker refuses to start;
# - data dir, metadata and block files are 0700/0600 under umask 022;
# - with blocks on a full filesystem, fsync and close report the failure.
source "$(dirname "$0")/lib.sh"
umask 022

case "${AQUIFER_TEST_STORAGE:-file}" in
  file) bucket=$WORK/shared; args=(--storage file) ;;
  s3) bucket=$AQUIFER_TEST_S3/$(basename "$WORK"); args=(--storage s3) ;;
esac
"$AQUIFER" format "rocksdb://$WORK/a/meta" data "${args[@]}" --bucket "$bucket" >/dev/null
if "$AQUIFER" format "rocksdb://$WORK/b/meta" data "${args[@]}" --bucket "$bucket" 2>"$WORK/err"; then
  fail "a second volume named data on the same bucket was formatted"
fi
[ "$(wc -l <"$WORK/err")" = 1 ] || fail "not one error line: $(cat "$WORK/err")"
grep -q "uuid" "$WORK/err" || fail "error does not name the other volume: $(cat "$WORK/err")"
if [ "${AQUIFER_TEST_STORAGE:-file}" = file ]; then
  ln -s "$WORK/shared" "$WORK/alias"
  if "$AQUIFER" format "rocksdb://$WORK/c/meta" data --bucket "$WORK/alias" 2>/dev/null; then
    fail "a second path to the same directory was accepted"
  fi
fi
# format --force of the same volume keeps it.
"$AQUIFER" format "rocksdb://$WORK/a/meta" data "${args[@]}" --bucket "$bucket" --force >/dev/null ||
  fail "format --force of the same volume"

# Another name on the same bucket: fully isolated.
"$AQUIFER" format "rocksdb://$WORK/o/meta" other "${args[@]}" --bucket "$bucket" >/dev/null
META="rocksdb://$WORK/a/meta"; mount_volume "$WORK/ma"; pa=$DAEMON_PID
META="rocksdb://$WORK/o/meta"; mount_volume "$WORK/mo"; po=$DAEMON_PID
for i in 1 2 3; do
  head -c 5000000 /dev/urandom >"$WORK/src$i"
  cp "$WORK/src$i" "$WORK/ma/f$i"
  cp "$WORK/src$i" "$WORK/mo/f$i"
done
rm "$WORK/ma/f1" "$WORK/ma/f2"
sleep 1.5  # the trash of volume data runs
DAEMON_PID=$pa; umount_volume "$WORK/ma"
DAEMON_PID=$po; umount_volume "$WORK/mo"
"$AQUIFER" fsck "rocksdb://$WORK/o/meta" --deep >"$WORK/fsck" || fail "the other volume lost blocks: $(cat "$WORK/fsck")"
META="rocksdb://$WORK/o/meta"; mount_volume "$WORK/mo"
for i in 1 2 3; do cmp "$WORK/src$i" "$WORK/mo/f$i" || fail "f$i of the other volume differs"; done
umount_volume "$WORK/mo"

# The marker is checked at mount.
if [ "${AQUIFER_TEST_STORAGE:-file}" = file ]; then
  rm "$WORK/shared/other/aquifer.volume"
  mkdir -p "$WORK/mx"
  if "$AQUIFER" mount "rocksdb://$WORK/o/meta" "$WORK/mx" 2>"$WORK/err"; then
    fail "mounted a volume whose marker is gone"
  fi
  grep -q "marker" "$WORK/err" || fail "mount error does not say why: $(cat "$WORK/err")"

  # Private by default, whatever the umask.
  loose=$(find "$WORK/a" "$WORK/shared/data" -perm /077 | head -5)
  [ -z "$loose" ] || fail "readable by others: $loose"
  data_dir=$WORK/dd
  mkdir -p "$WORK/md"
  AQUIFER_DATA_DIR=$data_dir "$AQUIFER" mount -d "$WORK/md" --log "$WORK/md.log" >/dev/null ||
    fail "mount of the embedded default"
  MOUNTS+=("$WORK/md")
  echo secret >"$WORK/md/s"
  "$AQUIFER" umount "$WORK/md"
  sleep 0.5
  loose=$(find "$data_dir" -perm /077 | head -5)
  [ -z "$loose" ] || fail "embedded default readable by others: $loose"

  # Blocks on a full filesystem: the writer's fsync and close fail.
  mkdir -p "$WORK/tiny"
  mount -t tmpfs -o size=3m tmpfs "$WORK/tiny"
  CLEANUPS+=("umount -l $WORK/tiny")
  META="rocksdb://$WORK/full/meta"
  "$AQUIFER" format "$META" full --bucket "$WORK/tiny/blocks" >/dev/null
  mount_volume "$WORK/mf"
  python3 - "$WORK/mf/big" <<'PY' || fail "a write that could not be stored was acknowledged"
import errno, os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o644)
try:
    for _ in range(8):
        os.write(fd, os.urandom(1 << 20))
    os.fsync(fd)
except OSError as e:
    print(f"  fsync: {e.strerror}")
else:
    sys.exit(1)
try:
    os.close(fd)
except OSError as e:
    print(f"  close: {e.strerror}")
PY
  umount_volume "$WORK/mf"
fi
note "ok"
