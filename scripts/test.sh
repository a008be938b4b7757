#!/usr/bin/env bash
# Run every test: formatting, lints, unit and conformance tests, then the integration suite
# against real FUSE mounts. Installs what it needs first.
#   scripts/test.sh                 everything
#   scripts/test.sh t_fsx t_errors  the checks, then only the named integration tests
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/install-deps.sh --test || { echo "dependency installation failed"; exit 1; }

# One profile for build, lints and tests: rocksdb's C++ is compiled once.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target}
export AQUIFER=$CARGO_TARGET_DIR/release/aquifer

# The S3 test server (s3s-fs on 127.0.0.1) for the S3 conformance cases and the S3 runs of
# the integration suite; stopped on exit.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export AQUIFER_S3_DIR
AQUIFER_S3_DIR=$(mktemp -d /tmp/aquifer-s3.XXXXXX)
trap 'scripts/s3-server.sh stop "$AQUIFER_S3_DIR"; rm -rf "$AQUIFER_S3_DIR"' EXIT
s3env=$(scripts/s3-server.sh start "$AQUIFER_S3_DIR" "$port") || { echo "the S3 test server did not start"; exit 1; }
eval "$s3env"

failed_steps=()
step() {
  local name=$1; shift
  echo "=== $name: $*"
  if ! "$@"; then
    echo "=== $name FAILED"
    failed_steps+=("$name")
    return 1
  fi
}

step fmt cargo fmt --all -- --check
step build cargo build --release --locked --workspace || { echo "build failed"; exit 1; }
step clippy cargo clippy --release --locked --workspace --all-targets -- -D warnings
step unit cargo test --release --locked --workspace

pass=0; fail=0; failed_tests=()
tests=()
for name in "$@"; do tests+=("integration/$name.sh"); done
[ ${#tests[@]} -eq 0 ] && tests=(integration/t_*.sh)
run_test() {  # run_test SCRIPT LABEL [ENV...]
  local t=$1 name=$2; shift 2
  echo "=== integration $name"
  local start; start=$(date +%s)
  if env "$@" bash "$t"; then
    pass=$((pass + 1)); echo "=== $name ok ($(( $(date +%s) - start ))s)"
  else
    fail=$((fail + 1)); failed_tests+=("$name"); echo "=== $name FAILED ($(( $(date +%s) - start ))s)"
  fi
}
for t in "${tests[@]}"; do
  run_test "$t" "$(basename "$t" .sh)"
done
# The whole-filesystem tests again on a volume whose blocks are in the S3 server.
s3_tests=(t_pjdfstest t_fsx t_programs t_durability t_corruption t_parallel t_volumes)
for t in "${tests[@]}"; do
  name=$(basename "$t" .sh)
  [[ " ${s3_tests[*]} " == *" $name "* ]] && run_test "$t" "$name[s3]" AQUIFER_TEST_STORAGE=s3
done

# And on a volume whose metadata is in Redis (a redis-server each test starts itself).
redis_tests=(t_pjdfstest t_fsx t_programs)
for t in "${tests[@]}"; do
  name=$(basename "$t" .sh)
  [[ " ${redis_tests[*]} " == *" $name "* ]] && run_test "$t" "$name[redis]" AQUIFER_TEST_META=redis
done

[ ${#failed_steps[@]} -gt 0 ] && echo "failed steps: ${failed_steps[*]}"
[ ${#failed_tests[@]} -gt 0 ] && echo "failed integration tests: ${failed_tests[*]}"
echo "integration: $pass passed, $fail failed"
[ ${#failed_steps[@]} -eq 0 ] && [ "$fail" -eq 0 ]
