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
systems="aquifer"
# shellcheck disable=SC2206 # AQFLAGS is words
AQ_FLAGS=(${AQFLAGS:-})
source "$here/s3peers.sh"
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
peers_format mlperf
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
