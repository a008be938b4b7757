#!/usr/bin/env bash
# Redis Cluster and Sentinel, started here on 127.0.0.1:
# - a 3-node cluster (`redis-cli --cluster create`): a volume on the cluster URL works, and
#   all of its keys live on the one node that owns its hash slot;
# - one master, one replica and a sentinel: a mount on the Sentinel URL keeps working
#   through a failover (kill -9 of the master), with no operation failing, and the tree is
#   consistent afterwards;
# - TLS (rediss:// with the test CA, and a client certificate the server demands): a mount
#   works; a server certificate from an unknown CA is one clear error;
# - a password from META_PASSWORD: the mount works, the password is never printed.
source "$(dirname "$0")/lib.sh"

# redis_node NAME PORT [ARGS...]: a redis-server in WORK/NAME, killed at exit.
redis_node() {
  local name=$1 port=$2; shift 2
  mkdir -p "$WORK/$name"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$WORK/$name" --save "" --appendonly yes \
    --daemonize yes --pidfile "$WORK/$name/pid" --logfile "$WORK/$name/log" "$@" >/dev/null
  CLEANUPS+=("kill -9 \$(cat $WORK/$name/pid)")
  [ "$port" = 0 ] && return 0  # TLS only: the caller waits for its port
  local i
  for i in $(seq 1 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  fail "redis node $name did not start: $(tail -3 "$WORK/$name/log" 2>/dev/null)"
}

note "cluster"
ports=()
for i in 1 2 3; do
  # A cluster node's bus port (port + 10000) must exist and be free too.
  p=$(python3 -c 'import random, socket
while True:
    p = random.randint(20000, 55000)
    try:
        for q in (p, p + 10000):
            s = socket.socket(); s.bind(("127.0.0.1", q)); s.close()
        print(p); break
    except OSError:
        pass')
  ports+=("$p")
  redis_node "c$i" "$p" --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000
done
redis-cli --cluster create "127.0.0.1:${ports[0]}" "127.0.0.1:${ports[1]}" "127.0.0.1:${ports[2]}" \
  --cluster-replicas 0 --cluster-yes >"$WORK/cluster-create.log" 2>&1 || fail "cluster create: $(tail -5 "$WORK/cluster-create.log")"
for i in $(seq 1 100); do
  redis-cli -p "${ports[0]}" cluster info | grep -q cluster_state:ok && break
  sleep 0.1
done
META="redis://127.0.0.1:${ports[0]},127.0.0.1:${ports[1]},127.0.0.1:${ports[2]}/7"
"$AQUIFER" format "$META" clustered --storage file --bucket "$WORK/cblocks" >/dev/null || fail "format on the cluster"
mount_volume "$WORK/cm"
mkdir -p "$WORK/cm/d/e"
for i in $(seq 1 50); do echo "$i" >"$WORK/cm/d/f$i"; done
mv "$WORK/cm/d/f1" "$WORK/cm/d/e/g"
head -c 5000000 /dev/urandom >"$WORK/src"
cp "$WORK/src" "$WORK/cm/d/big"
umount_volume "$WORK/cm"
mount_volume "$WORK/cm"
cmp "$WORK/src" "$WORK/cm/d/big" || fail "a file on the cluster volume"
[ "$(ls "$WORK/cm/d" | wc -l)" = 51 ] || fail "$(ls "$WORK/cm/d" | wc -l) entries in d on the cluster"
[ "$(cat "$WORK/cm/d/e/g")" = 1 ] || fail "a renamed file on the cluster"
umount_volume "$WORK/cm"
owners=0
for p in "${ports[@]}"; do
  n=$(redis-cli -p "$p" dbsize)
  [ "$n" -gt 0 ] && owners=$((owners + 1))
done
[ "$owners" = 1 ] || fail "the volume's keys are on $owners nodes, not one slot's"

note "sentinel failover"
pm=$(free_port); pr=$(free_port); ps=$(free_port)
redis_node master "$pm" --appendfsync always --repl-diskless-sync-delay 0
redis_node replica "$pr" --appendfsync always --replicaof 127.0.0.1 "$pm"
for i in $(seq 1 100); do
  redis-cli -p "$pr" info replication | grep -q master_link_status:up && break
  sleep 0.1
done
redis-cli -p "$pr" info replication | grep -q master_link_status:up || fail "the replica did not sync"
mkdir -p "$WORK/sentinel"
cat >"$WORK/sentinel/sentinel.conf" <<EOF
port $ps
bind 127.0.0.1
dir $WORK/sentinel
sentinel monitor vol 127.0.0.1 $pm 1
sentinel down-after-milliseconds vol 1000
sentinel failover-timeout vol 5000
EOF
redis-server "$WORK/sentinel/sentinel.conf" --sentinel --daemonize yes --pidfile "$WORK/sentinel/pid" \
  --logfile "$WORK/sentinel/log" >/dev/null
CLEANUPS+=("kill -9 \$(cat $WORK/sentinel/pid)")
for i in $(seq 1 100); do
  redis-cli -p "$ps" sentinel get-master-addr-by-name vol 2>/dev/null | grep -q "$pm" && break
  sleep 0.1
done
META="redis://vol,127.0.0.1:$ps/3"
"$AQUIFER" format "$META" sentinelled --storage file --bucket "$WORK/sblocks" >/dev/null || fail "format through the sentinel"
mount_volume "$WORK/sm"
start_creates "$WORK/sm/w"
sleep 1
kill -9 "$(cat "$WORK/master/pid")"
for i in $(seq 1 200); do
  redis-cli -p "$ps" sentinel get-master-addr-by-name vol | grep -q "$pr" && break
  sleep 0.1
done
redis-cli -p "$ps" sentinel get-master-addr-by-name vol | grep -q "$pr" || fail "the sentinel did not fail over"
at=$(creates_done)
sleep 3
stop_creates
n=$CREATED
note "$at files at the failover, $n in all"
[ "$n" -gt "$at" ] || fail "no progress after the failover"
[ ! -s "$WL_ERR" ] || fail "operations failed through the failover: $(head -3 "$WL_ERR")"
sleep 1.2
# Replication is asynchronous: the last creates the old master acknowledged may not have
# reached the replica. What is there must be whole and right.
present=0
for f in "$WORK/sm/w"/*; do
  [ -e "$f" ] || continue
  [ "$(cat "$f")" = "${f##*/f}" ] || fail "$f holds $(cat "$f")"
  present=$((present + 1))
done
note "$present of $n files present after the failover"
[ "$present" -ge "$at" ] || note "lost $((at - present)) acknowledged creates to asynchronous replication"
umount_volume "$WORK/sm"
"$AQUIFER" fsck "$META" >"$WORK/fsck" 2>&1 || fail "fsck after the failover: $(tail -3 "$WORK/fsck")"
note "TLS"
t=$WORK/tls; mkdir -p "$t"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$t/ca.key" -out "$t/ca.pem" -days 2 \
  -subj "/CN=aquifer test CA" 2>/dev/null
for who in server client; do
  openssl req -newkey rsa:2048 -nodes -keyout "$t/$who.key" -out "$t/$who.csr" -subj "/CN=127.0.0.1" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$t/ext"
  openssl x509 -req -in "$t/$who.csr" -CA "$t/ca.pem" -CAkey "$t/ca.key" -CAcreateserial \
    -out "$t/$who.pem" -days 2 -extfile "$t/ext" 2>/dev/null
done
pt=$(free_port)
redis_node tlsnode 0 --tls-port "$pt" --tls-cert-file "$t/server.pem" --tls-key-file "$t/server.key" \
  --tls-ca-cert-file "$t/ca.pem" --tls-auth-clients yes
for i in $(seq 1 50); do (echo >/dev/tcp/127.0.0.1/"$pt") 2>/dev/null && break; sleep 0.1; done
opts="tls-ca-cert-file=$t/ca.pem&tls-cert-file=$t/client.pem&tls-key-file=$t/client.key"
META="rediss://127.0.0.1:$pt/2?$opts"
"$AQUIFER" format "$META" tlsvol --storage file --bucket "$WORK/tblocks" >/dev/null || fail "format over TLS"
mount_volume "$WORK/tm"
echo hello >"$WORK/tm/f"
umount_volume "$WORK/tm"
mount_volume "$WORK/tm"
[ "$(cat "$WORK/tm/f")" = hello ] || fail "a file over TLS"
umount_volume "$WORK/tm"
if "$AQUIFER" status "rediss://127.0.0.1:$pt/2" 2>"$WORK/err" >/dev/null; then
  fail "trusted a certificate from an unknown CA"
fi
[ "$(wc -l <"$WORK/err")" = 1 ] && grep -qi "certificate" "$WORK/err" || fail "unclear TLS error: $(cat "$WORK/err")"

note "META_PASSWORD"
pp=$(free_port)
redis_node pwnode "$pp" --requirepass 's3cr3t-pw'
META="redis://127.0.0.1:$pp/1"
if "$AQUIFER" format "$META" pw --storage file --bucket "$WORK/pblocks" 2>"$WORK/err" >/dev/null; then
  fail "formatted without the password"
fi
[ "$(wc -l <"$WORK/err")" = 1 ] || fail "not one error line: $(cat "$WORK/err")"
export META_PASSWORD=s3cr3t-pw
"$AQUIFER" format "$META" pw --storage file --bucket "$WORK/pblocks" >"$WORK/out" || fail "format with META_PASSWORD"
mount_volume "$WORK/pm"
echo hi >"$WORK/pm/f"
"$AQUIFER" status "$META" >>"$WORK/out"
umount_volume "$WORK/pm"
unset META_PASSWORD
"$AQUIFER" format "redis://:s3cr3t-pw@127.0.0.1:$pp/3" pw3 --storage file --bucket "$WORK/p3" >>"$WORK/out" 2>&1
! grep -rq "s3cr3t-pw" "$WORK/out" "$WORK"/*.log || fail "the password was printed"
note "ok"
