#!/usr/bin/env bash
# POSIX conformance: every pjdfstest case that passes on this machine's local disk must pass
# on the mount, except the ones listed (with reasons) in pjdfstest-exclude.txt.
source "$(dirname "$0")/lib.sh"
here=$(cd "$(dirname "$0")" && pwd)
conf=$here/pjdfstest.toml

run_suite() { # DIR OUT
  (cd "$1" && pjdfstest -c "$conf" -p "$1" >"$2" 2>&1) || true
  grep -E '^[a-z_0-9:]+ +(ok|FAILED|skipped)' "$2" | awk '{print $1, $2}' | sort >"$2.res"
}

local_dir=$WORK/local
mkdir -p "$local_dir"; chmod 777 "$local_dir"
run_suite "$local_dir" "$WORK/local.txt"
[ -s "$WORK/local.txt.res" ] || fail "pjdfstest did not run on the local disk: $(tail -3 "$WORK/local.txt")"

new_volume pjd
mp=$WORK/mnt
mount_volume "$mp"
chmod 777 "$mp"
run_suite "$mp" "$WORK/mount.txt"
umount_volume "$mp"

{ grep -v "^#" "$here/pjdfstest-exclude.txt" || true; } | awk 'NF {print $1}' | sort >"$WORK/excluded"
awk '$2 == "ok" {print $1}' "$WORK/local.txt.res" >"$WORK/local-ok"
awk '$2 == "ok" {print $1}' "$WORK/mount.txt.res" >"$WORK/mount-ok"
comm -23 "$WORK/local-ok" "$WORK/mount-ok" | comm -23 - "$WORK/excluded" >"$WORK/regressions"
note "local disk: $(wc -l <"$WORK/local-ok") ok; mount: $(wc -l <"$WORK/mount-ok") ok"
if [ -s "$WORK/regressions" ]; then
  echo "cases passing on the local disk but not on aquifer:"
  cat "$WORK/regressions"
  grep -F -f "$WORK/regressions" -A12 "$WORK/mount.txt" | head -150
  exit 1
fi
note "ok"
