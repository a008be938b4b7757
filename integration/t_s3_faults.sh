#!/usr/bin/env bash
# The S3 server goes away in the middle of a write workload and comes back. Writers wait and
# succeed, or get an error from write/fsync/close; no acknowledged byte is lost, and everything
# reads back intact, also after a remount. Bad S3 settings are one clear error line.
source "$(dirname "$0")/lib.sh"
own_s3_server
root=$ROOT s3dir=$S3_DIR port=$S3_PORT
url=http://127.0.0.1:$port

# Bad settings: one line, exit 1, no secret in it.
expect_error() {  # expect_error WHAT PATTERN CMD...
  local what=$1 pat=$2; shift 2
  local out rc=0
  out=$("$@" 2>&1) || rc=$?
  [ $rc -ne 0 ] || fail "$what: succeeded"
  [ "$(wc -l <<<"$out")" -eq 1 ] || fail "$what: more than one line: $out"
  grep -q "^aquifer: error:.*$pat" <<<"$out" || fail "$what: $out"
  ! grep -q -- "$AWS_SECRET_ACCESS_KEY\|not-the-secret" <<<"$out" || fail "$what: secret printed: $out"
}
expect_error "unreachable server" "unavailable" \
  "$AQUIFER" format "rocksdb://$WORK/x1" x1 --storage s3 --bucket "http://127.0.0.1:9/bkt"
expect_error "wrong secret" "denied" \
  "$AQUIFER" format "rocksdb://$WORK/x2" x2 --storage s3 --bucket "$url/bkt" \
  --access-key "$AWS_ACCESS_KEY_ID" --secret-key not-the-secret
expect_error "bad bucket url" "invalid S3 bucket" \
  "$AQUIFER" format "rocksdb://$WORK/x3" x3 --storage s3 --bucket "127.0.0.1:$port/bkt"
expect_error "bad compression" "compression" \
  "$AQUIFER" format "rocksdb://$WORK/x4" x4 --storage s3 --bucket "$url/bkt" --compression gzip

# JuiceFS's name for path-style S3 is accepted and stored as s3.
"$AQUIFER" format "rocksdb://$WORK/x5" x5 --storage minio --bucket "$url/bkt" >/dev/null \
  || fail "--storage minio"
"$AQUIFER" status "rocksdb://$WORK/x5" | grep -q '"storage": "s3"' || fail "--storage minio not stored as s3"

# Keys given at format time are kept with the volume: the mount needs no environment.
META=rocksdb://$WORK/v/meta
"$AQUIFER" format "$META" faults --storage s3 --bucket "$url/faults" --compression zstd \
  --access-key "$AWS_ACCESS_KEY_ID" --secret-key "$AWS_SECRET_ACCESS_KEY" >/dev/null
"$AQUIFER" status "$META" | grep -q '"secret_key": "removed"' || fail "status shows the secret"
! "$AQUIFER" status "$META" | grep -q -- "$AWS_SECRET_ACCESS_KEY" || fail "status shows the secret"
secret=$AWS_SECRET_ACCESS_KEY
unset AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
mp=$WORK/mnt
mount_volume "$mp"

# Each file is written, fsync'ed and closed; only then is it listed as acknowledged.
cat >"$WORK/writer.py" <<'PY'
import hashlib, os, sys, time
mp, acked, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
end, i, errors = time.time() + seconds, 0, 0
with open(acked, "w") as log:
    while time.time() < end:
        data = os.urandom(3 << 20) + bytes(1 << 20)
        name = f"w{i:04d}"
        i += 1
        try:
            fd = os.open(f"{mp}/{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            errors += 1
            print(f"{name}: {e}", file=sys.stderr)
            time.sleep(0.2)
            continue
        log.write(f"{name} {hashlib.sha256(data).hexdigest()} {time.time()}\n")
        log.flush()
print(f"{i} files, {errors} errors", file=sys.stderr)
PY
timeout 300 python3 "$WORK/writer.py" "$mp" "$WORK/acked" 16 2>"$WORK/writer.err" &
writer=$!
sleep 3
"$root/scripts/s3-server.sh" stop "$s3dir"
down=$(date +%s.%N)
sleep 6
"$root/scripts/s3-server.sh" start "$s3dir" "$port" >/dev/null
wait $writer || fail "writer: $(tail -3 "$WORK/writer.err")"
note "writer: $(tail -1 "$WORK/writer.err")"
after=$(awk -v t="$down" '$3 > t + 6' "$WORK/acked" | wc -l)
[ "$after" -gt 0 ] || fail "no file was acknowledged after the server came back"

verify() {
  local n=0 name sum ts
  while read -r name sum ts; do
    [ "$(sha256sum <"$mp/$name" | cut -d' ' -f1)" = "$sum" ] || fail "$1: $name differs"
    n=$((n + 1))
  done <"$WORK/acked"
  [ $n -gt 0 ] || fail "nothing was acknowledged"
  note "$1: $n acknowledged files intact"
}
verify "after the outage"
umount_volume "$mp"
mount_volume "$mp"
verify "after a remount"
umount_volume "$mp"
export AWS_SECRET_ACCESS_KEY=$secret
note "ok"
