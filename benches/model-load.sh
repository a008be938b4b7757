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
systems="local aquifer"
# shellcheck disable=SC2206 # AQFLAGS is words
AQ_FLAGS=(${AQFLAGS:-})
source "$here/s3peers.sh"
python3 "$here/model_reader.py" "$work/local/model.safetensors" make "$SIZE_MIB"
peers_format model
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
    p=$(pid_of "$s")
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
