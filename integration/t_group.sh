#!/usr/bin/env bash
# A peer cache group: three members of one Redis volume on 127.0.0.2-4 (blocks in the S3
# test server) read one dataset at once and the S3 server sends it about once (counted by
# the kernel: an iptables rule on its port, not by Aquifer); a member killed with -9 during
# an epoch leaves the others to finish byte for byte; a flipped byte in a member's cache
# files never reaches a reader; a cache node (`aquifer cache-node`, no mount) owns and
# serves its share and leaves on SIGTERM; warmup through one member fills the group once;
# a member of another volume with the same group name gets nothing of this one, and a
# request without the volume's key is refused.
source "$(dirname "$0")/lib.sh"
own_s3_server
start_redis
META_A="redis://127.0.0.1:$REDIS_PORT/1"
META_B="redis://127.0.0.1:$REDIS_PORT/2"
"$AQUIFER" format "$META_A" vola --storage s3 --bucket "http://127.0.0.1:$S3_PORT/grp" >/dev/null
"$AQUIFER" format "$META_B" volb --storage s3 --bucket "http://127.0.0.1:$S3_PORT/grp" >/dev/null
META=$META_A

# The S3 server's bytes out, as the kernel counts them (TCP payload and headers of every
# segment it sends from its port).
RULE=(OUTPUT -p tcp --sport "$S3_PORT" -m comment --comment "aquifer-t_group-$S3_PORT" -j ACCEPT)
iptables -I "${RULE[@]}" || fail "iptables cannot add a rule to count the S3 server's bytes (root with CAP_NET_ADMIN and nf_tables needed)"
CLEANUPS+=("iptables -D ${RULE[*]}")
s3_sent() {
  iptables -L OUTPUT -v -x -n | awk -v c="aquifer-t_group-$S3_PORT" '$0 ~ c {print $2; exit}'
}

# The dataset: many small files and a few large ones, written by a mount outside the group.
mkdir -p "$WORK/src/a" "$WORK/src/b" "$WORK/src/c" "$WORK/src/d"
for i in $(seq 1 120); do head -c $((100 << 10 + i * 512)) /dev/urandom >"$WORK/src/a/s$i"; done
for i in 1 2; do head -c $((24 << 20)) /dev/urandom >"$WORK/src/a/big$i"; done
for i in $(seq 1 60); do head -c $((256 << 10)) /dev/urandom >"$WORK/src/b/s$i"; done
for i in 1 2 3; do head -c $((16 << 20)) /dev/urandom >"$WORK/src/b/big$i"; done
for i in $(seq 1 40); do head -c $((200 << 10)) /dev/urandom >"$WORK/src/c/s$i"; done
head -c $((20 << 20)) /dev/urandom >"$WORK/src/c/big"
for i in $(seq 1 40); do head -c $((192 << 10)) /dev/urandom >"$WORK/src/d/s$i"; done
W=$WORK/writer
mount_volume "$W" --cache-dir memory
cp -r "$WORK/src/a" "$WORK/src/b" "$WORK/src/c" "$WORK/src/d" "$W/"
umount_volume "$W"
bytes_a=$(du -sb --apparent-size "$WORK/src/a" | cut -f1)
bytes_c=$(du -sb --apparent-size "$WORK/src/c" | cut -f1)
(cd "$WORK/src" && find a b c d -type f -exec md5sum {} + | sort -k2) >"$WORK/want.md5"

# member N: a mount on 127.0.0.N with a disk cache of its own, in group "train".
member() {
  local n=$1; shift
  mount_volume "$WORK/m$n" --cache-group train --group-ip "127.0.0.$n" \
    --cache-dir "$WORK/cache$n" --cache-size 1G --metrics none "$@"
  eval "PID$n=$DAEMON_PID"
}
# figure MOUNT KEY: one number of the mount's group figures.
figure() {
  "$AQUIFER" stats --json "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)['group']['$2'])"
}
# wait_members MOUNT N: until MOUNT sees N members (or more: a killed member's session
# stays listed until its timeout).
wait_members() {
  local i
  for i in $(seq 1 100); do
    [ "$(figure "$1" members)" -ge "$2" ] && return 0
    sleep 0.1
  done
  fail "$1 sees $(figure "$1" members) members, not $2"
}
# read_all MOUNT DIR: read every file of DIR and compare with the source.
read_all() {
  (cd "$1" && find "$2" -type f -exec md5sum {} + | sort -k2) >"$WORK/got.$(basename "$1").$2"
  diff <(grep " $2/" "$WORK/want.md5") "$WORK/got.$(basename "$1").$2" >/dev/null
}

member 2
member 3
member 4
for n in 2 3 4; do wait_members "$WORK/m$n" 3; done

# 1. One dataset, three readers at once: the store sends it about once.
before=$(s3_sent)
pids=()
for n in 2 3 4; do read_all "$WORK/m$n" a & pids+=($!); done
for p in "${pids[@]}"; do wait "$p" || fail "a member read wrong bytes of dataset a"; done
sent=$(($(s3_sent) - before))
ratio=$(python3 -c "print(f'{$sent / $bytes_a:.2f}')")
note "3 members read $bytes_a bytes; the S3 server sent $sent ($ratio x)"
for n in 2 3 4; do
  note "m$n: peer in $(figure "$WORK/m$n" peer_bytes_in), out $(figure "$WORK/m$n" peer_bytes_out)"
done
python3 -c "import sys; sys.exit(0 if $sent <= 1.2 * $bytes_a else 1)" ||
  fail "the S3 server sent $ratio x the dataset to a group of three (at most 1.2 x)"
[ "$(figure "$WORK/m3" peer_hits)" -gt 0 ] || fail "m3 got no block from its peers"

# 2. Warmup on one member fills the group once: each block cached at its owner, --check on
# another member reports it all cached, that member then reads it without the store, and
# every member's node says the directory is warm (the marks its node daemon labels from).
before=$(s3_sent)
"$AQUIFER" warmup "$WORK/m2/c" >/dev/null || fail "warmup through a member failed"
sent=$(($(s3_sent) - before))
note "warmup of $bytes_c bytes through m2: the S3 server sent $sent"
python3 -c "import sys; sys.exit(0 if $sent <= 1.2 * $bytes_c else 1)" ||
  fail "warming the group read $sent bytes from the store for $bytes_c"
out=$("$AQUIFER" warmup --check "$WORK/m3/c")
note "check on m3: $out"
[[ "$out" == *"(100.0%)"* ]] || fail "m3 does not see dataset c cached in the group: $out"
before=$(s3_sent)
read_all "$WORK/m3" c || fail "m3 read wrong bytes of the warmed dataset"
sent=$(($(s3_sent) - before))
python3 -c "import sys; sys.exit(0 if $sent <= 0.05 * $bytes_c else 1)" ||
  fail "m3 read $sent bytes of a warmed dataset from the store"
ino_c=$(stat -c %i "$WORK/m4/c")
# marks MOUNT: the directories the mount reports warm (control ioctl MARKS).
marks() {
  python3 - "$1" <<'EOF'
import fcntl, os, struct, sys
MARKS = (2 << 30) | (4096 << 16) | (0xAC << 8) | 3
fd = os.open(sys.argv[1], os.O_RDONLY)
buf = bytearray(4096)
n = fcntl.ioctl(fd, MARKS, buf, True)
print(" ".join(str(v >> 1) for (v,) in struct.iter_unpack("<Q", bytes(buf[:n])) if v & 1))
EOF
}
for i in $(seq 1 50); do [[ " $(marks "$WORK/m4") " == *" $ino_c "* ]] && break; sleep 0.1; done
[[ " $(marks "$WORK/m4") " == *" $ino_c "* ]] ||
  fail "m4's node is not told that dataset c is warm in its group: marks $(marks "$WORK/m4")"

# 3. kill -9 of a member during an epoch of dataset b: the others finish, byte for byte.
# Its session stays listed until it times out (60 s), so the others keep asking it: each is
# refused at once and passes it over. Then m2 reads dataset c, warmed in the group: a third
# of it is cached at the dead member only, and comes from the store instead, right.
pids=()
for n in 2 3; do read_all "$WORK/m$n" b & pids+=($!); done
sleep 0.3
kill -9 "$PID4"
for p in "${pids[@]}"; do wait "$p" || fail "a member read wrong bytes after a peer was killed"; done
read_all "$WORK/m2" c || fail "m2 read wrong bytes of dataset c with a member dead"
# Passed over for 10 s after a refused request: during epoch b or this read.
[ "$(figure "$WORK/m2" suspects)" -ge 1 ] || fail "m2 did not pass over the killed member"
[ "$(figure "$WORK/m2" peer_misses)" -gt 0 ] || fail "m2 never asked the killed member"
note "m2 passed over the killed member ($(figure "$WORK/m2" peer_misses) misses in all)"
fusermount3 -uz "$WORK/m4" 2>/dev/null || true

# 4. A flipped byte in a member's cache files: the readers get the right bytes. m3 restarts
# on its cache (the same member id: it owns the same blocks) with a byte of every cached
# block flipped; a new reader that owns nothing (--no-sharing) then asks it for them.
PID=$PID3
DAEMON_PID=$PID3
umount_volume "$WORK/m3"
flipped=0
while IFS= read -r -d '' f; do
  python3 - "$f" <<'EOF'
import os, sys
p = sys.argv[1]
with open(p, "r+b") as f:
    f.seek(os.path.getsize(p) // 2)
    b = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([b[0] ^ 0x5A]))
EOF
  flipped=$((flipped + 1))
done < <(find "$WORK/cache3" -type f -size +16k -print0)
note "flipped a byte in $flipped of m3's cache files"
[ "$flipped" -gt 0 ] || fail "m3 cached nothing"
member 3
mount_volume "$WORK/m5" --cache-group train --group-ip 127.0.0.5 --no-sharing --cache-dir memory --metrics none
wait_members "$WORK/m5" 3
read_all "$WORK/m5" a || fail "a reader got wrong bytes from a member with damaged cache files"
read_all "$WORK/m5" b || fail "a reader got wrong bytes of dataset b"
[ "$(figure "$WORK/m5" peer_corrupt)" = 0 ] || note "m5 caught $(figure "$WORK/m5" peer_corrupt) damaged blocks on the way"
[ "$(figure "$WORK/m5" peer_hits)" -gt 0 ] || fail "the no-sharing reader got no block from the group"
[ "$(figure "$WORK/m5" served)" = 0 ] || fail "a member that owns nothing served blocks"

# 5. A cache node (`aquifer cache-node`, no mount) joins: it owns a share of the blocks and
# serves it (its Prometheus figures say so), and SIGTERM makes it leave cleanly.
cn_metrics=127.0.0.1:$(free_port)
"$AQUIFER" cache-node "$META_A" --cache-group train --group-ip 127.0.0.7 \
  --cache-dir "$WORK/cache7" --cache-size 1G --metrics "$cn_metrics" >"$WORK/cn.log" 2>&1 &
CN=$!
CLEANUPS+=("kill -9 $CN")
for i in $(seq 1 100); do grep -q "127.0.0.7:" "$WORK/m5.log" && break; sleep 0.1; done
grep -q "127.0.0.7:" "$WORK/m5.log" || fail "m5 never saw the cache node join: $(tail -3 "$WORK/cn.log")"
read_all "$WORK/m5" d || fail "a reader got wrong bytes with a cache node in the group"
served=$(curl -s "http://$cn_metrics/metrics" |
  awk '/^aquifer_group_blocks_total\{group="train",direction="out"\}/ {print $2}')
note "the cache node served ${served:-0} blocks of dataset d"
[ "${served:-0}" -gt 0 ] || fail "the cache node served no block"
kill -TERM "$CN"
wait "$CN" || fail "the cache node did not exit cleanly on SIGTERM: $(tail -3 "$WORK/cn.log")"

# 6. A member of another volume with the same group name: it sees only its own volume's
# members, and a request made with its volume's key gets nothing from this one's members.
META=$META_B
mkdir -p "$WORK/vb"
mount_volume "$WORK/vb" --cache-group train --group-ip 127.0.0.6 --cache-dir memory --metrics none
echo "volume b" >"$WORK/vb/own"
[ "$(figure "$WORK/vb" members)" = 1 ] || fail "a member of volume b sees members of volume a"
[ "$(cat "$WORK/vb/own")" = "volume b" ] || fail "volume b's member cannot read its own file"
setting() { # setting META FIELD: a field of the volume's settings, secrets included
  "$AQUIFER" dump "$1" - --keep-secret-key 2>/dev/null | sed -n '2p' |
    python3 -c "import json,sys; l=sys.stdin.read().strip(); print(json.loads(l[len('\"setting\":'):].rstrip(','))['$2'])"
}
uuid_a=$(setting "$META_A" uuid)
key=$(cd "$S3_DIR/data/grp/vola" && find chunks -type f -print -quit)
[ -n "$key" ] || fail "no block of volume a in the store"
addr2=$(figure "$WORK/m2" address)
# sign META: the credentials a member of META's group "train" puts on a GET of $key.
sign() {
  python3 - "$(setting "$1" uuid)/train" "$(setting "$1" group_secret)" "/v1/$uuid_a/block/$key" <<'EOF'
import hashlib, hmac, sys
ident, secret, path = sys.argv[1:]
k = hmac.new(secret.encode(), b"aquifer-group-key/v1/" + ident.encode(), hashlib.sha256).digest()
print("v1:" + hmac.new(k, b"GET\n" + path.encode(), hashlib.sha256).hexdigest())
EOF
}
status() { curl -s -o /dev/null -w '%{http_code}' "$@" "http://$addr2/v1/$uuid_a/block/$key"; }
[ "$(status)" = 403 ] || fail "a request without a key was not refused"
[ "$(status -H "x-aquifer-group: $(sign "$META_B")")" = 403 ] ||
  fail "a request with volume b's key got an answer from volume a's member"
[ "$(status -H "x-aquifer-group: $(sign "$META_A")")" = 200 ] ||
  fail "a request with volume a's key was not served (the test's signing is wrong?)"
note "no key: refused; volume b's key: refused; volume a's key: served"
