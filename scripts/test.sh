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
for t in "${tests[@]}"; do
  name=$(basename "$t" .sh)
  echo "=== integration $name"
  start=$(date +%s)
  if bash "$t"; then
    pass=$((pass + 1)); echo "=== $name ok ($(( $(date +%s) - start ))s)"
  else
    fail=$((fail + 1)); failed_tests+=("$name"); echo "=== $name FAILED ($(( $(date +%s) - start ))s)"
  fi
done

[ ${#failed_steps[@]} -gt 0 ] && echo "failed steps: ${failed_steps[*]}"
[ ${#failed_tests[@]} -gt 0 ] && echo "failed integration tests: ${failed_tests[*]}"
echo "integration: $pass passed, $fail failed"
[ ${#failed_steps[@]} -eq 0 ] && [ "$fail" -eq 0 ]
