#!/usr/bin/env bash
# Install what aquifer needs on a Debian/Ubuntu machine. Idempotent.
#   scripts/install-deps.sh          runtime + build: fuse3, clang/libclang (for rocksdb)
#   scripts/install-deps.sh --test   also the test tools: redis-server, openssl, sqlite3, git, fio, iptables,
#                                    e2fsprogs and util-linux (the power-cut test's loop device),
#                                    pjdfstest, fsx, the S3 test server s3s-fs, grpcio for the
#                                    CSI test's client, kubernetes-validate for the manifests,
#                                    and the users pjdfstest switches to
set -euo pipefail

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pkgs=(fuse3 clang libclang-dev pkg-config)
if [ $want_test = 1 ]; then
  # iptables: the cache-group test counts the bytes the S3 server sends in the kernel.
  pkgs+=(redis-server sqlite3 git fio rsync attr xz-utils e2fsprogs util-linux openssl faketime iptables)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ $want_test = 1 ]; then
  # Versions pinned to ones that build with the machine's Rust toolchain.
  command -v pjdfstest >/dev/null || cargo install --locked --quiet pjdfstest@0.2.2
  command -v fsx >/dev/null || cargo install --locked --quiet fsx@0.3.2
  # The S3 test server; 0.14.1 is the newest that builds on this toolchain.
  command -v s3s-fs >/dev/null || cargo install --locked --quiet s3s-fs@0.14.1 --features binary
  # The CSI test's gRPC client (integration/csi_client.py): grpcio, and grpcio-tools to make
  # its stubs from the driver's proto.
  python3 -c 'import grpc, grpc_tools' 2>/dev/null ||
    python3 -m pip install -q 'grpcio>=1.60,<2' 'grpcio-tools>=1.60,<2'
  # The Kubernetes API schemas, offline, for the manifests' test (t_k8s).
  command -v kubernetes-validate >/dev/null ||
    python3 -m pip install -q 'kubernetes-validate>=1.30,<2'
  # pjdfstest switches to these users.
  getent group tests >/dev/null || as_root groupadd tests
  id tests >/dev/null 2>&1 || as_root useradd -M -g tests -s /usr/sbin/nologin tests
fi
