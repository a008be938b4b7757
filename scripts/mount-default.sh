#!/usr/bin/env bash
# One command from a fresh machine to a mounted volume on the embedded default
# (RocksDB metadata, blocks in a local directory):
#   scripts/mount-default.sh /mnt/aquifer
set -euo pipefail
cd "$(dirname "$0")/.."
mp=${1:-/mnt/aquifer}
scripts/install-deps.sh
cargo build --release --locked -p aquifer-cli
bin=${CARGO_TARGET_DIR:-target}/release/aquifer
mkdir -p "$mp"
"$bin" mount -d "$mp"
echo "unmount with: $bin umount $mp"
