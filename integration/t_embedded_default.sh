#!/usr/bin/env bash
# `aquifer mount MOUNTPOINT` with no metadata URL formats and mounts the embedded default
# volume (RocksDB + local blocks under the data dir) on first use, and reuses it after.
source "$(dirname "$0")/lib.sh"
export AQUIFER_DATA_DIR=$WORK/data
mp=$WORK/mnt
mkdir -p "$mp"
"$AQUIFER" --version | grep -q '^aquifer ' || fail "--version"
out=$("$AQUIFER" mount -d "$mp" --log "$WORK/default.log") || fail "default mount"
DAEMON_PID=$(sed -n 's/.*(pid \([0-9]*\),.*/\1/p' <<<"$out"); MOUNTS+=("$mp")
[ -d "$AQUIFER_DATA_DIR/default/meta" ] || fail "no metadata under the data dir"
head -c 5000000 /dev/urandom >"$WORK/data.bin"
cp "$WORK/data.bin" "$mp/file"
[ -n "$(find "$AQUIFER_DATA_DIR/default/blocks" -type f | head -1)" ] || fail "no blocks under the data dir"
umount_volume "$mp"
out=$("$AQUIFER" mount -d "$mp" --log "$WORK/default.log") || fail "second default mount"
DAEMON_PID=$(sed -n 's/.*(pid \([0-9]*\),.*/\1/p' <<<"$out")
cmp "$WORK/data.bin" "$mp/file" || fail "data lost across remount of the default volume"
"$AQUIFER" status "rocksdb://$AQUIFER_DATA_DIR/default/meta" >"$WORK/status.json"
python3 - "$WORK/status.json" <<'PY' || fail "status output"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["setting"]["name"] == "default", s
assert len(s["sessions"]) == 1, s
assert s["usage"]["used_bytes"] >= 5000000, s
PY
# `aquifer umount` returns once the daemon has finished and released the volume, so it can
# be mounted again straight away (scripts, CSI unpublish/publish).
rm "$mp/file"
"$AQUIFER" umount "$mp" || fail "umount"
state=$(awk '{print $3}' "/proc/$DAEMON_PID/stat" 2>/dev/null || echo gone)
[ "$state" = gone ] || [ "$state" = Z ] || fail "umount returned while daemon $DAEMON_PID still runs ($state)"
out=$("$AQUIFER" mount -d "$mp" --log "$WORK/default.log") || fail "mount right after umount"
DAEMON_PID=$(sed -n 's/.*(pid \([0-9]*\),.*/\1/p' <<<"$out")
umount_volume "$mp"
note "ok"
