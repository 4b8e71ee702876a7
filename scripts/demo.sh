#!/usr/bin/env bash
# The demo: installs what is missing, builds, starts redis-server, modstub and
# sluice on loopback, seeds a few accounts (one suspended, one with a QPS
# package, one with a low limit), drives a short wrk load through sluice,
# prints what happened per account as read back from Redis, then shows the
# billing loop (docs/rating.md): a day rated, an account going overdue and
# refused, a top-up, the account admitted again (timed), and stops
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

# ---- the billing loop (SPEC 8, docs/rating.md) ----
# sluice-rate rates only days that have ended, so the demo rates a past day
# whose usage it seeds directly into Redis (as the metering writes it:
# usage:<day>:<uid>, field <feature>:<service>:<region>). Until the metering
# names services (issue 13, proxy side), today's real fields above are
# <feature>:<region>, which sluice-rate rates as calls without a service.
sluice_rate=build/bin/sluice-rate
r() { redis-cli -h 127.0.0.1 -p "$rport" "$@"; }
past=20240501
rc SET sluice:price:chat_detection 1.2            # currency per 1,000 calls
rc SET sluice:coef:baselineCheck 2.5              # units per call
rc SET sluice:price:baselineCheck 0.9
rc SADD sluice:usage:$past 1001 1003
rc HSET sluice:usage:$past:1001 text:chat_detection:cn-shanghai 4000
rc HSET sluice:usage:$past:1003 text:chat_detection:cn-shanghai 900 image:baselineCheck:cn-shanghai 100
rc SET sluice:balance:1001 2000000                 # 2.000000 prepaid
rc HSET sluice:respkg:1003:pk1 quota 1000 remaining 1000 purchased_at 1700000000   # valid 365 days
rc SADD sluice:respkgs:1003 pk1
rc SET sluice:balance:1003 1000000                 # 1.000000

# sluice again (it was stopped to flush its counts), to watch the suspension.
build/bin/sluice --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" --workers 2 \
  --upstream "127.0.0.1:$backend" --redis "127.0.0.1:$rport" --spool-dir "$tmp/spool" \
  --flush-ms 500 2>>"$tmp/sluice.log" &
sluice_pid=$!
pids+=($sluice_pid)
wait_port "$port"
alice() {
  curl -s -o "$tmp/alice.out" -w '%{http_code}' "http://127.0.0.1:$port/?Action=TextModeration&AccessKeyId=AK_ALICE&Service=chat_detection"
}
echo
echo "== rating $past (seeded usage): sluice-rate --day $past"
"$sluice_rate" --day $past --redis "127.0.0.1:$rport" 2>"$tmp/rate.err" | sed 's/^/   /'
echo "-- bill of 1001: $(r HMGET sluice:bill:$past:1001 units_total payg_calls:chat_detection amount balance_after | paste -sd' ')"
echo "   (units_total payg_calls amount balance_after: 4000 calls x 1.2 / 1000 = 4.80 against 2.00 prepaid)"
echo "-- 1001 suspended: $(r HGETALL sluice:suspension:1001 | paste -sd' ')"
echo "-- bill of 1003: $(r HMGET sluice:bill:$past:1003 units_total units_from_packages payg_units amount | paste -sd' ')"
echo "   package pk1 remaining $(r HGET sluice:respkg:1003:pk1 remaining) of 1000; alerts: $(r XLEN sluice:alerts)"
# The proxy learns of the suspension within 1 s (keyspace notifications).
for _ in $(seq 40); do [ "$(alice)" = 403 ] && break; sleep 0.05; done
echo "== AK_ALICE now: HTTP $(alice) $(grep -o '"Code":"[^"]*"' "$tmp/alice.out")"
echo "== a rerun changes nothing: $("$sluice_rate" --day $past --redis "127.0.0.1:$rport" 2>/dev/null | paste -sd' ')"
echo "== top-up of 5.00: sluice-rate topup --uid 1001 --amount 5 --ref demo-1"
"$sluice_rate" topup --uid 1001 --amount 5 --ref demo-1 --redis "127.0.0.1:$rport" | sed 's/^/   /'
t0=$(date +%s%N)
code=$(alice)
while [ "$code" != 200 ]; do
  if [ $(( ($(date +%s%N) - t0) / 1000000 )) -gt 5000 ]; then echo "demo: not admitted 5 s after the top-up" >&2; exit 1; fi
  sleep 0.01
  code=$(alice)
done
echo "== AK_ALICE admitted again (HTTP $code) $(( ($(date +%s%N) - t0) / 1000000 )) ms after sluice-rate topup returned (SPEC: within 1 s)"
echo "== statement of 1001 for $past (csv):"
"$sluice_rate" statement --uid 1001 --from $past --to $past --format csv --redis "127.0.0.1:$rport" | sed 's/^/   /'
