# Helpers for integration tests: fresh volumes on real FUSE mounts, cleaned up on exit.
# shellcheck shell=bash
set -euo pipefail
: "${AQUIFER:?set AQUIFER to the aquifer binary}"
# The repository, for scripts/ and integration/ helpers.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d /tmp/aquifer-it.XXXXXX)
# Daemon state a test does not name (the default disk cache of S3 volumes, logs) stays in
# WORK and goes with it.
export AQUIFER_DATA_DIR=$WORK/data
MOUNTS=()
# Commands run at exit after the FUSE mounts are gone (loop devices, sysctls), last first.
CLEANUPS=()

cleanup() {
  local mp
  for mp in "${MOUNTS[@]}"; do
    if grep -q " $mp fuse" /proc/self/mounts 2>/dev/null; then
      "$AQUIFER" umount "$mp" >/dev/null 2>&1 || fusermount3 -uz "$mp" 2>/dev/null || true
    fi
  done
  # Give daemons a moment to exit, then make sure none is left.
  sleep 0.5
  pkill -9 -f -- "--log $WORK/" 2>/dev/null || true
  local i
  for ((i = ${#CLEANUPS[@]} - 1; i >= 0; i--)); do
    eval "${CLEANUPS[$i]}" >/dev/null 2>&1 || true
  done
  # KEEP_WORK=1 keeps the test's files and daemon logs for a look after a failure.
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
note() { echo "  $*"; }

# free_port: a TCP port free on 127.0.0.1 now.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# own_s3_server: an S3 test server of the test's own (scripts/s3-server.sh, objects under
# $S3_DIR/data) on a free port $S3_PORT, its keys in the environment; stopped at exit once
# the mounts using it are gone (a test may stop and start it again in between).
own_s3_server() {
  S3_DIR=$WORK/s3
  S3_PORT=$(free_port)
  local s3=$ROOT/scripts/s3-server.sh
  eval "$("$s3" start "$S3_DIR" "$S3_PORT")"
  CLEANUPS+=("'$s3' stop '$S3_DIR'")
}

# new_volume NAME [FORMAT FLAGS...]: format a volume; sets META and BLOCKS (the directory
# holding its block objects). With AQUIFER_TEST_STORAGE=s3 the blocks go to the S3 test
# server (scripts/s3-server.sh), whose objects are files under $AQUIFER_S3_DIR/data.
# With AQUIFER_TEST_META=redis the metadata goes to a redis-server of the test.
new_volume() {
  local name=$1; shift
  case "${AQUIFER_TEST_META:-rocksdb}" in
    rocksdb) META="rocksdb://$WORK/$name/meta" ;;
    redis) redis_meta ;;
    *) fail "unknown AQUIFER_TEST_META=$AQUIFER_TEST_META" ;;
  esac
  case "${AQUIFER_TEST_STORAGE:-file}" in
    file)
      BLOCKS="$WORK/$name/blocks"
      "$AQUIFER" format "$META" "$name" --storage file --bucket "$BLOCKS" "$@" >/dev/null
      ;;
    s3)
      : "${AQUIFER_TEST_S3:?start scripts/s3-server.sh}" "${AQUIFER_S3_DIR:?}"
      # A prefix of its own in the shared bucket; keys come from the AWS environment.
      local sub; sub=$(basename "$WORK")
      "$AQUIFER" format "$META" "$name" --storage s3 --bucket "$AQUIFER_TEST_S3/$sub" "$@" >/dev/null
      BLOCKS="$AQUIFER_S3_DIR/data/${AQUIFER_TEST_S3##*/}/$sub/$name"
      ;;
    *) fail "unknown AQUIFER_TEST_STORAGE=$AQUIFER_TEST_STORAGE" ;;
  esac
}

# mount_image IMAGE DIR: mount an ext4 image on a loop device at DIR (made if missing),
# both undone at exit; sets LOOPDEV. mkfs_image IMAGE SIZE: a fresh ext4 image.
mkfs_image() {
  truncate -s "$2" "$1"
  mkfs.ext4 -q -F "$1"
}
mount_image() {
  LOOPDEV=$(losetup --find --show "$1")
  CLEANUPS+=("losetup -d $LOOPDEV")
  mkdir -p "$2"
  mount "$LOOPDEV" "$2"
  CLEANUPS+=("umount -l $2")
}

# mount_volume MOUNTPOINT [MOUNT FLAGS...]: mount $META in the background; sets DAEMON_PID.
mount_volume() {
  local mp=$1; shift
  mkdir -p "$mp"
  local out
  out=$("$AQUIFER" mount -d "$META" "$mp" --log "$WORK/$(basename "$mp").log" "$@") || fail "mount of $mp failed"
  DAEMON_PID=$(sed -n 's/.*(pid \([0-9]*\),.*/\1/p' <<<"$out")
  MOUNTS+=("$mp")
}

# umount_volume MOUNTPOINT: unmount and wait for the daemon to finish.
umount_volume() {
  "$AQUIFER" umount "$1"
  local i
  for i in $(seq 1 100); do
    kill -0 "$DAEMON_PID" 2>/dev/null || return 0
    sleep 0.1
  done
  fail "daemon $DAEMON_PID did not exit after unmount"
}

# start_redis: a redis-server of this test on a free 127.0.0.1 port, data in WORK, stopped at
# exit; sets REDIS_PORT and REDIS_DIR. restart_redis kills it (-9) and starts it again on the
# same port and data (append-only file, fsync always: nothing acknowledged is lost).
start_redis() {
  REDIS_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  REDIS_DIR=$WORK/redis
  mkdir -p "$REDIS_DIR"
  CLEANUPS+=("kill -9 \$(cat $REDIS_DIR/pid) 2>/dev/null")
  _run_redis
}
_run_redis() {
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$REDIS_DIR" --save "" \
    --appendonly yes --appendfsync always --databases 1024 --daemonize yes \
    --pidfile "$REDIS_DIR/pid" --logfile "$REDIS_DIR/log" >/dev/null
  local i
  for i in $(seq 1 100); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "redis-server did not start: $(tail -3 "$REDIS_DIR/log")"
}
restart_redis() {
  kill -9 "$(cat "$REDIS_DIR/pid")"
  sleep "${1:-0.5}"
  _run_redis
}

# redis_meta: set META to a fresh Redis database (starting the server if needed).
REDIS_DBS=0
redis_meta() {
  [ -n "${REDIS_PORT:-}" ] || start_redis
  REDIS_DBS=$((REDIS_DBS + 1))
  redis-cli -p "$REDIS_PORT" -n "$REDIS_DBS" flushdb >/dev/null
  META="redis://127.0.0.1:$REDIS_PORT/$REDIS_DBS"
}

# start_creates DIR: create DIR/f1, DIR/f2, ... (file fN holds N) in the background until
# stop_creates; WL_DONE names the last create that succeeded, WL_ERR collects failures.
# stop_creates: stop, wait, and set CREATED to the count.
start_creates() {
  WL_DONE=$WORK/creates.done; WL_ERR=$WORK/creates.err
  rm -f "$WORK/creates.stop"; : >"$WL_ERR"; echo 0 >"$WL_DONE"
  mkdir -p "$1"
  (
    i=0
    while [ ! -e "$WORK/creates.stop" ]; do
      i=$((i + 1))
      if echo "$i" >"$1/f$i" 2>>"$WL_ERR"; then echo "$i" >"$WL_DONE"; fi
    done
  ) &
  WL_PID=$!
}
# creates_done: the last create that succeeded so far. The workload rewrites WL_DONE in place,
# so a read can fall between its truncation and its write: read until there is a number.
creates_done() {
  local v
  while v=$(cat "$WL_DONE"); [ -z "$v" ]; do sleep 0.01; done
  echo "$v"
}
stop_creates() {
  touch "$WORK/creates.stop"
  wait "$WL_PID"
  CREATED=$(creates_done)
}
