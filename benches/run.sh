#!/usr/bin/env bash
# Run the fio jobs and metadata benchmark on one directory and print "metric<TAB>value" lines.
#   benches/run.sh MOUNTPOINT            (SIZE=1G RUNTIME=15 NRFILES=500 by default)
# Caches are dropped between write and read phases when run as root.
set -euo pipefail
dir=${1:?usage: benches/run.sh MOUNTPOINT}
here=$(cd "$(dirname "$0")" && pwd)
export SIZE=${SIZE:-1G} RUNTIME=${RUNTIME:-15} NRFILES=${NRFILES:-500}
work="$dir/aquifer-bench.$$"
mkdir -p "$work/small"
export DIR="$work/small"

drop() { sync; [ "$(id -u)" = 0 ] && echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }

fio_json() { # JOB -> "bw_MiBps iops"
  (cd "$work" && fio --output-format=json "$here/fio/$1.fio") | python3 -c '
import json, sys
j = json.load(sys.stdin)["jobs"]
bw = sum(x["read"]["bw_bytes"] + x["write"]["bw_bytes"] for x in j) / 2**20
iops = sum(x["read"]["iops"] + x["write"]["iops"] for x in j)
print(f"{bw:.1f} {iops:.0f}")'
}

emit() { printf '%s\t%s\n' "$1" "$2"; }

read -r bw _ < <(fio_json seq-write); emit seq_write_MiBps "$bw"
drop
read -r bw _ < <(fio_json seq-read); emit seq_read_MiBps "$bw"
drop
read -r _ iops < <(fio_json rand-read-4k); emit rand_read_4k_iops "$iops"
read -r bw _ < <(fio_json rand-read-128k); emit rand_read_128k_MiBps "$bw"
read -r _ iops < <(fio_json small-write); emit small_write_files_per_s "$iops"
drop
read -r _ iops < <(fio_json small-read); emit small_read_files_per_s "$iops"
python3 "$here/meta_ops.py" "$work/meta" "${META_FILES:-5000}"
rm -rf "$work"
