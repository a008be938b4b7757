#!/usr/bin/env bash
# The S3 test server: s3s-fs on 127.0.0.1 with SigV4 keys, its objects as files under DIR/data.
#   scripts/s3-server.sh start DIR [PORT]   start it (keys kept in DIR/keys across restarts)
#                                           and print the environment for tests to eval
#   scripts/s3-server.sh stop DIR           stop it
set -euo pipefail
cmd=${1:?usage: s3-server.sh start|stop DIR [PORT]}
dir=${2:?usage: s3-server.sh start|stop DIR [PORT]}

stop() {
  [ -f "$dir/pid" ] || return 0
  local pid; pid=$(cat "$dir/pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$dir/pid"
}

case $cmd in
start)
  port=${3:-8014}
  command -v s3s-fs >/dev/null || { echo "s3s-fs is not installed: run scripts/install-deps.sh --test" >&2; exit 1; }
  stop
  mkdir -p "$dir/data"
  if [ ! -f "$dir/keys" ]; then
    echo "aquifer-test $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$dir/keys"
  fi
  read -r ak sk <"$dir/keys"
  s3s-fs --host 127.0.0.1 --port "$port" --access-key "$ak" --secret-key "$sk" "$dir/data" \
    >>"$dir/server.log" 2>&1 &
  echo $! >"$dir/pid"
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "export AWS_ACCESS_KEY_ID=$ak AWS_SECRET_ACCESS_KEY=$sk AWS_REGION=us-east-1 AQUIFER_TEST_S3=http://127.0.0.1:$port/aquifer-test"
      exit 0
    fi
    kill -0 "$(cat "$dir/pid")" 2>/dev/null || break
    sleep 0.1
  done
  echo "s3s-fs did not start on 127.0.0.1:$port; see $dir/server.log" >&2
  tail -5 "$dir/server.log" >&2 || true
  stop
  exit 1
  ;;
stop) stop ;;
*) echo "usage: s3-server.sh start|stop DIR [PORT]" >&2; exit 2 ;;
esac
