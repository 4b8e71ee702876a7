#!/usr/bin/env bash
# Steady-state Redis cost of metering (issue 12): one sluice (one worker,
# pinned to CPU 0) in front of modstub, redis-server, modstub and wrk on the
# other CPU(s), bench/lua/pass_uniform.lua (10,000 accounts uniform, the API
# mix) for a long run, then SIGTERM (the final flush). Reported: redis-server
# CPU (utime+stime of its process) per proxied request over the run and the
# final flush, Redis's command counts, and wrk's latency.
#
# Why a separate script: proxy_bench.sh's runs are a few seconds and
# interleaved with other contenders, so a flush interval of 10 s or more is
# charged by settling (an upper bound). Here the run lasts many intervals,
# so what is measured is the steady state (plus at most one interval's keys
# at the final flush, a bias of interval / run).
#
# Usage: bench/metering_cost.sh [seconds [sluice options...]]
#   e.g. bench/metering_cost.sh 125 --flush-ms 10000
#        bench/metering_cost.sh 125 --flush-ms 10000 --flush-quiet-ms 60000
# Binaries: BENCH_BIN_DIR (build/bin): sluice, modstub; redis-server,
# redis-cli and wrk from PATH. Everything listens on 127.0.0.1 and is
# stopped by PID at exit.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
secs=${1:-125}
shift || true
bin=${BENCH_BIN_DIR:-$root/build/bin}
accounts=${BENCH_ACCOUNTS:-10000}
ncpu=$(nproc)
proxy_cpu=0
load_cpus=$((ncpu > 1 ? 1 : 0))
((ncpu > 2)) && load_cpus=1-$((ncpu - 1))
tmp=$(mktemp -d /tmp/metering_cost.XXXXXX)
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
die() { echo "metering_cost: $*" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
wait_port() { # port pid what
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || die "$3 exited"
    sleep 0.1
  done
  die "$3 did not listen on $1"
}

rp=$(free_port); mp=$(free_port); sp=$(free_port); ap=$(free_port)
taskset -c "$load_cpus" redis-server --port "$rp" --bind 127.0.0.1 --save '' --appendonly no >"$tmp/redis.log" 2>&1 &
rpid=$!; pids+=("$rpid")
wait_port "$rp" "$rpid" redis-server
awk -v n="$accounts" 'function arg(x) { return sprintf("$%d\r\n%s\r\n", length(x), x) }
  BEGIN { for (i = 0; i < n; i++) printf "*3\r\n%s%s%s", arg("SET"), arg(sprintf("sluice:ak:AK%05d", i)), arg(sprintf("uid%05d", i)) }' |
  redis-cli -p "$rp" --pipe >"$tmp/seed.log" || die "seeding failed"
taskset -c "$load_cpus" "$bin/modstub" --listen "127.0.0.1:$mp" >"$tmp/modstub.log" 2>&1 &
mpid=$!; pids+=("$mpid")
wait_port "$mp" "$mpid" modstub
mkdir -p "$tmp/spool"
taskset -c "$proxy_cpu" "$bin/sluice" --listen "127.0.0.1:$sp" --admin "127.0.0.1:$ap" --workers 1 \
  --upstream "127.0.0.1:$mp" --upstream-llm "127.0.0.1:$mp" --redis "127.0.0.1:$rp" --redis-prefix sluice: \
  --spool-dir "$tmp/spool" "$@" >"$tmp/sluice.log" 2>&1 &
spid=$!; pids+=("$spid")
wait_port "$sp" "$spid" sluice
run_wrk() { # seconds [extra wrk args]
  local s=$1
  shift
  BENCH_LUA_DIR=$here/lua BENCH_ACCOUNTS=$accounts taskset -c "$load_cpus" \
    timeout -k 5 $((s + 30)) wrk -t1 -c64 -d"${s}s" "$@" -s "$here/lua/pass_uniform.lua" "http://127.0.0.1:$sp/"
}
run_wrk 2 >/dev/null # every account looked up once
redis-cli -p "$rp" config resetstat >/dev/null
r0=$(ticks "$rpid")
run_wrk "$secs" --latency >"$tmp/wrk.txt"
kill -TERM "$spid"
wait "$spid" || die "sluice exited non-zero: $(tail -3 "$tmp/sluice.log")"
r1=$(ticks "$rpid")
reqs=$(awk '/requests in/ {print $1}' "$tmp/wrk.txt")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$tmp/wrk.txt")
echo "## metering_cost $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "sluice options: ${*:-(defaults)}; run ${secs} s; pass_uniform, $accounts accounts; sluice on CPU $proxy_cpu, redis/modstub/wrk on CPU $load_cpus"
grep -E 'Requests/sec|^ +50%|^ +99%' "$tmp/wrk.txt"
echo "requests $reqs, non-2xx ${non2xx:-0}; redis-server CPU $(((r1 - r0) * 10)) ms" \
  "= $(awk -v t=$((r1 - r0)) -v hz="$(getconf CLK_TCK)" -v n="$reqs" 'BEGIN {printf "%.3f", t / hz * 1e6 / n}') us per request"
redis-cli -p "$rp" info commandstats | sed -n 's/^cmdstat_\([a-z]*\):calls=\([0-9]*\),.*/  \1 \2/p' | sort -k2 -rn | head -8
