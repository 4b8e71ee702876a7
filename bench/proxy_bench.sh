#!/usr/bin/env bash
# proxy_bench.sh: sluice versus nginx in front of the same modstub backend.
#
# Both proxies run at the same time (one worker each, pinned to the proxy
# CPU); wrk and modstub share the load CPU(s). wrk drives them interleaved,
# round by round (sluice, nginx, sluice, nginx, ...), and the script reports
# per contender the median over rounds of req/s, p50/p99 latency and the
# proxy's CPU time per request (utime+stime from /proc/PID/stat, delta over
# the wrk run, divided by the requests wrk completed).
#
# Usage: bench/proxy_bench.sh [options]      (see --help; env vars in brackets)
# See bench/README.md for what each figure means and the latest results.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

# ---------------------------------------------------------------- settings
ROUNDS=${BENCH_ROUNDS:-3}
DURATION=${BENCH_DURATION:-5}            # seconds per wrk run
THREADS=${BENCH_THREADS:-1}
CONNS=${BENCH_CONNS:-64}
WARMUP=${BENCH_WARMUP:-1}                # seconds of unmeasured load per contender
SCENARIOS=${BENCH_SCENARIOS:-forward}    # space-separated; see scenario_* below
CONTENDERS=${BENCH_CONTENDERS:-"sluice nginx"}
BACKEND_WORKERS=${BENCH_BACKEND_WORKERS:-1}
UPSTREAM_KEEPALIVE=${BENCH_UPSTREAM_KEEPALIVE:-64}
WRK_TIMEOUT=${BENCH_WRK_TIMEOUT:-2s}     # wrk's per-request timeout
PERF=${BENCH_PERF:-0}                    # seconds of perf on sluice afterwards (0: off)
OUTPUT=${BENCH_OUTPUT:-}                 # also write the markdown report here
BIN_DIR=${BENCH_BIN_DIR:-$root/build/bin}
SLUICE_BIN=${SLUICE_BIN:-}
MODSTUB_BIN=${MODSTUB_BIN:-}
NGINX_BIN=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
WRK_BIN=${WRK_BIN:-$(command -v wrk || echo wrk)}
KEEP_TMP=${BENCH_KEEP_TMP:-0}
REDIS=${BENCH_REDIS:-1}                  # start a private redis-server for sluice (1) or not (0)
REDIS_BIN=${REDIS_BIN:-$(command -v redis-server || echo redis-server)}
REDIS_CLI=${REDIS_CLI:-$(command -v redis-cli || echo redis-cli)}
BENCH_AK=benchak                         # AccessKeyId the requests carry; seeded into Redis
BENCH_UID=benchuid
ncpu=$(nproc)
if ((ncpu >= 2)); then
  PROXY_CPUS=${BENCH_PROXY_CPUS:-0}
  if ((ncpu == 2)); then LOAD_CPUS=${BENCH_LOAD_CPUS:-1}; else LOAD_CPUS=${BENCH_LOAD_CPUS:-1-$((ncpu - 1))}; fi
else
  PROXY_CPUS=${BENCH_PROXY_CPUS:-0}
  LOAD_CPUS=${BENCH_LOAD_CPUS:-0}
fi
quick=${BENCH_QUICK:-0}

usage() {
  cat <<EOF
usage: $0 [options]
  -r, --rounds N        rounds, each runs every contender once   [BENCH_ROUNDS=$ROUNDS]
  -d, --duration S      seconds per wrk run                      [BENCH_DURATION=$DURATION]
  -c, --connections N   wrk connections                          [BENCH_CONNS=$CONNS]
  -t, --threads N       wrk threads                              [BENCH_THREADS=$THREADS]
  -w, --warmup S        unmeasured warm-up per contender (0: off) [BENCH_WARMUP=$WARMUP]
  -s, --scenarios LIST  space-separated scenarios (forward)      [BENCH_SCENARIOS="$SCENARIOS"]
  --contenders LIST     from "sluice sluice_plain nginx"         [BENCH_CONTENDERS="$CONTENDERS"]
                        (sluice_plain: sluice --admission off)
  --proxy-cpus LIST     taskset CPU list of the proxies          [BENCH_PROXY_CPUS=$PROXY_CPUS]
  --load-cpus LIST      taskset CPU list of wrk and modstub      [BENCH_LOAD_CPUS=$LOAD_CPUS]
  --backend-workers N   modstub event-loop threads               [BENCH_BACKEND_WORKERS=$BACKEND_WORKERS]
  --no-redis            do not start a private redis-server for sluice [BENCH_REDIS=0]
  --perf S              afterwards, S seconds of perf stat+record on sluice under the
                        same load, top user-space symbols printed [BENCH_PERF=0]
  -o, --output FILE     also write the markdown report to FILE   [BENCH_OUTPUT]
  -q, --quick           smoke run: 1 round of 2 s, no warm-up     [BENCH_QUICK=1]
Binaries: BENCH_BIN_DIR (build/bin) or SLUICE_BIN, MODSTUB_BIN; NGINX_BIN, WRK_BIN.
BENCH_KEEP_TMP=1 keeps the temp dir (configs, logs, raw wrk output).
EOF
}

while (($#)); do
  case $1 in
    -r|--rounds) ROUNDS=$2; shift ;;
    -d|--duration) DURATION=$2; shift ;;
    -c|--connections) CONNS=$2; shift ;;
    -t|--threads) THREADS=$2; shift ;;
    -w|--warmup) WARMUP=$2; shift ;;
    -s|--scenarios) SCENARIOS=$2; shift ;;
    --contenders) CONTENDERS=$2; shift ;;
    --proxy-cpus) PROXY_CPUS=$2; shift ;;
    --load-cpus) LOAD_CPUS=$2; shift ;;
    --backend-workers) BACKEND_WORKERS=$2; shift ;;
    --perf) PERF=$2; shift ;;
    -o|--output) OUTPUT=$2; shift ;;
    -q|--quick) quick=1 ;;
    --no-redis) REDIS=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "proxy_bench: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $quick == 1 ]]; then ROUNDS=1; DURATION=2; WARMUP=0; fi
SLUICE_BIN=${SLUICE_BIN:-$BIN_DIR/sluice}
MODSTUB_BIN=${MODSTUB_BIN:-$BIN_DIR/modstub}

die() { echo "proxy_bench: error: $*" >&2; exit 1; }
log() { echo "proxy_bench: $*" >&2; }

for v in ROUNDS DURATION CONNS THREADS WARMUP BACKEND_WORKERS PERF; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
done
((ROUNDS >= 1 && DURATION >= 1 && CONNS >= 1 && THREADS >= 1)) ||
  die "rounds, duration, connections and threads must be >= 1"
((CONNS >= THREADS)) || die "wrk needs connections >= threads"

# ---------------------------------------------------------------- preflight
need_exec() { # name path
  [[ -n $2 && -x $2 && ! -d $2 ]] || die "$1 binary not found or not executable: '${2:-}'$3"
}
need_exec sluice "$SLUICE_BIN" " (build it: cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2, or set SLUICE_BIN)"
need_exec modstub "$MODSTUB_BIN" " (build it as above, or set MODSTUB_BIN)"
for t in taskset curl getconf; do
  command -v "$t" >/dev/null || die "'$t' not found on PATH (bash deps/install.sh)"
done
WRK_BIN=$(command -v "$WRK_BIN" || true)
need_exec wrk "$WRK_BIN" " (apt-get install wrk, or bash deps/install.sh)"
for c in $CONTENDERS; do
  case $c in
    sluice|sluice_plain) if [[ $REDIS == 1 ]]; then
        need_exec redis-server "$(command -v "$REDIS_BIN" || true)" " (apt-get install redis-server, or run with --no-redis)"
        need_exec redis-cli "$(command -v "$REDIS_CLI" || true)" " (apt-get install redis-tools, or run with --no-redis)"
      fi ;;
    nginx) need_exec nginx "$NGINX_BIN" " (apt-get install nginx-light, or set NGINX_BIN)"
      [[ -r $here/nginx.conf.in ]] || die "template $here/nginx.conf.in missing" ;;
    *) die "unknown contender '$c' (known: sluice sluice_plain nginx)" ;;
  esac
done
taskset -c "$PROXY_CPUS" true 2>/dev/null || die "cannot pin to proxy CPUs '$PROXY_CPUS'"
taskset -c "$LOAD_CPUS" true 2>/dev/null || die "cannot pin to load CPUs '$LOAD_CPUS'"
CLK_TCK=$(getconf CLK_TCK)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/proxy_bench.XXXXXX")
declare -a started=()   # every PID this script started, stopped at exit

stop_pid() { # pid: TERM, wait up to 10 s, then KILL
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "PID $pid did not stop on SIGTERM within 10 s; SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  # Newest first: proxies go before the backend they talk to.
  for ((i = ${#started[@]} - 1; i >= 0; i--)); do stop_pid "${started[i]}"; done
  # nginx workers, in case their master went away without them.
  for pid in ${nginx_workers:-}; do stop_pid "$pid"; done
  if [[ $KEEP_TMP == 1 || $rc != 0 ]]; then log "kept $tmp (logs, configs, wrk output)"; else rm -rf "$tmp"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- helpers
# Ports come from below the kernel's ephemeral range, so that no outgoing
# connection (wrk's, the proxies' upstream ones) can hold them.
read -r eph_lo _ </proc/sys/net/ipv4/ip_local_port_range
if ((eph_lo > 12000)); then port_lo=10000; port_n=$((eph_lo - 10000)); else port_lo=61000; port_n=4000; fi
used_ports=" "
pick_port() { # -> $port: a loopback TCP port nobody listens on, not handed out before
  local p i
  for ((i = 0; i < 200; i++)); do
    p=$((port_lo + (RANDOM * 32768 + RANDOM) % port_n))
    [[ $used_ports == *" $p "* ]] && continue
    used_ports+="$p "
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      port=$p
      return 0
    fi
  done
  die "found no free loopback port"
}

# wait_http name pid url log: wait up to 10 s for an HTTP 200 from url.
# Returns 2 when the process exited because its port was taken (the caller
# retries on another port); dies on any other failure.
wait_http() {
  local name=$1 pid=$2 url=$3 logf=$4 i
  for ((i = 0; i < 100; i++)); do
    if ! kill -0 "$pid" 2>/dev/null; then
      if grep -qi 'in use' "$logf" 2>/dev/null; then
        log "$name: port taken ($(grep -i -m1 'in use' "$logf")); retrying on another port"
        return 2
      fi
      tail -n 20 "$logf" >&2 || true
      die "$name exited during start-up (log above, $logf)"
    fi
    if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" 2>/dev/null) == 200 ]]; then
      return 0
    fi
    sleep 0.1
  done
  tail -n 20 "$logf" >&2 || true
  die "$name did not answer 200 on $url within 10 s"
}

declare -A pid_name=() pid_log=()
check_alive() { # pid...: dies naming the first process that is gone, with its exit status
  local pid rc
  for pid in "$@"; do
    kill -0 "$pid" 2>/dev/null && continue
    rc=0; wait "$pid" 2>/dev/null || rc=$?
    ((rc == 127)) && rc="unknown (not our child)"
    [[ $rc =~ ^[0-9]+$ ]] && ((rc > 128 && rc < 160)) && rc="$rc, killed by SIG$(kill -l $((rc - 128)) 2>/dev/null)"
    [[ -n ${pid_log[$pid]:-} ]] && { echo "--- tail of ${pid_log[$pid]}:"; tail -n 5 "${pid_log[$pid]}"; } >&2
    die "${pid_name[$pid]:-process} (PID $pid) exited (status $rc) ${where:-}"
  done
}

proc_ticks() { # pid...: sum of utime+stime (clock ticks) of the given processes
  local sum=0 pid s
  for pid in "$@"; do
    s=$(<"/proc/$pid/stat") || die "${pid_name[$pid]:-process} (PID $pid) vanished while measuring"
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    sum=$((sum + ${12} + ${13})) # fields 14 utime and 15 stime of proc(5)
  done
  echo "$sum"
}

cpu_busy() { # cpu-list: busy ticks (all but idle and iowait) of those CPUs, from /proc/stat
  local list=$1 part lo hi c sum=0
  local -A want=()
  for part in ${list//,/ }; do
    lo=${part%-*}; hi=${part#*-}
    for ((c = lo; c <= hi; c++)); do want[$c]=1; done
  done
  while read -r name u n sy _ _ irq sirq st _; do
    [[ $name == cpu[0-9]* && -n ${want[${name#cpu}]:-} ]] || continue
    sum=$((sum + u + n + sy + irq + sirq + st))
  done </proc/stat
  echo "$sum"
}

own_children_ticks() { # -> $own_child_ticks: CPU of this shell's reaped children (wrk, curl, ...)
  times >"$tmp/times"
  own_child_ticks=$(awk -v hz="$CLK_TCK" 'NR == 2 {
    t = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); sub("s", "", a[2]); t += a[1] * 60 + a[2] }
    printf "%.0f", t * hz }' "$tmp/times")
}

children_of() { # pid: its child PIDs, space-separated
  local f=/proc/$1/task/$1/children
  if [[ -r $f ]]; then cat "$f"; else ps -o pid= --ppid "$1" | tr '\n' ' '; fi
}

median() { # numbers on stdin, one per line -> median
  sort -g | awk '{v[NR]=$1} END {if (NR==0) {print "nan"; exit}
    if (NR%2) print v[(NR+1)/2]; else print (v[NR/2]+v[NR/2+1])/2}'
}

# ---------------------------------------------------------------- backend
start_backend() {
  for _ in 1 2 3; do
    pick_port; backend_port=$port
    taskset -c "$LOAD_CPUS" "$MODSTUB_BIN" --listen "127.0.0.1:$backend_port" \
      --workers "$BACKEND_WORKERS" >"$tmp/modstub.log" 2>&1 &
    backend_pid=$!
    started+=("$backend_pid"); pid_name[$backend_pid]=modstub; pid_log[$backend_pid]=$tmp/modstub.log
    wait_http modstub "$backend_pid" "http://127.0.0.1:$backend_port/?Action=TextModeration" \
      "$tmp/modstub.log" && return 0
  done
  die "modstub: no free port after 3 tries"
}
backend_requests() { # total requests modstub has answered
  curl -s --max-time 2 "http://127.0.0.1:$backend_port/stats" |
    sed -n 's/^{"requests":\([0-9]*\).*/\1/p'
}

# ---------------------------------------------------------------- redis
# sluice admits a request only for an AccessKeyId that maps to a UID in Redis,
# within the UID's QPS limit, and meters every call into Redis. A private
# redis-server (on the load CPUs, no persistence) holds the account benchak ->
# benchuid with a QPS package far above any load here, so that the forward
# scenario measures admission + forwarding + metering, never a 429.
redis_cmd() { "$REDIS_CLI" -h 127.0.0.1 -p "$redis_port" "$@"; }
start_redis() {
  local i
  mkdir -p "$tmp/redis"
  for _ in 1 2 3; do
    pick_port; redis_port=$port
    taskset -c "$LOAD_CPUS" "$REDIS_BIN" --port "$redis_port" --bind 127.0.0.1 --save '' \
      --appendonly no --dir "$tmp/redis" --daemonize no --protected-mode yes \
      >"$tmp/redis/redis.log" 2>&1 &
    redis_pid=$!
    started+=("$redis_pid"); pid_name[$redis_pid]=redis-server; pid_log[$redis_pid]=$tmp/redis/redis.log
    for ((i = 0; i < 100; i++)); do
      [[ $(redis_cmd ping 2>/dev/null) == PONG ]] && break
      kill -0 "$redis_pid" 2>/dev/null || break
      sleep 0.1
    done
    [[ $(redis_cmd ping 2>/dev/null) == PONG ]] && break
    if ! kill -0 "$redis_pid" 2>/dev/null && grep -qi 'in use' "$tmp/redis/redis.log"; then
      unset "pid_name[$redis_pid]"; continue
    fi
    tail -n 5 "$tmp/redis/redis.log" >&2; die "redis-server did not answer PING within 10 s"
  done
  [[ $(redis_cmd ping 2>/dev/null) == PONG ]] || die "redis-server: no free port after 3 tries"
  local exp=$(($(date +%s) + 365 * 86400))
  { redis_cmd set "sluice:ak:$BENCH_AK" "$BENCH_UID" &&
    redis_cmd hset "sluice:qpspkg:$BENCH_UID:bench" feature text region cn-shanghai \
      qps 1000000000 starts_at 0 expires_at "$exp" &&
    redis_cmd sadd "sluice:qpspkgs:$BENCH_UID" bench; } >/dev/null ||
    die "could not seed redis-server on port $redis_port"
}

# ---------------------------------------------------------------- contenders
# Each contender has start_<name> (sets <name>_url, <name>_pid, prints
# nothing), pids_<name> (the processes whose CPU is charged to it) and
# describe_<name> (one line for the report).

# shellcheck disable=SC2034 # the *_url are read through ${!name}
sluice_pid="" sluice_url="" sluice_plain_pid="" sluice_plain_url="" redis_port="" redis_pid=""

# launch_sluice name [extra args...]: one sluice instance; sets <name>_pid and <name>_url.
launch_sluice() {
  local name=$1 listen admin help pid
  shift
  local -a extra=("$@")
  help=$("$SLUICE_BIN" --help 2>&1 || true)
  if [[ $REDIS == 1 ]]; then
    [[ -n ${redis_port:-} ]] || start_redis
    extra+=(--redis "127.0.0.1:$redis_port" --redis-prefix sluice:)
  fi
  # Builds with metering keep a spool and instance id on disk: keep them in the temp dir.
  [[ $help == *--spool-dir* ]] && mkdir -p "$tmp/spool-$name" && extra+=(--spool-dir "$tmp/spool-$name")
  for _ in 1 2 3; do
    pick_port; listen=$port
    pick_port; admin=$port
    taskset -c "$PROXY_CPUS" "$SLUICE_BIN" --listen "127.0.0.1:$listen" --admin "127.0.0.1:$admin" \
      --workers 1 --upstream "127.0.0.1:$backend_port" \
      --upstream-keepalive "$UPSTREAM_KEEPALIVE" "${extra[@]}" >"$tmp/$name.log" 2>&1 &
    pid=$!
    started+=("$pid"); pid_name[$pid]=$name; pid_log[$pid]=$tmp/$name.log
    printf -v "${name}_pid" %s "$pid"
    printf -v "${name}_url" %s "http://127.0.0.1:$listen"
    # Ready = the admin listener's /healthz answers (forwarding is probed per scenario).
    wait_http "$name" "$pid" "http://127.0.0.1:$admin/healthz" "$tmp/$name.log" && return 0
  done
  die "$name: no free port after 3 tries"
}
start_sluice() { launch_sluice sluice; }
pids_sluice() { echo "$sluice_pid"; }
# sluice_plain: the same binary with --admission off (no AccessKeyId lookup,
# no limiter): what admission costs. Needs a build that has --admission.
start_sluice_plain() {
  [[ $("$SLUICE_BIN" --help 2>&1 || true) == *--admission* ]] ||
    die "contender sluice_plain needs a sluice with --admission ($SLUICE_BIN has none)"
  launch_sluice sluice_plain --admission off
}
pids_sluice_plain() { echo "$sluice_plain_pid"; }
describe_sluice_plain() { echo "sluice_plain: the same sluice with --admission off (otherwise as sluice)"; }
describe_sluice() {
  local r="no Redis"
  [[ $REDIS == 1 ]] && r="private redis-server on the load CPUs (account $BENCH_AK -> $BENCH_UID with a 1e9 QPS package: every request admitted and metered; Redis CPU not charged to sluice)"
  echo "sluice ($("$SLUICE_BIN" --version 2>&1 | sed -n 1p)): --workers 1, --upstream-keepalive $UPSTREAM_KEEPALIVE, access log off, $r; CPU = the sluice process (all its threads)"
}

start_nginx() {
  local prefix=$tmp/nginx user_line=""
  mkdir -p "$prefix"
  # Workers of a root master would switch to nobody; keep them as the
  # current user instead. A non-root master ignores 'user'.
  [[ $(id -u) == 0 ]] && user_line="user root;"
  for _ in 1 2 3; do
    pick_port
    sed -e "s|@PREFIX@|$prefix|g" -e "s|@LISTEN@|127.0.0.1:$port|g" \
      -e "s|@BACKEND@|127.0.0.1:$backend_port|g" \
      -e "s|@UPSTREAM_KEEPALIVE@|$UPSTREAM_KEEPALIVE|g" \
      -e "s|@USER_LINE@|$user_line|g" -e "s|@HTTP_EXTRA@|${NGINX_HTTP_EXTRA:-}|g" \
      -e "s|@LOCATION_EXTRA@|${NGINX_LOCATION_EXTRA:-}|g" \
      "$here/nginx.conf.in" | sed '/^#/d' >"$prefix/nginx.conf"
    ! grep -n '@[A-Z_]*@' "$prefix/nginx.conf" >&2 || die "unreplaced placeholder in nginx.conf"
    "$NGINX_BIN" -t -q -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" \
      >"$tmp/nginx-t.log" 2>&1 || { cat "$tmp/nginx-t.log" >&2; die "nginx -t rejected $prefix/nginx.conf"; }
    : >"$prefix/error.log"
    taskset -c "$PROXY_CPUS" "$NGINX_BIN" -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" \
      >"$tmp/nginx.log" 2>&1 &
    nginx_pid=$!
    started+=("$nginx_pid"); pid_name[$nginx_pid]="nginx master"; pid_log[$nginx_pid]=$prefix/error.log
    nginx_url="http://127.0.0.1:$port"
    if wait_http nginx "$nginx_pid" "$nginx_url/?Action=TextModeration" "$prefix/error.log"; then
      nginx_workers=$(children_of "$nginx_pid")
      [[ -n ${nginx_workers// /} ]] || die "nginx master $nginx_pid has no worker"
      for w in $nginx_workers; do pid_name[$w]="nginx worker"; pid_log[$w]=$prefix/error.log; done
      return 0
    fi
  done
  die "nginx: no free port after 3 tries"
}
pids_nginx() {
  local now
  now=$(children_of "$nginx_pid")
  [[ $now == "$nginx_workers" ]] ||
    die "nginx worker set changed ('$nginx_workers' -> '$now'): a worker died? see $tmp/nginx/error.log"
  echo "$nginx_pid $nginx_workers"
}
describe_nginx() {
  echo "$("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //'): master + 1 worker (worker_processes 1, daemon off), upstream keepalive $UPSTREAM_KEEPALIVE, access_log off, no limit_req; CPU = master + worker"
}

# ---------------------------------------------------------------- scenarios
# Optional: lua_<name> prints wrk Lua that goes before the
# reporting done() (request(), init(), ...). Add a reject-path scenario as
# scenario_reject/lua_reject and run it with -s "forward reject".
# scenario_<name> prints three lines: the request path (with query), a
# description, and the HTTP status every answer should have (checked once per
# contender before the runs).
scenario_forward() {
  echo "/?Action=TextModeration&AccessKeyId=$BENCH_AK"
  echo "GET /?Action=TextModeration&AccessKeyId=$BENCH_AK, admitted and forwarded to modstub (200, ~130 B JSON)"
  echo 200
}

report_lua() {
  cat <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%d duration_us=%d p50_us=%.0f p90_us=%.0f p99_us=%.0f max_us=%.0f non2xx=%d err_connect=%d err_read=%d err_write=%d err_timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
EOF
}

for s in $SCENARIOS; do
  declare -F "scenario_$s" >/dev/null || die "unknown scenario '$s' (known: $(declare -F | sed -n 's/^declare -f scenario_//p' | tr '\n' ' '))"
  { if declare -F "lua_$s" >/dev/null; then "lua_$s"; fi; report_lua; } >"$tmp/$s.lua"
done

# ---------------------------------------------------------------- one run
wrk_run() { # contender scenario seconds outfile
  local c=$1 s=$2 secs=$3 out=$4 url path
  url=${c}_url; path=$(scenario_"$s" | sed -n 1p)
  timeout -k 5 $((secs + 30)) taskset -c "$LOAD_CPUS" "$WRK_BIN" -t"$THREADS" -c"$CONNS" -d"${secs}s" \
    --timeout "$WRK_TIMEOUT" -s "$tmp/$s.lua" "${!url}$path" >"$out" 2>&1 ||
    { cat "$out" >&2; die "wrk failed against $c ($s)"; }
}

measure() { # contender scenario round: one measured wrk run, appends to results
  local c=$1 s=$2 r=$3 out pids t0 t1 c0 c1 b0 b1 line
  out=$tmp/wrk-$s-$c-$r.txt
  where="before round $r of $s against $c"
  check_alive "${!pid_name[@]}"
  # shellcheck disable=SC2046
  pids=$(pids_"$c")
  b0=$(backend_requests)
  # shellcheck disable=SC2086
  t0=$(proc_ticks $pids)
  c0=$(cpu_busy "$PROXY_CPUS")
  local all0 all1 own0 own1 ch0 ch1
  all0=$(cpu_busy "0-$((ncpu - 1))")
  # shellcheck disable=SC2046,SC2086
  own0=$(proc_ticks "$backend_pid" ${redis_pid:-} $(for x in $CONTENDERS; do pids_"$x"; done))
  own_children_ticks; ch0=$own_child_ticks
  wrk_run "$c" "$s" "$DURATION" "$out"
  where="during round $r of $s against $c"
  check_alive "${!pid_name[@]}"
  # shellcheck disable=SC2086
  t1=$(proc_ticks $pids)
  c1=$(cpu_busy "$PROXY_CPUS")
  all1=$(cpu_busy "0-$((ncpu - 1))")
  # shellcheck disable=SC2046,SC2086
  own1=$(proc_ticks "$backend_pid" ${redis_pid:-} $(for x in $CONTENDERS; do pids_"$x"; done))
  own_children_ticks; ch1=$own_child_ticks
  local other=$(((all1 - all0) - (own1 - own0) - (ch1 - ch0)))
  b1=$(backend_requests)
  line=$(grep '^BENCH_RESULT' "$out") || { cat "$out" >&2; die "no result line from wrk against $c"; }
  local -A m=()
  local kv
  for kv in ${line#BENCH_RESULT }; do m[${kv%%=*}]=${kv#*=}; done
  local requests=${m[requests]} non2xx=${m[non2xx]} rps cpu_us p50 p99 serr
  serr=$((m[err_connect] + m[err_read] + m[err_write] + m[err_timeout]))
  rps=$(awk -v n="$requests" -v d="${m[duration_us]}" 'BEGIN {printf "%.0f", n / (d / 1e6)}')
  cpu_us=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$requests" \
    'BEGIN {if (n > 0) printf "%.2f", t / hz * 1e6 / n; else print "nan"}')
  p50=$(awk -v v="${m[p50_us]}" 'BEGIN {printf "%.3f", v / 1000}')
  p99=$(awk -v v="${m[p99_us]}" 'BEGIN {printf "%.3f", v / 1000}')
  echo "$s $c $r $rps $p50 $p99 $cpu_us $requests $non2xx $serr $((t1 - t0)) $((c1 - c0)) $((b1 - b0)) $other" >>"$tmp/results"
  log "$(printf 'round %d/%d %-8s %-7s %7s req/s  p50 %s ms  p99 %s ms  %s us CPU/req  non-2xx %s  socket errors %s (c%s r%s w%s t%s)  backend saw %s  other CPU ticks %s' \
    "$r" "$ROUNDS" "$s" "$c" "$rps" "$p50" "$p99" "$cpu_us" "$non2xx" "$serr" \
    "${m[err_connect]}" "${m[err_read]}" "${m[err_write]}" "${m[err_timeout]}" "$((b1 - b0))" "$other")"
  if ((non2xx > 0 || serr > 0)); then
    log "anomaly against $c ($s, round $r); wrk said:"
    grep -E 'Non-2xx|Socket errors|requests in' "$out" >&2 || true
  fi
}

# ---------------------------------------------------------------- perf
perf_sluice() { # secs
  local secs=$1 pd=$tmp/perf.data
  command -v perf >/dev/null || { log "perf not on PATH; skipping perf"; return 0; }
  local path
  path=$(scenario_"${SCENARIOS%% *}" | sed -n 1p)
  echo
  echo "### perf on sluice (PID $sluice_pid), $secs s under the same load (${SCENARIOS%% *})"
  echo
  echo '```'
  taskset -c "$LOAD_CPUS" timeout $((secs + 30)) "$WRK_BIN" -t"$THREADS" -c"$CONNS" -d"$((2 * secs + 3))s" \
    "${sluice_url}$path" >"$tmp/wrk-perf.txt" 2>&1 &
  local wpid=$!
  started+=("$wpid")
  sleep 1
  timeout $((secs + 20)) perf stat -e task-clock,context-switches,cpu-migrations,instructions,cycles \
    -p "$sluice_pid" -- sleep "$secs" 2>&1 | sed -n '/Performance counter/,$p' | sed '/^$/d' || true
  if timeout $((secs + 30)) perf record -q -e cpu-clock -F 999 -g -o "$pd" -p "$sluice_pid" -- sleep "$secs" \
    >"$tmp/perf-record.log" 2>&1; then
    perf report -i "$pd" --stdio --no-children --sort dso,sym -g none 2>/dev/null |
      grep -E '^ +[0-9.]+%' >"$tmp/perf-syms.txt" || true
    awk '{ if ($0 ~ /\[k\]/) k += $1; else u += $1 }
      END { printf "-- self time: user space %.1f%%, kernel %.1f%% (cpu-clock samples, all sluice threads)\n", u, k }' \
      "$tmp/perf-syms.txt"
    echo "-- top user-space symbols:"
    grep -v '\[k\]' "$tmp/perf-syms.txt" | awk 'NR <= 20' || true
    echo "-- top kernel symbols:"
    grep '\[k\]' "$tmp/perf-syms.txt" | awk 'NR <= 10' || true
  else
    echo "perf record failed: $(tail -n 3 "$tmp/perf-record.log")"
  fi
  echo '```'
  wait "$wpid" 2>/dev/null || true
}

# ---------------------------------------------------------------- main
start_backend
for c in $CONTENDERS; do start_"$c"; done

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
cpu_model=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | sed -n 1p)
{
  echo "## proxy_bench $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- machine: $(nproc) CPUs, ${cpu_model:-unknown CPU}, $(uname -sr)"
  echo "- pinning (taskset): proxies (sluice, nginx) on CPU $PROXY_CPUS; wrk and modstub on CPU $LOAD_CPUS"
  echo "- load: wrk -t$THREADS -c$CONNS -d${DURATION}s --timeout $WRK_TIMEOUT ($($WRK_BIN -v 2>&1 | sed -n 1p | cut -d' ' -f1-2)), $ROUNDS round(s) interleaved (${CONTENDERS// /, }), warm-up ${WARMUP}s per contender; median over rounds"
  echo "- backend: modstub --workers $BACKEND_WORKERS on 127.0.0.1:$backend_port"
  echo "- binaries: $SLUICE_BIN, $MODSTUB_BIN (built $(date -u -r "$SLUICE_BIN" '+%Y-%m-%d %H:%M UTC')), $NGINX_BIN, $WRK_BIN"
  for c in $CONTENDERS; do echo "- $(describe_"$c")"; done
  for s in $SCENARIOS; do echo "- scenario $s: $(scenario_"$s" | sed -n 2p)"; done
  echo "- CPU us/req = delta(utime+stime) of the proxy's processes from /proc/PID/stat over the wrk run (CLK_TCK=$CLK_TCK) / requests wrk completed"
} >"$tmp/header"
cat "$tmp/header" >&2

for s in $SCENARIOS; do
  want=$(scenario_"$s" | sed -n 3p)
  path=$(scenario_"$s" | sed -n 1p)
  for c in $CONTENDERS; do
    url=${c}_url
    got=$(curl -s -o "$tmp/probe-$s-$c.txt" -w '%{http_code}' --max-time 5 "${!url}$path" || true)
    [[ $got == "$want" ]] || {
      head -c 300 "$tmp/probe-$s-$c.txt" >&2; echo >&2
      die "$c answered HTTP $got to GET $path; scenario $s expects $want (answer above)"
    }
  done
done

if ((WARMUP > 0)); then
  for s in $SCENARIOS; do
    for c in $CONTENDERS; do
      log "warm-up $c ($s, ${WARMUP}s)"
      wrk_run "$c" "$s" "$WARMUP" "$tmp/wrk-warmup-$s-$c.txt"
    done
  done
fi

: >"$tmp/results"
for ((r = 1; r <= ROUNDS; r++)); do
  for s in $SCENARIOS; do
    for c in $CONTENDERS; do measure "$c" "$s" "$r"; done
  done
done

# ---------------------------------------------------------------- report
report() {
  cat "$tmp/header"
  echo
  echo "| scenario | proxy | req/s | p50 ms | p99 ms | CPU us/req | non-2xx | socket errors | rounds |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|"
  local s c col
  for s in $SCENARIOS; do
    for c in $CONTENDERS; do
      local -a med=()
      for col in 4 5 6 7; do
        med+=("$(awk -v s="$s" -v c="$c" -v k=$col '$1==s && $2==c {print $k}' "$tmp/results" | median)")
      done
      local n2 se n
      n2=$(awk -v s="$s" -v c="$c" '$1==s && $2==c {t+=$9} END {print t+0}' "$tmp/results")
      se=$(awk -v s="$s" -v c="$c" '$1==s && $2==c {t+=$10} END {print t+0}' "$tmp/results")
      n=$(awk -v s="$s" -v c="$c" '$1==s && $2==c {n++} END {print n+0}' "$tmp/results")
      printf '| %s | %s | %.0f | %.3f | %.3f | %.2f | %s | %s | %s |\n' "$s" "$c" "${med[@]}" "$n2" "$se" "$n"
      eval "med_${s}_${c}=${med[3]}"
    done
  done
  echo
  echo "non-2xx and socket errors are totals over all measured rounds."
  awk -v cap=$((ncpu * DURATION * CLK_TCK)) '$14 > 0.05 * cap {
      printf "\n**WARNING: interference**: round %s (%s, %s): processes this script did not start used %.0f%% of the machine CPU during the run; req/s and latency of that run are disturbed (CPU us/req less so).\n",
        $3, $2, $1, 100 * $14 / cap }' "$tmp/results"
  if [[ " $CONTENDERS " == *" sluice "* && " $CONTENDERS " == *" nginx "* ]]; then
    for s in $SCENARIOS; do
      local a b
      a=med_${s}_sluice; b=med_${s}_nginx
      awk -v s="$s" -v a="${!a}" -v b="${!b}" 'BEGIN {
        printf "\n**CPU us/request, sluice / nginx (%s): %.2f** (%s vs %s us; target <= 1.00: %s)\n",
          s, a / b, a, b, (a <= b ? "met" : "NOT met") }'
    done
  fi
  echo
  echo "<details><summary>every round</summary>"
  echo
  echo "| scenario | proxy | round | req/s | p50 ms | p99 ms | CPU us/req | requests | non-2xx | socket errors | proxy CPU ticks | busy ticks of CPU $PROXY_CPUS | backend requests | other CPU ticks |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  awk '{printf "| %s |\n", $1 " | " $2 " | " $3 " | " $4 " | " $5 " | " $6 " | " $7 " | " $8 " | " $9 " | " $10 " | " $11 " | " $12 " | " $13 " | " $14}' "$tmp/results"
  echo
  echo "Busy ticks of the proxy CPU minus the proxy's own ticks = softirq (loopback TCP) plus anything else that ran there."
  echo "Other CPU ticks = busy ticks of all CPUs minus those of the proxies, modstub, redis, wrk and this script's helpers:"
  echo "CPU used by processes this script did not start (a clean run has next to none; each CPU gives $CLK_TCK ticks a second);"
  echo "load average at start: $load_start; at end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  echo "</details>"
  if ((PERF > 0)) && [[ " $CONTENDERS " == *" sluice "* ]]; then perf_sluice "$PERF"; fi
}

report >"$tmp/report.md"
cat "$tmp/report.md"
if [[ -n $OUTPUT ]]; then cp "$tmp/report.md" "$OUTPUT"; log "report written to $OUTPUT"; fi
