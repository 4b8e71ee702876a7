#!/usr/bin/env bash
# The demo: installs what is missing, builds, starts modstub and sluice on
# loopback, drives a short wrk load through sluice, prints what happened,
# and stops everything it started.
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
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "demo: nothing listens on 127.0.0.1:$1" >&2
  exit 1
}

backend=$(free_port) port=$(free_port) admin=$(free_port)
build/bin/modstub --listen "127.0.0.1:$backend" --latency-ms 1 2>"$tmp/modstub.log" &
pids+=($!)
wait_port "$backend"
build/bin/sluice --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" --workers 2 \
  --upstream "127.0.0.1:$backend" 2>"$tmp/sluice.log" &
pids+=($!)
wait_port "$port"
wait_port "$admin"

echo "== one moderation call through sluice (127.0.0.1:$port -> modstub 127.0.0.1:$backend)"
curl -s -X POST "http://127.0.0.1:$port/?Action=TextModeration&AccessKeyId=demo" \
  -H 'Host: green-cip.cn-shanghai.aliyuncs.com' \
  --data-urlencode 'Service=chat_detection' --data-urlencode 'ServiceParameters={"content":"hello"}'
echo
echo "== 3 s of wrk load (2 threads, 32 connections)"
wrk -t2 -c32 -d3s "http://127.0.0.1:$port/?Action=TextModeration&AccessKeyId=demo"
echo "== what sluice counted (admin /metrics)"
curl -s "http://127.0.0.1:$admin/metrics" | grep -E '^sluice_(requests_total|connections_accepted|upstream_connects|upstream_reused|upstream_latency_seconds_count)'
echo "== what the backend answered (modstub /stats)"
curl -s "http://127.0.0.1:$backend/stats"
echo
