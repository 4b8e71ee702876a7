#!/usr/bin/env bash
# The demo: installs what is missing, builds, starts redis-server, modstub and
# sluice on loopback, seeds a few accounts (one suspended, one with a QPS
# package, one with a low limit), drives a short wrk load through sluice,
# prints what happened per account as read back from Redis, and stops
# everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deps/install.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$(nproc)" >/dev/null

tmp=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "demo: nothing listens on 127.0.0.1:$1" >&2
  exit 1
}

rport=$(free_port) backend=$(free_port) port=$(free_port) admin=$(free_port)
redis-server --bind 127.0.0.1 --port "$rport" --save '' --appendonly no --dir "$tmp" >"$tmp/redis.log" 2>&1 &
pids+=($!)
wait_port "$rport"
rc() { redis-cli -h 127.0.0.1 -p "$rport" "$@" >/dev/null; }

# Accounts: AccessKeyId -> UID.
rc SET sluice:ak:AK_ALICE 1001   # an ordinary account: text at the default 100 QPS
rc SET sluice:ak:AK_BOB 1002     # suspended for overdue payment
rc SET sluice:ak:AK_CAROL 1003   # bought a +400 QPS package for text
rc SET sluice:ak:AK_DAVE 1004    # image at a low limit (feature override: 20 QPS)
rc SADD sluice:suspended 1002
now=$(date +%s)
rc HSET sluice:qpspkg:1003:pkg1 feature text region cn-shanghai qps 400 starts_at "$now" expires_at $((now + 86400))
rc SADD sluice:qpspkgs:1003 pkg1
rc HSET sluice:feature:image default_qps 20

build/bin/modstub --listen "127.0.0.1:$backend" --workers 1 2>"$tmp/modstub.log" &
pids+=($!)
wait_port "$backend"
build/bin/sluice --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" --workers 2 \
  --upstream "127.0.0.1:$backend" --redis "127.0.0.1:$rport" --spool-dir "$tmp/spool" \
  --flush-ms 500 2>"$tmp/sluice.log" &
sluice_pid=$!
pids+=($sluice_pid)
wait_port "$port"
wait_port "$admin"

echo "== one moderation call through sluice (127.0.0.1:$port -> modstub 127.0.0.1:$backend)"
curl -s -X POST "http://127.0.0.1:$port/?Action=TextModeration&AccessKeyId=AK_ALICE" \
  -H 'Host: green-cip.cn-shanghai.aliyuncs.com' \
  --data-urlencode 'Service=chat_detection' --data-urlencode 'ServiceParameters={"content":"hello"}'
echo
echo "== a suspended account"
curl -s "http://127.0.0.1:$port/?Action=TextModeration&AccessKeyId=AK_BOB&Service=chat_detection"
echo

cat >"$tmp/mix.lua" <<'LUA'
-- Rotates over the demo accounts; DAVE calls ImageModeration (20 QPS).
local reqs = {
  "/?Action=TextModeration&AccessKeyId=AK_ALICE&Service=chat_detection",
  "/?Action=TextModeration&AccessKeyId=AK_BOB&Service=chat_detection",
  "/?Action=TextModeration&AccessKeyId=AK_CAROL&Service=chat_detection",
  "/?Action=ImageModeration&AccessKeyId=AK_DAVE&Service=baselineCheck",
}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", reqs[(i % #reqs) + 1])
end
LUA
echo "== 3 s of wrk load over the four accounts (2 threads, 16 connections)"
wrk -t2 -c16 -d3s -s "$tmp/mix.lua" "http://127.0.0.1:$port" | sed -n '1,8p'

# SIGTERM flushes every count to Redis before sluice exits.
kill -TERM "$sluice_pid"
wait "$sluice_pid" || true
day=$(date -u +%Y%m%d)
echo "== what Redis counted for $day (sluice:calls:$day:<uid>, sluice:usage:$day:<uid>)"
for uid in 1001 1002 1003 1004; do
  case $uid in 1001) who="AK_ALICE (100 QPS)";; 1002) who="AK_BOB (suspended)";;
    1003) who="AK_CAROL (100 + 400 QPS package)";; 1004) who="AK_DAVE (image at 20 QPS)";; esac
  echo "-- uid $uid, $who"
  redis-cli -h 127.0.0.1 -p "$rport" HGETALL "sluice:calls:$day:$uid" | paste - - | sed "s/^/   calls  /"
  redis-cli -h 127.0.0.1 -p "$rport" HGETALL "sluice:usage:$day:$uid" | paste - - | sed "s/^/   usage  (billable) /"
done
echo "== billable accounts today: $(redis-cli -h 127.0.0.1 -p "$rport" SMEMBERS "sluice:usage:$day" | tr '\n' ' ')"
echo "== backend answered: $(curl -s "http://127.0.0.1:$backend/stats")"
