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
# With BENCH_REDIS=cluster the Redis is a 3-master Redis Cluster (no
# replicas; redis-cli --cluster create) and the CPU is summed over its
# three servers (issue 14: the cluster should spread Redis's work, not add
# to it).
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

mode=${BENCH_REDIS:-single}
rpids=() rports=()
start_redis() { # extra redis-server args...
  local port pid
  port=$(free_port)
  mkdir -p "$tmp/r$port"
  taskset -c "$load_cpus" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$tmp/r$port" "$@" >"$tmp/r$port/redis.log" 2>&1 &
  pid=$!; pids+=("$pid"); rpids+=("$pid"); rports+=("$port")
  wait_port "$port" "$pid" redis-server
}
seed() { # the accounts, as SET commands on stdin of the given redis-cli
  awk -v n="$accounts" 'BEGIN { for (i = 0; i < n; i++) printf "SET sluice:ak:AK%05d uid%05d\n", i, i }' | "$@" >"$tmp/seed.log" ||
    die "seeding failed"
}
case $mode in
single)
  start_redis
  rp=${rports[0]}
  seed redis-cli -p "$rp"
  redis_url=127.0.0.1:$rp
  ;;
cluster)
  for _ in 1 2 3; do start_redis --cluster-enabled yes --cluster-config-file nodes.conf --cluster-port "$(free_port)"; done
  rp=${rports[0]}
  redis-cli --cluster create "${rports[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >"$tmp/create.log" 2>&1 ||
    die "redis-cli --cluster create failed: $(tail -3 "$tmp/create.log")"
  for _ in $(seq 100); do
    ok=1
    for p in "${rports[@]}"; do redis-cli -p "$p" cluster info | grep -q 'cluster_state:ok' || ok=0; done
    ((ok)) && break
    sleep 0.1
  done
  ((ok)) || die "the cluster is not ok after 10 s"
  seed redis-cli -c -p "$rp"
  redis_url=cluster://$(printf '127.0.0.1:%s,' "${rports[@]}")
  redis_url=${redis_url%,}
  ;;
*) die "BENCH_REDIS is single or cluster, not '$mode'" ;;
esac
mp=$(free_port); sp=$(free_port); ap=$(free_port)
redis_ticks() {
  local p t=0
  for p in "${rpids[@]}"; do t=$((t + $(ticks "$p"))); done
  echo "$t"
}
taskset -c "$load_cpus" "$bin/modstub" --listen "127.0.0.1:$mp" >"$tmp/modstub.log" 2>&1 &
mpid=$!; pids+=("$mpid")
wait_port "$mp" "$mpid" modstub
mkdir -p "$tmp/spool"
run_wrk() { # seconds [extra wrk args]
  local s=$1
  shift
  BENCH_LUA_DIR=$here/lua BENCH_ACCOUNTS=$accounts taskset -c "$load_cpus" \
    timeout -k 5 $((s + 30)) wrk -t1 -c64 -d"${s}s" "$@" -s "$here/lua/pass_uniform.lua" "http://127.0.0.1:$sp/"
}
metric() { # name: its value on sluice's /metrics (0 when absent)
  local v
  v=$(exec 3<>"/dev/tcp/127.0.0.1/$ap" && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && awk -v m="$1" '$1 == m {print $2}' <&3)
  echo "${v:-0}"
}
redis_ns() { # CPU time of every redis-server thread, ns (schedstat: finer than the ticks)
  local p
  # %.0f: mawk's %d stops at 2^31 (2.1 s of CPU), which read every later difference as 0
  for p in "${rpids[@]}"; do cat /proc/"$p"/task/*/schedstat; done | awk '{t += $1} END {printf "%.0f", t}'
}
us_per() { awk -v t="$1" -v n="$2" 'BEGIN {printf "%.1f", n ? t / 1e3 / n : 0}'; } # ns, count
# The directory (issue 14: its throughput against one server and a
# cluster), before the metering run, with a sluice that meters nothing and
# shares no limit, so that Redis works for the directory alone: the first
# look-ups of every account under load, then one full resync (a GET of the
# key and an SMEMBERS of the packages per account, grouped by slot in a
# cluster) with the proxy idle. BENCH_DIRECTORY=0 skips it.
if [[ ${BENCH_DIRECTORY:-1} == 1 ]]; then
  taskset -c "$proxy_cpu" "$bin/sluice" --listen "127.0.0.1:$sp" --admin "127.0.0.1:$ap" --workers 1 \
    --upstream "127.0.0.1:$mp" --upstream-llm "127.0.0.1:$mp" --redis "$redis_url" --redis-prefix sluice: \
    --metering off --global-limits off >"$tmp/sluice-dir.log" 2>&1 &
  dpid=$!; pids+=("$dpid")
  wait_port "$sp" "$dpid" sluice
  until (($(metric sluice_directory_resyncs_total) >= 1)); do sleep 0.1; done # the first (empty) resync
  d0=$(redis_ns); t0=$(date +%s%N)
  run_wrk 4 >/dev/null &
  wpid=$!
  until (($(metric sluice_directory_accounts) >= accounts)); do
    kill -0 "$wpid" 2>/dev/null || break
    sleep 0.05
  done
  t1=$(date +%s%N); d1=$(redis_ns)
  known=$(metric sluice_directory_accounts)
  wait "$wpid" || true
  # Redis's floor over 3 s with the proxy idle, then a full resync asked
  # for through P changes (the periodic one is a check while notifications
  # are live: everything is reread only every 10 intervals), net of the
  # floor over the time it took
  sleep 0.5
  r_a=$(redis_ns)
  sleep 3
  floor=$(($(redis_ns) - r_a))
  n1=$(metric sluice_directory_resyncs_total)
  r_a=$(redis_ns); t_a=$(date +%s%N)
  redis-cli -p "${rports[0]}" PUBLISH sluice:changes resync >/dev/null
  until (($(metric sluice_directory_resyncs_total) > n1)); do sleep 0.02; done
  # (the count says the suspended set's master answered; on a cluster the
  # other masters' rereads may still run: a second more, net of the floor)
  sleep 1
  r_b=$(redis_ns); t_b=$(date +%s%N)
  net=$(awk -v w=$((r_b - r_a)) -v f="$floor" -v t=$((t_b - t_a)) 'BEGIN {n = w - f * t / 3e9; print (n < 0 ? 0 : int(n + 0.5))}')
  echo "directory: $known of $accounts accounts looked up in $(((t1 - t0) / 1000000)) ms under load" \
    "(redis-server CPU $(((d1 - d0) / 1000000)) ms, $(us_per $((d1 - d0)) "$known") us per account);" \
    "a full resync of them: redis-server CPU $((net / 1000000)) ms net of the floor" \
    "($(us_per "$net" "$known") us per account; floor $((floor / 3000000)) ms/s)"
  kill -TERM "$dpid"
  wait "$dpid" || die "sluice (directory) exited non-zero: $(tail -3 "$tmp/sluice-dir.log")"
fi
taskset -c "$proxy_cpu" "$bin/sluice" --listen "127.0.0.1:$sp" --admin "127.0.0.1:$ap" --workers 1 \
  --upstream "127.0.0.1:$mp" --upstream-llm "127.0.0.1:$mp" --redis "$redis_url" --redis-prefix sluice: \
  --spool-dir "$tmp/spool" "$@" >"$tmp/sluice.log" 2>&1 &
spid=$!; pids+=("$spid")
wait_port "$sp" "$spid" sluice
run_wrk 2 >/dev/null # every account looked up once
# The steady state: the directory's first interval rereads every account
# (the rereads at start ran before its subscriptions were confirmed), about
# 10,000 x 5-25 us of Redis CPU once per process; the run starts once an
# interval has been a check (the directory's own costs are the figures
# above). A build that rereads at every interval never checks: at most
# 70 s, then its rereads are its steady state.
for _ in $(seq 700); do
  (($(metric sluice_directory_resync_checks_total) >= 1)) && break
  sleep 0.1
done
# Redis's own idle cost (cron, and a cluster's bus: each node pings the
# others), for reading the loaded figure: 5 s with sluice idle, in ns
# (schedstat: the ticks, 10 ms each per server, made this floor jump
# between 4 and 16 ms/s from run to run on a cluster).
sleep 1
i0=$(redis_ns); it0=$(date +%s%N)
sleep 5
idle_ns_per_s=$(awk -v n=$(($(redis_ns) - i0)) -v t=$(($(date +%s%N) - it0)) 'BEGIN {printf "%.0f", n * 1e9 / t}')
for p in "${rports[@]}"; do redis-cli -p "$p" config resetstat >/dev/null; done
r0=$(redis_ticks); rn0=$(redis_ns); rt0=$(date +%s%N)
declare -A each0=()
for p in "${rpids[@]}"; do each0[$p]=$(ticks "$p"); done
# sluice's threads' CPU over the run (utime+stime, ticks): the workers'
# against the flusher's (issue 12: the flusher's work must stay small)
thread_ticks() {
  local t
  for t in /proc/"$spid"/task/*; do
    awk '{sub(/^[^)]*\) /, ""); print $12 + $13}' "$t/stat" | tr '\n' ' '
    tr -d '\n' <"$t/comm"
    echo
  done | awk '{s[$2] += $1} END {for (k in s) print k, s[k]}' | LC_ALL=C sort
}
th0=$(thread_ticks)
run_wrk "$secs" --latency >"$tmp/wrk.txt"
th1=$(thread_ticks)
kill -TERM "$spid"
wait "$spid" || die "sluice exited non-zero: $(tail -3 "$tmp/sluice.log")"
r1=$(redis_ticks); rn1=$(redis_ns); rt1=$(date +%s%N)
reqs=$(awk '/requests in/ {print $1}' "$tmp/wrk.txt")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$tmp/wrk.txt")
echo "## metering_cost $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "redis: $mode ($redis_url); sluice options: ${*:-(defaults)}; run ${secs} s; pass_uniform, $accounts accounts; sluice on CPU $proxy_cpu, redis/modstub/wrk on CPU $load_cpus"
grep -E 'Requests/sec|^ +50%|^ +99%' "$tmp/wrk.txt"
echo "requests $reqs, non-2xx ${non2xx:-0}; redis-server CPU $(((rn1 - rn0) / 1000000)) ms" \
  "= $(awk -v t=$((rn1 - rn0)) -v n="$reqs" 'BEGIN {printf "%.3f", t / 1e3 / n}') us per request"
echo "idle redis-server CPU (sluice idle, 5 s before the run): $(awk -v i="$idle_ns_per_s" 'BEGIN {printf "%.1f", i / 1e6}') ms/s;" \
  "net of it over the $(awk -v t=$((rt1 - rt0)) 'BEGIN {printf "%.1f", t / 1e9}') s measured: $(awk -v t=$((rn1 - rn0)) \
    -v i="$idle_ns_per_s" -v w=$((rt1 - rt0)) -v n="$reqs" 'BEGIN {printf "%.3f", (t - i * w / 1e9) / 1e3 / n}') us per request"
if ((${#rpids[@]} > 1)); then
  echo -n "per server (ms):"
  for p in "${rpids[@]}"; do echo -n " $((($(ticks "$p") - each0[$p]) * 10))"; done
  echo
fi
echo "sluice's threads over the run, CPU ms (utime+stime): $(LC_ALL=C join -a 2 <(echo "$th0") <(echo "$th1") |
  awk -v hz="$(getconf CLK_TCK)" '{d = (NF == 3 ? $3 - $2 : $2); printf "%s %d; ", $1, d * 1000 / hz}')"
for p in "${rports[@]}"; do
  redis-cli -p "$p" info commandstats | sed -n 's/^cmdstat_\([a-z]*\):calls=\([0-9]*\),usec=\([0-9]*\),.*/\1 \2 \3/p'
done | awk '{c[$1] += $2; u[$1] += $3} END {for (k in c) printf "  %-10s %8d calls %8.1f ms\n", k, c[k], u[k] / 1000}' |
  sort -k4 -rn | head -10
echo "(calls and their time inside Redis, INFO commandstats over the run; a script's time includes its commands')"
