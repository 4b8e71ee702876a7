#!/usr/bin/env bash
# proxy_bench.sh: sluice against nginx and HAProxy, each in front of the
# same backend, under the same wrk load, on the pass path (every request
# admitted and forwarded) and the reject path (nearly every answer a 429).
#
# Every contender runs with one worker/thread, pinned to the proxy CPU; wrk,
# the backend and redis-server share the load CPU(s). wrk drives the
# contenders interleaved, round by round (A B C A B C ...), with requests
# shaped like the real API (bench/lua/*.lua: V1 and V3 signatures, both
# tiers, 10,000 accounts, uniform or Zipf popularity), and the script reports
# per scenario and contender the median over rounds of req/s, p50/p99 latency
# and the proxy's CPU time per request (utime+stime from /proc/PID/stat,
# delta over the wrk run, divided by the requests wrk completed), with the
# ratio to the best peer; then sluice with 1..N workers (scaling); then
# several sluice instances on one Redis and prefix sharing their limits
# (issue 11's global limits: one instance, three with --global-limits on,
# three with it off, the load split across them), with sluice's and Redis's
# CPU per request; and a gnuplot PNG of req/s and p99.
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
WARMUP=${BENCH_WARMUP:-1}                # seconds of probe/warm-up load per contender and scenario
SCENARIOS=${BENCH_SCENARIOS:-"pass zipf reject"}
CONTENDERS=${BENCH_CONTENDERS:-"sluice sluice_plain sluice_nometer nginx haproxy"}
SCALE=${BENCH_SCALE:-"1 2"}              # sluice worker counts of the scaling run ("" or 0: none)
SCALE_SCENARIO=${BENCH_SCALE_SCENARIO:-pass}
BACKEND=${BENCH_BACKEND:-modstub}        # modstub | nginx (fixed 200 answer)
BACKEND_WORKERS=${BENCH_BACKEND_WORKERS:-1}
UPSTREAM_KEEPALIVE=${BENCH_UPSTREAM_KEEPALIVE:-64}
ACCOUNTS=${BENCH_ACCOUNTS:-10000}        # accounts of the pass scenarios (AK00000..)
REJECT_ACCOUNTS=${BENCH_REJECT_ACCOUNTS:-10}
REJECT_QPS=${BENCH_REJECT_QPS:-10}       # per-account (sluice: per feature) limit on the reject path
PASS_QPS=100000000                       # limit on the pass path: never reached
LIMITED_QPS=${BENCH_LIMITED_QPS:-100}    # per-feature limit of the zipf_limited scenario (the hot accounts exceed it)
MULTI=${BENCH_MULTI:-1}                  # the multi-instance part (global limits): 1 on, 0 off
MULTI_N=${BENCH_MULTI_INSTANCES:-3}      # instances of the fleet
MULTI_SCENARIOS=${BENCH_MULTI_SCENARIOS:-"pass zipf zipf_limited"}
MULTI_METERING=${BENCH_MULTI_METERING:-on} # off: the multi-instance part's sluices unmetered (Redis: lookups and shares only)
WRK_TIMEOUT=${BENCH_WRK_TIMEOUT:-2s}     # wrk's per-request timeout
SETTLE_MAX=${BENCH_SETTLE_MAX:-40}       # after a sluice run: wait at most this for its counts to reach Redis
WARM_MAX=${BENCH_WARM_MAX:-20}           # after a sluice's probe: warm up at most this long until it holds every account
PERF=${BENCH_PERF:-0}                    # seconds of perf on sluice afterwards (0: off)
OUTPUT=${BENCH_OUTPUT:-}                 # also write the markdown report here (plot and data next to it)
PLOT=${BENCH_PLOT:-1}
BIN_DIR=${BENCH_BIN_DIR:-$root/build/bin}
SLUICE_BIN=${SLUICE_BIN:-}
BASE_BIN=${BENCH_BASE_BIN:-}             # contender sluice_base: another sluice binary (e.g. an older commit)
MODSTUB_BIN=${MODSTUB_BIN:-}
NGINX_BIN=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
HAPROXY_BIN=${HAPROXY_BIN:-$(command -v haproxy || echo /usr/sbin/haproxy)}
WRK_BIN=${WRK_BIN:-$(command -v wrk || echo wrk)}
KEEP_TMP=${BENCH_KEEP_TMP:-0}
REDIS_BIN=${REDIS_BIN:-$(command -v redis-server || echo redis-server)}
REDIS_CLI=${REDIS_CLI:-$(command -v redis-cli || echo redis-cli)}
FEATURES="text text_llm image image_llm voice video document url multimodal guard manual upload"
ncpu=$(nproc)
PROXY_CPUS=${BENCH_PROXY_CPUS:-0}
if ((ncpu == 1)); then LOAD_CPUS=${BENCH_LOAD_CPUS:-0}
elif ((ncpu == 2)); then LOAD_CPUS=${BENCH_LOAD_CPUS:-1}
else LOAD_CPUS=${BENCH_LOAD_CPUS:-1-$((ncpu - 1))}; fi
quick=${BENCH_QUICK:-0}

usage() {
  cat <<EOF2
usage: $0 [options]
  -r, --rounds N        rounds, each runs every contender once   [BENCH_ROUNDS=$ROUNDS]
  -d, --duration S      seconds per wrk run                      [BENCH_DURATION=$DURATION]
  -c, --connections N   wrk connections                          [BENCH_CONNS=$CONNS]
  -t, --threads N       wrk threads                              [BENCH_THREADS=$THREADS]
  -w, --warmup S        probe + warm-up run per contender and scenario [BENCH_WARMUP=$WARMUP]
  -s, --scenarios LIST  from "pass zipf reject forward"          [BENCH_SCENARIOS="$SCENARIOS"]
  --contenders LIST     from "sluice sluice_plain sluice_nometer sluice_base nginx haproxy" [BENCH_CONTENDERS="$CONTENDERS"]
                        (sluice_plain: sluice --admission off; pass scenarios only;
                         sluice_base: BENCH_BASE_BIN run as sluice, to compare two builds in one run;
                         its options BENCH_BASE_ARGS, else BENCH_SLUICE_ARGS)
  --scale LIST          sluice --workers counts for the scaling run, "" for none [BENCH_SCALE="$SCALE"]
  --scale-scenario S    scenario of the scaling run              [BENCH_SCALE_SCENARIO=$SCALE_SCENARIO]
  --multi 0|1           the multi-instance part (issue 11, global limits): one sluice, N sluices
                        with --global-limits on, N with it off, on one Redis; the load split over
                        the N (N wrk processes, CONNS/N connections each) [BENCH_MULTI=$MULTI]
  --multi-instances N   instances of the fleet                   [BENCH_MULTI_INSTANCES=$MULTI_N]
  --multi-scenarios L   scenarios of the multi-instance part     [BENCH_MULTI_SCENARIOS="$MULTI_SCENARIOS"]
                        (zipf_limited, multi-instance part only: zipf with every feature's limit
                         at --limited-qps, so that the hot accounts are throttled and coordinated)
  --limited-qps N       per-feature limit of zipf_limited         [BENCH_LIMITED_QPS=$LIMITED_QPS]
  --multi-metering M    on | off: --metering of the multi-instance part's sluices; off leaves
                        Redis only the lookups and the shares (a measuring aid) [BENCH_MULTI_METERING=$MULTI_METERING]
  --backend B           modstub | nginx (fixed 200 JSON)          [BENCH_BACKEND=$BACKEND]
  --accounts N          accounts of the pass scenarios           [BENCH_ACCOUNTS=$ACCOUNTS]
  --reject-accounts N   accounts of the reject scenario          [BENCH_REJECT_ACCOUNTS=$REJECT_ACCOUNTS]
  --reject-qps N        limit on the reject path                 [BENCH_REJECT_QPS=$REJECT_QPS]
  --proxy-cpus LIST     taskset CPU list of the proxies          [BENCH_PROXY_CPUS=$PROXY_CPUS]
  --load-cpus LIST      taskset CPU list of wrk, backend, redis  [BENCH_LOAD_CPUS=$LOAD_CPUS]
  --backend-workers N   modstub event-loop threads               [BENCH_BACKEND_WORKERS=$BACKEND_WORKERS]
  --perf S              afterwards, S seconds of perf stat+record on sluice under the
                        first scenario's load, top symbols printed [BENCH_PERF=$PERF]
  -o, --output FILE     also write the markdown report to FILE, the per-round data to
                        FILE without .md plus .tsv, the plot to ... .png [BENCH_OUTPUT]
  --no-plot             no gnuplot PNG                            [BENCH_PLOT=0]
  -q, --quick           smoke run: 1 round of 2 s, 1 s probes, scaling 1 round [BENCH_QUICK=1]
Binaries: BENCH_BIN_DIR (build/bin) or SLUICE_BIN, MODSTUB_BIN; NGINX_BIN, HAPROXY_BIN,
WRK_BIN, REDIS_BIN, REDIS_CLI. BENCH_KEEP_TMP=1 keeps the temp dir (configs, logs, wrk output).
BENCH_WARM_MAX ($WARM_MAX): after a sluice's probe, warm up at most this many seconds until
its directory holds every account of the scenario.
EOF2
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
    --scale) SCALE=$2; shift ;;
    --scale-scenario) SCALE_SCENARIO=$2; shift ;;
    --multi) MULTI=$2; shift ;;
    --multi-instances) MULTI_N=$2; shift ;;
    --multi-scenarios) MULTI_SCENARIOS=$2; shift ;;
    --limited-qps) LIMITED_QPS=$2; shift ;;
    --multi-metering) MULTI_METERING=$2; shift ;;
    --backend) BACKEND=$2; shift ;;
    --accounts) ACCOUNTS=$2; shift ;;
    --reject-accounts) REJECT_ACCOUNTS=$2; shift ;;
    --reject-qps) REJECT_QPS=$2; shift ;;
    --proxy-cpus) PROXY_CPUS=$2; shift ;;
    --load-cpus) LOAD_CPUS=$2; shift ;;
    --backend-workers) BACKEND_WORKERS=$2; shift ;;
    --perf) PERF=$2; shift ;;
    -o|--output) OUTPUT=$2; shift ;;
    --no-plot) PLOT=0 ;;
    -q|--quick) quick=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "proxy_bench: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $quick == 1 ]]; then ROUNDS=1; DURATION=2; WARMUP=1; fi
[[ $SCALE == 0 ]] && SCALE=""
SLUICE_BIN=${SLUICE_BIN:-$BIN_DIR/sluice}
MODSTUB_BIN=${MODSTUB_BIN:-$BIN_DIR/modstub}

die() { echo "proxy_bench: error: $*" >&2; exit 1; }
log() { echo "proxy_bench: $*" >&2; }

[[ $MULTI == 0 ]] && MULTI_SCENARIOS=""
for v in ROUNDS DURATION CONNS THREADS WARMUP BACKEND_WORKERS PERF ACCOUNTS REJECT_ACCOUNTS REJECT_QPS LIMITED_QPS MULTI MULTI_N; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
done
((ROUNDS >= 1 && DURATION >= 1 && CONNS >= 1 && THREADS >= 1)) ||
  die "rounds, duration, connections and threads must be >= 1"
((CONNS >= THREADS)) || die "wrk needs connections >= threads"
((ACCOUNTS >= 1 && ACCOUNTS <= 100000 && REJECT_ACCOUNTS >= 1 && REJECT_ACCOUNTS <= ACCOUNTS)) ||
  die "accounts must be 1..100000 and reject accounts 1..accounts"
((REJECT_QPS >= 1 && LIMITED_QPS >= 1)) || die "reject qps and limited qps must be >= 1"
if [[ -n $MULTI_SCENARIOS ]]; then
  ((MULTI_N >= 2)) || die "--multi-instances must be >= 2"
  ((CONNS / MULTI_N >= THREADS)) || die "the multi-instance part splits $CONNS connections over $MULTI_N wrk processes: each needs >= $THREADS (threads)"
fi
[[ $MULTI_METERING == on || $MULTI_METERING == off ]] || die "--multi-metering is on or off, got '$MULTI_METERING'"
[[ " $SCENARIOS " == *" zipf_limited "* ]] && die "scenario zipf_limited belongs to the multi-instance part only (--multi-scenarios)"
for w in $SCALE; do [[ $w =~ ^[1-9][0-9]*$ ]] || die "--scale takes worker counts >= 1, got '$w'"; done
[[ $BACKEND == modstub || $BACKEND == nginx ]] || die "--backend is modstub or nginx, got '$BACKEND'"

# ---------------------------------------------------------------- preflight
need_exec() { # name path
  [[ -n $2 && -x $2 && ! -d $2 ]] || die "$1 binary not found or not executable: '${2:-}'$3"
}
need_exec sluice "$SLUICE_BIN" " (build it: cmake -S . -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2, or set SLUICE_BIN)"
[[ $BACKEND == modstub ]] && need_exec modstub "$MODSTUB_BIN" " (build it as above, or set MODSTUB_BIN)"
for t in taskset curl getconf awk; do
  command -v "$t" >/dev/null || die "'$t' not found on PATH (bash deps/install.sh)"
done
WRK_BIN=$(command -v "$WRK_BIN" || true)
need_exec wrk "$WRK_BIN" " (apt-get install wrk, or bash deps/install.sh)"
need_exec redis-server "$(command -v "$REDIS_BIN" || true)" " (apt-get install redis-server)"
need_exec redis-cli "$(command -v "$REDIS_CLI" || true)" " (apt-get install redis-tools)"
if [[ " $CONTENDERS " == *" nginx "* || $BACKEND == nginx ]]; then
  need_exec nginx "$NGINX_BIN" " (apt-get install nginx-light, or set NGINX_BIN)"
fi
for c in $CONTENDERS; do
  case $c in
    sluice|sluice_plain|sluice_nometer) ;;
    sluice_base) need_exec sluice_base "$BASE_BIN" " (set BENCH_BASE_BIN to the baseline sluice binary)" ;;
    nginx) [[ -r $here/nginx.conf.in ]] || die "template $here/nginx.conf.in missing" ;;
    haproxy) need_exec haproxy "$HAPROXY_BIN" " (apt-get install haproxy, or set HAPROXY_BIN)"
      [[ -r $here/haproxy.cfg.in ]] || die "template $here/haproxy.cfg.in missing" ;;
    *) die "unknown contender '$c' (known: sluice sluice_plain sluice_nometer sluice_base nginx haproxy)" ;;
  esac
done
if [[ $PLOT == 1 ]] && ! command -v gnuplot >/dev/null; then
  log "gnuplot not on PATH (apt-get install gnuplot-nox): no plot"; PLOT=0
fi
taskset -c "$PROXY_CPUS" true 2>/dev/null || die "cannot pin to proxy CPUs '$PROXY_CPUS'"
taskset -c "$LOAD_CPUS" true 2>/dev/null || die "cannot pin to load CPUs '$LOAD_CPUS'"
CLK_TCK=$(getconf CLK_TCK)

tmp=$(mktemp -d "${TMPDIR:-/tmp}/proxy_bench.XXXXXX")
declare -a started=()   # every PID this script started, stopped at exit
all_nginx_workers=""

stop_pid() { # pid: TERM, wait up to 10 s, then KILL
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -CONT "$pid" 2>/dev/null || true # paused by the multi-instance part
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
  for pid in $all_nginx_workers; do stop_pid "$pid"; done
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

# sed_escape: a string made safe as the replacement of sed s|...|...|.
sed_escape() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }
user_line() { if [[ $(id -u) == 0 ]]; then echo "user root;"; fi; }

# ---------------------------------------------------------------- instances
# An instance is one running proxy (or backend), named "<contender>.<group>",
# where the group (pass or reject) picks its limits: the pass group never
# throttles, the reject group has a low per-account limit. Arrays by name:
declare -A inst_url=() inst_pid=() inst_cpus=() inst_kind=() inst_workers=() inst_admin=()

# nginx_launch id template cpus extra_http extra_location: one nginx (master +
# one worker) from a template; sets inst_* of id.
nginx_launch() {
  local id=$1 tpl=$2 cpus=$3 xhttp=$4 xloc=$5 prefix=$tmp/${1//./-} rc
  mkdir -p "$prefix"
  for _ in 1 2 3; do
    pick_port
    sed -e "s|@PREFIX@|$prefix|g" -e "s|@LISTEN@|127.0.0.1:$port|g" \
      -e "s|@BACKEND@|127.0.0.1:${backend_port:-0}|g" \
      -e "s|@UPSTREAM_KEEPALIVE@|$UPSTREAM_KEEPALIVE|g" \
      -e "s|@USER_LINE@|$(user_line)|g" -e "s|@HTTP_EXTRA@|$(sed_escape "$xhttp")|g" \
      -e "s|@LOCATION_EXTRA@|$(sed_escape "$xloc")|g" \
      "$tpl" | sed '/^#/d' >"$prefix/nginx.conf"
    ! grep -n '@[A-Z_]*@' "$prefix/nginx.conf" >&2 || die "unreplaced placeholder in $prefix/nginx.conf"
    "$NGINX_BIN" -t -q -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" \
      >"$prefix/nginx-t.log" 2>&1 || { cat "$prefix/nginx-t.log" >&2; die "nginx -t rejected $prefix/nginx.conf"; }
    : >"$prefix/error.log"
    taskset -c "$cpus" "$NGINX_BIN" -p "$prefix" -e "$prefix/error.log" -c "$prefix/nginx.conf" \
      >"$prefix/stdout.log" 2>&1 &
    local pid=$!
    started+=("$pid"); pid_name[$pid]="$id (nginx master)"; pid_log[$pid]=$prefix/error.log
    rc=0; wait_http "$id" "$pid" "http://127.0.0.1:$port/?Action=TextModeration" "$prefix/error.log" || rc=$?
    if ((rc == 0)); then
      local w
      w=$(children_of "$pid")
      [[ -n ${w// /} ]] || die "$id: nginx master $pid has no worker"
      for x in $w; do pid_name[$x]="$id (nginx worker)"; pid_log[$x]=$prefix/error.log; done
      all_nginx_workers+=" $w"
      inst_pid[$id]=$pid; inst_workers[$id]=$w; inst_url[$id]=http://127.0.0.1:$port
      inst_cpus[$id]=$cpus; inst_kind[$id]=nginx
      return 0
    fi
  done
  die "$id: no free port after 3 tries"
}

# ---------------------------------------------------------------- backend
start_backend() {
  if [[ $BACKEND == nginx ]]; then
    nginx_launch backend "$here/nginx-backend.conf.in" "$LOAD_CPUS" "" ""
    backend_port=${inst_url[backend]##*:}
    backend_pids="${inst_pid[backend]} ${inst_workers[backend]}"
    backend_desc="nginx fixed-response backend ($("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //'), 1 worker, return 200 with a 110 B JSON body)"
    return 0
  fi
  local pid rc
  for _ in 1 2 3; do
    pick_port; backend_port=$port
    taskset -c "$LOAD_CPUS" "$MODSTUB_BIN" --listen "127.0.0.1:$backend_port" \
      --workers "$BACKEND_WORKERS" >"$tmp/modstub.log" 2>&1 &
    pid=$!
    started+=("$pid"); pid_name[$pid]=modstub; pid_log[$pid]=$tmp/modstub.log
    rc=0; wait_http modstub "$pid" "http://127.0.0.1:$backend_port/?Action=TextModeration" "$tmp/modstub.log" || rc=$?
    if ((rc == 0)); then
      backend_pids=$pid
      backend_desc="modstub --workers $BACKEND_WORKERS (green-cip-like JSON, ~130 B)"
      return 0
    fi
  done
  die "modstub: no free port after 3 tries"
}
backend_requests() { # total requests the backend has answered (modstub only; else -)
  [[ $BACKEND == modstub ]] || { echo -; return 0; }
  curl -s --max-time 2 "http://127.0.0.1:$backend_port/stats" |
    sed -n 's/^{"requests":\([0-9]*\).*/\1/p'
}

# ---------------------------------------------------------------- redis
# A private redis-server (load CPUs, no persistence) with two key spaces:
# prefix sluice: for the pass group (AK00000.. -> uid00000.., every feature's
# default_qps 1e8: never throttles) and sluicerj: for the reject group (the
# same accounts, every feature's default_qps = the reject limit); and one
# per configuration and group of the multi-instance part (seed_prefixes).
# Redis's own CPU is not charged to sluice.
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
  # SET P ak:AKnnnnn uidnnnnn for every prefix, and the feature limits, as
  # Redis protocol through redis-cli --pipe.
  awk -v n="$ACCOUNTS" -v feats="$FEATURES" -v pl="$(seed_prefixes)" '
    function arg(x) { return sprintf("$%d\r\n%s\r\n", length(x), x) }
    function set(k, v) { printf "*3\r\n%s%s%s", arg("SET"), arg(k), arg(v) }
    function hset(k, f, v) { printf "*4\r\n%s%s%s%s", arg("HSET"), arg(k), arg(f), arg(v) }
    BEGIN {
      np = split(pl, w, " ") / 2   # prefix qps prefix qps ...
      for (i = 0; i < n; i++) {
        ak = sprintf("AK%05d", i); uid = sprintf("uid%05d", i)
        for (j = 1; j <= np; j++) set(w[2 * j - 1] "ak:" ak, uid)
      }
      k = split(feats, f, " ")
      for (i = 1; i <= k; i++)
        for (j = 1; j <= np; j++) hset(w[2 * j - 1] "feature:" f[i], "default_qps", w[2 * j])
    }' | redis_cmd --pipe >"$tmp/redis/seed.log" 2>&1 || { cat "$tmp/redis/seed.log" >&2; die "could not seed redis-server"; }
  grep -q 'errors: 0' "$tmp/redis/seed.log" || { cat "$tmp/redis/seed.log" >&2; die "seeding redis-server had errors"; }
  local last
  last=$(printf %05d $((ACCOUNTS - 1)))
  local p q
  while read -r p q; do
    [[ $(redis_cmd get "${p}ak:AK$last") == "uid$last" ]] ||
      die "redis-server lacks the seeded accounts (prefix $p)"
  done < <(seed_prefixes | xargs -n2)
}

# ---------------------------------------------------------------- contenders
# start_<contender> id group: one instance (sets inst_* of id).
# pids_of id: the processes whose CPU is charged to it.

launch_sluice() { # id group cpus workers [extra args...]; LAUNCH_BIN: another binary, LAUNCH_PREFIX: another Redis prefix
  local id=$1 group=$2 cpus=$3 workers=$4 listen admin pid rc prefix bin=${LAUNCH_BIN:-$SLUICE_BIN}
  shift 4
  local -a extra=("$@")
  [[ -n ${redis_port:-} ]] || start_redis
  prefix=${LAUNCH_PREFIX:-$(group_prefix "$group")}
  local dir=$tmp/${id//./-}
  mkdir -p "$dir/spool"
  for _ in 1 2 3; do
    pick_port; listen=$port
    pick_port; admin=$port
    taskset -c "$cpus" "$bin" --listen "127.0.0.1:$listen" --admin "127.0.0.1:$admin" \
      --workers "$workers" --upstream "127.0.0.1:$backend_port" --upstream-llm "127.0.0.1:$backend_port" \
      --upstream-keepalive "$UPSTREAM_KEEPALIVE" --redis "127.0.0.1:$redis_port" --redis-prefix "$prefix" \
      --spool-dir "$dir/spool" "${extra[@]}" >"$dir/sluice.log" 2>&1 &
    pid=$!
    started+=("$pid"); pid_name[$pid]=$id; pid_log[$pid]=$dir/sluice.log
    # Ready = the admin listener's /healthz answers (forwarding is probed per scenario).
    rc=0; wait_http "$id" "$pid" "http://127.0.0.1:$admin/healthz" "$dir/sluice.log" || rc=$?
    if ((rc == 0)); then
      inst_pid[$id]=$pid; inst_url[$id]=http://127.0.0.1:$listen; inst_cpus[$id]=$cpus; inst_kind[$id]=sluice
      inst_admin[$id]=http://127.0.0.1:$admin
      return 0
    fi
  done
  die "$id: no free port after 3 tries"
}
# BENCH_SLUICE_ARGS: more options for the contenders sluice and sluice_base (e.g. "--flush-ms 10000")
read -r -a SLUICE_EXTRA <<<"${BENCH_SLUICE_ARGS:-}"
# sluice_base's options: BENCH_BASE_ARGS when set (an older build may lack
# the newer options, or its defaults be what is compared), else sluice's.
read -r -a BASE_EXTRA <<<"${BENCH_BASE_ARGS-${BENCH_SLUICE_ARGS:-}}"
start_sluice() { launch_sluice "$1" "$2" "$PROXY_CPUS" 1 ${SLUICE_EXTRA[@]+"${SLUICE_EXTRA[@]}"}; }
start_sluice_plain() {
  [[ $("$SLUICE_BIN" --help 2>&1 || true) == *--admission* ]] ||
    die "contender sluice_plain needs a sluice with --admission ($SLUICE_BIN has none)"
  launch_sluice "$1" "$2" "$PROXY_CPUS" 1 --admission off
}
describe_sluice() {
  echo "sluice ($("$SLUICE_BIN" --version 2>&1 | sed -n 1p)): --workers 1, admission on, metering on (always), --upstream and --upstream-llm both the backend (separate pools), --upstream-keepalive $UPSTREAM_KEEPALIVE, access log off, its own --spool-dir$([[ -n ${SLUICE_EXTRA[*]-} ]] && echo ", BENCH_SLUICE_ARGS: ${SLUICE_EXTRA[*]}"); pass group: Redis prefix sluice: (every feature default_qps $PASS_QPS), reject group: prefix sluicerj: (default_qps $REJECT_QPS per feature); limit per (UID, feature, region); CPU = the sluice process (all its threads)"
}
describe_sluice_plain() { echo "sluice_plain: the same sluice with --admission off (no classification, no lookup, no limiter; still metered, under UID -); pass scenarios only"; }
start_sluice_nometer() {
  [[ $("$SLUICE_BIN" --help 2>&1 || true) == *--metering* ]] ||
    die "contender sluice_nometer needs a sluice with --metering ($SLUICE_BIN has none)"
  launch_sluice "$1" "$2" "$PROXY_CPUS" 1 --metering off
}
start_sluice_base() { LAUNCH_BIN=$BASE_BIN launch_sluice "$1" "$2" "$PROXY_CPUS" 1 ${BASE_EXTRA[@]+"${BASE_EXTRA[@]}"}; }
describe_sluice_base() { echo "sluice_base: $BASE_BIN ($("$BASE_BIN" --version 2>&1 | sed -n 1p)) run as sluice with options '${BASE_EXTRA[*]-}': two builds compared in the same run"; }
describe_sluice_nometer() { echo "sluice_nometer: the same sluice, admission on, with --metering off (a measuring aid: nothing is counted for billing); its difference to sluice is metering's cost"; }

start_nginx() { # id group
  local rate=$PASS_QPS burst=100000
  [[ $2 == reject ]] && { rate=$REJECT_QPS; burst=$REJECT_QPS; }
  # The account: the V1 query's AccessKeyId, else the V3 Authorization's Credential.
  local http="map \$http_authorization \$bench_v3_ak { \"~Credential=(?<ak>[^, ]+)\" \$ak; default \"\"; } map \$arg_AccessKeyId \$bench_acct { \"\" \$bench_v3_ak; default \$arg_AccessKeyId; } limit_req_zone \$bench_acct zone=acct:10m rate=${rate}r/s; limit_req_status 429;"
  local loc="limit_req zone=acct burst=$burst nodelay;"
  nginx_launch "$1" "$here/nginx.conf.in" "$PROXY_CPUS" "$http" "$loc"
}
describe_nginx() {
  echo "nginx ($("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //')): master + 1 worker, upstream keepalive $UPSTREAM_KEEPALIVE, access_log off, limit_req keyed per account (\$arg_AccessKeyId, else a map of \$http_authorization to its Credential); pass group: rate=${PASS_QPS}r/s burst=100000 nodelay, reject group: rate=${REJECT_QPS}r/s burst=$REJECT_QPS nodelay, limit_req_status 429; CPU = master + worker"
}

start_haproxy() { # id group
  local id=$1 limit=$PASS_QPS prefix=$tmp/${1//./-} pid rc
  [[ $2 == reject ]] && limit=$REJECT_QPS
  mkdir -p "$prefix"
  for _ in 1 2 3; do
    pick_port
    sed -e "s|@LISTEN@|127.0.0.1:$port|g" -e "s|@BACKEND@|127.0.0.1:$backend_port|g" \
      -e "s|@LIMIT@|$limit|g" "$here/haproxy.cfg.in" | sed '/^#/d' >"$prefix/haproxy.cfg"
    ! grep -n '@[A-Z_]*@' "$prefix/haproxy.cfg" >&2 || die "unreplaced placeholder in haproxy.cfg"
    "$HAPROXY_BIN" -c -q -f "$prefix/haproxy.cfg" >"$prefix/check.log" 2>&1 ||
      { cat "$prefix/check.log" >&2; die "haproxy -c rejected $prefix/haproxy.cfg"; }
    taskset -c "$PROXY_CPUS" "$HAPROXY_BIN" -db -f "$prefix/haproxy.cfg" >"$prefix/haproxy.log" 2>&1 &
    pid=$!
    started+=("$pid"); pid_name[$pid]=$id; pid_log[$pid]=$prefix/haproxy.log
    rc=0; wait_http "$id" "$pid" "http://127.0.0.1:$port/?Action=TextModeration" "$prefix/haproxy.log" || rc=$?
    if ((rc == 0)); then
      inst_pid[$id]=$pid; inst_url[$id]=http://127.0.0.1:$port; inst_cpus[$id]=$PROXY_CPUS; inst_kind[$id]=haproxy
      return 0
    fi
  done
  die "$id: no free port after 3 tries"
}
describe_haproxy() {
  echo "haproxy ($("$HAPROXY_BIN" -v 2>&1 | sed -n 's/^HAProxy version \([^ ]*\).*/\1/p')): one process, nbthread 1, http-reuse always, stick-table type string len 64 size 100k store http_req_rate(1s) keyed per account (urlp(AccessKeyId), else regsub of the Authorization's Credential), deny 429 if sc_http_req_rate(0) gt $PASS_QPS (pass) / $REJECT_QPS (reject); CPU = the process"
}

pids_of() { # id
  local id=$1 now
  case ${inst_kind[$id]} in
    nginx)
      now=$(children_of "${inst_pid[$id]}")
      [[ $now == "${inst_workers[$id]}" ]] ||
        die "$id: nginx worker set changed ('${inst_workers[$id]}' -> '$now'): a worker died?"
      echo "${inst_pid[$id]} ${inst_workers[$id]}" ;;
    *) echo "${inst_pid[$id]}" ;;
  esac
}
all_own_pids() { # every process this script keeps running (proxies, backend, redis)
  local id
  echo "$backend_pids ${redis_pid:-}"
  for id in "${!inst_pid[@]}"; do [[ $id == backend ]] || pids_of "$id"; done
}

# ---------------------------------------------------------------- scenarios
# scenario_<name> prints six lines: the wrk Lua script under bench/lua (or -
# for none), the request path, the group (pass or reject: which instances
# and limits), the number of accounts, the HTTP statuses allowed (the first
# must be more than half the answers of the probe run), and a description.
scenario_pass() {
  printf '%s\n' pass_uniform.lua / pass "$ACCOUNTS" "200" \
    "bench/lua/pass_uniform.lua: POST with form body, half V1 (?Action=&AccessKeyId=&...) half V3 (ACS3-HMAC-SHA256 Authorization + x-acs-action), mix TextModeration 35% / ImageModeration baselineCheck 20% / ImageModeration *ByVL* 5% and llm_* 5% / TextModerationPlus 20% / MultiModalGuard 15% (45% llm tier), $ACCOUNTS accounts uniform; never throttled: all 200"
}
scenario_zipf() {
  printf '%s\n' pass_zipf.lua / pass "$ACCOUNTS" "200" \
    "bench/lua/pass_zipf.lua: as pass, accounts Zipf-distributed (s=${BENCH_ZIPF_S:-1.1}; AK00000 ~13% of requests); never throttled: all 200"
}
scenario_reject() {
  printf '%s\n' reject.lua / reject "$REJECT_ACCOUNTS" "429 200" \
    "bench/lua/reject.lua: as pass, $REJECT_ACCOUNTS accounts, limit $REJECT_QPS/s (sluice: per feature, nginx and haproxy: per account): nearly all 429"
}
scenario_zipf_limited() { # multi-instance part only
  printf '%s\n' pass_zipf.lua / limited "$ACCOUNTS" "200 429" \
    "bench/lua/pass_zipf.lua as zipf, with every feature's default_qps $LIMITED_QPS: the hottest accounts' keys (about the top 10-15 accounts at 30-45k req/s) run over their limit, so their buckets are busy and the global limits coordinate them through Redis; the rest pass: mostly 200, some 429"
}
scenario_forward() {
  printf '%s\n' - "/?Action=TextModeration&AccessKeyId=AK00000" pass "$ACCOUNTS" "200" \
    "GET /?Action=TextModeration&AccessKeyId=AK00000 (the first bench's request, one account), admitted: all 200"
}
spec() { scenario_"$1" | sed -n "${2}p"; } # scenario line
group_qps() { # group -> every feature's default_qps in its Redis key space
  case $1 in pass) echo "$PASS_QPS" ;; reject) echo "$REJECT_QPS" ;; limited) echo "$LIMITED_QPS" ;;
    *) die "unknown group '$1'" ;; esac
}
group_prefix() { # group -> Redis prefix of the single-instance part's instances
  case $1 in pass) echo sluice: ;; reject) echo sluicerj: ;; *) echo "sluice$1:" ;; esac
}
# The multi-instance part: configurations (labels) single, fleetN and
# fleetN_off; each configuration and group has a Redis prefix of its own, so
# that the N instances of a fleet see one another and nobody else.
multi_labels() { echo "single fleet$MULTI_N fleet${MULTI_N}_off"; }
multi_groups() { local s g out=" "; for s in $MULTI_SCENARIOS; do g=$(spec "$s" 3); [[ $out == *" $g "* ]] || out+="$g "; done; echo $out; }
multi_prefix() { echo "sluice-$1-$2:"; } # label group
multi_ids() { # label group -> the instance ids of that configuration
  local i
  if [[ $1 == single ]]; then echo "single.$2"; return; fi
  for ((i = 1; i <= MULTI_N; i++)); do printf '%s ' "$1-$i.$2"; done
}
seed_prefixes() { # "prefix qps prefix qps ...": every key space seeded into Redis
  local g l out="sluice: $PASS_QPS sluicerj: $REJECT_QPS"
  for g in $(multi_groups); do
    for l in $(multi_labels); do out+=" $(multi_prefix "$l" "$g") $(group_qps "$g")"; done
  done
  echo "$out"
}
applies() { # contender scenario: does the contender run this scenario?
  [[ $1 == sluice_plain && $(spec "$2" 3) != pass ]] && return 1
  return 0
}

report_lua() {
  cat <<'EOF2'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_RESULT requests=%d duration_us=%d p50_us=%.0f p90_us=%.0f p99_us=%.0f max_us=%.0f non2xx=%d err_connect=%d err_read=%d err_write=%d err_timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.status, e.connect, e.read, e.write, e.timeout))
end
EOF2
}
pool_size() { # scenario: requests per wrk thread before its cycle repeats (bench/lua/api.lua)
  local f n
  f=$(spec "$1" 1)
  case $f in
    -) echo 1 ;;
    *zipf*) echo 16384 ;;
    *) n=$((2 * $(spec "$1" 4))); ((n < 1024)) && n=1024; ((n > 65536)) && n=65536; echo "$n" ;;
  esac
}
scenario_lua() { # scenario: the scenario's wrk Lua (may be empty)
  local f
  f=$(spec "$1" 1)
  [[ $f == - ]] || cat "$here/lua/$f"
}

[[ -r $here/lua/api.lua && -r $here/lua/status.lua ]] || die "bench/lua/api.lua or status.lua missing"
for s in $(printf '%s\n' $SCENARIOS ${SCALE:+$SCALE_SCENARIO} $MULTI_SCENARIOS | awk '!seen[$0]++'); do
  declare -F "scenario_$s" >/dev/null || die "unknown scenario '$s' (known: $(declare -F | sed -n 's/^declare -f scenario_//p' | tr '\n' ' '))"
  { scenario_lua "$s"; echo; report_lua; } >"$tmp/$s.lua"
  { scenario_lua "$s"; echo; cat "$here/lua/status.lua"; } >"$tmp/$s-probe.lua"
done

# ---------------------------------------------------------------- one run
wrk_run() { # id scenario seconds outfile luafile [connections [seed]]
  local id=$1 s=$2 secs=$3 out=$4 lua=$5 conns=${6:-$CONNS}
  BENCH_LUA_DIR=$here/lua BENCH_ACCOUNTS=$(spec "$s" 4) BENCH_SEED=${7:-} \
    timeout -k 5 $((secs + 30)) taskset -c "$LOAD_CPUS" "$WRK_BIN" -t"$THREADS" -c"$conns" -d"${secs}s" \
    --timeout "$WRK_TIMEOUT" -s "$lua" "${inst_url[$id]}$(spec "$s" 2)" >"$out" 2>&1 ||
    { cat "$out" >&2; die "wrk failed against $id ($s)"; }
}

# wrk_runs "ids" scenario seconds outbase luafile: one wrk against one id
# (outbase.txt); against several, one wrk per id, started together, the
# connections split between them and each with its own random seed
# (outbase.1.txt ...). Sets wrk_outs to the output files.
wrk_runs() {
  local -a ids=($1) wp=()
  local s=$2 secs=$3 outb=$4 lua=$5 n=${#ids[@]} i
  wrk_outs=()
  if ((n == 1)); then
    wrk_outs=("$outb.txt")
    wrk_run "${ids[0]}" "$s" "$secs" "$outb.txt" "$lua"
    return 0
  fi
  for ((i = 0; i < n; i++)); do
    wrk_outs+=("$outb.$((i + 1)).txt")
    wrk_run "${ids[i]}" "$s" "$secs" "${wrk_outs[i]}" "$lua" $((CONNS / n + (i < CONNS % n))) $((1 + 1000 * i)) &
    wp+=($!)
  done
  for ((i = 0; i < n; i++)); do wait "${wp[i]}" || die "wrk against ${ids[i]} ($s) failed (output above)"; done
}

# global_metrics id: "coordinated_keys key_updates_total syncs_total
# directory_resyncs_total directory_lookups_total" from the instance's
# /metrics (0 for what an instance without global limits does not have).
global_metrics() {
  { curl -s --max-time 2 "${inst_admin[$1]}/metrics" || true; } | awk '
    $1 == "sluice_global_coordinated_keys" {c = $2} $1 == "sluice_global_key_updates_total" {u = $2}
    $1 == "sluice_global_syncs_total" {y = $2} $1 == "sluice_directory_resyncs_total" {r = $2}
    $1 == "sluice_directory_lookups_total" {l = $2} END {printf "%d %d %d %d %d\n", c, u, y, r, l}'
}
# wait_uncoordinated "ids": wait (at most 10 s) until no running sluice
# instance but ids has a coordinated key: a key stays coordinated, and costs
# Redis commands every sync, for 5 s after its load stops, which would be
# charged to the next run. After one timeout it waits no more.
quiet_wait=1
wait_uncoordinated() {
  local id busy end=$((SECONDS + 10))
  ((quiet_wait)) || return 0
  while :; do
    busy=""
    for id in "${!inst_admin[@]}"; do
      [[ " $1 " == *" $id "* || " $paused " == *" $id "* ]] && continue
      [[ $(global_metrics "$id") == 0\ * ]] || { busy=$id; break; }
    done
    [[ -z $busy ]] && return 0
    ((SECONDS < end)) || break
    sleep 0.2
  done
  log "$busy still has coordinated keys after 10 s; not waiting for coordinated keys any more"
  quiet_wait=0
}

# focus "ids": pause (SIGSTOP) every other sluice instance and continue ids,
# so that Redis's CPU during the run is the ids' alone (an idle instance with
# global limits on still sends one EVAL per sync interval); then wait until
# those with global limits on share again (a continued instance has missed
# its syncs: it falls back and rejoins within a few hundred ms), and a second
# more for whatever else catches up (a request that was in flight when it
# was paused may time out and reconnect).
paused=""
focus() {
  local id m p np="" end=$((SECONDS + 10)) n
  local -A s0=()
  n=$(wc -w <<<"$1")
  for id in "${!inst_admin[@]}"; do
    [[ " $1 " == *" $id "* || " $paused " == *" $id "* ]] && continue
    kill -STOP "${inst_pid[$id]}" 2>/dev/null || true
    paused+=" $id"
  done
  for p in $paused; do
    if [[ " $1 " == *" $p "* ]]; then kill -CONT "${inst_pid[$p]}" 2>/dev/null || true; else np+=" $p"; fi
  done
  paused=$np
  for id in $1; do s0[$id]=$(global_metrics "$id" | cut -d' ' -f3); done
  # shared again: mode 1, all n instances seen, and 3 syncs answered since
  for id in $1; do
    while :; do
      m=$({ curl -s --max-time 2 "${inst_admin[$id]}/metrics" || true; } | awk -v s0="${s0[$id]}" '
        $1 == "sluice_global_limits_mode" {md = $2} $1 == "sluice_global_instances" {n = $2}
        $1 == "sluice_global_syncs_total" {y = $2} END {print md + 0, (md == 0 ? 0 : n + 0), (y >= s0 + 3 ? "ok" : "wait")}')
      [[ $m == "0 0 "* || $m == "1 $n ok" ]] && break
      ((SECONDS < end)) || { log "focus: $id reports global limits mode, instances, syncs '$m' after 10 s (want 1 $n ok); measuring anyway"; break; }
      sleep 0.1
    done
  done
  sleep 1
}
unpause_all() {
  local id
  for id in $paused; do kill -CONT "${inst_pid[$id]}" 2>/dev/null || true; done
  paused=""
}

# probe "ids" scenario [row-scenario [label [seconds]]]: a run with the
# status-counting script (also the warm-up: sluice looks every account up
# once); checks the statuses (summed over the wrk processes when there are
# several ids).
probe() {
  local ids=$1 s=$2 rs=${3:-$2} first=${1%% *} allowed main_code total=0 main=0 kv code n line f
  local label=${4:-${first%%.*}} secs=${5:-$((WARMUP > 0 ? WARMUP : 1))}
  local -A cnt=()
  wrk_runs "$ids" "$s" "$secs" "$tmp/probe-${rs/:/-}-${first//./-}" "$tmp/$s-probe.lua"
  for f in "${wrk_outs[@]}"; do
    line=$(grep '^BENCH_STATUS' "$f") || { cat "$f" >&2; die "no status line from the probe of $ids ($s)"; }
    for kv in ${line#BENCH_STATUS}; do cnt[${kv%%=*}]=$((${cnt[${kv%%=*}]:-0} + ${kv#*=})); done
  done
  line=$(for code in "${!cnt[@]}"; do echo "$code=${cnt[$code]}"; done | sort -n | tr '\n' ' ')
  line=${line% }
  allowed=" $(spec "$s" 5) "; main_code=$(spec "$s" 5 | cut -d' ' -f1)
  for kv in $line; do
    code=${kv%%=*}; n=${kv#*=}; total=$((total + n))
    [[ $allowed == *" $code "* ]] || die "$ids answered HTTP $code ($n times) in scenario $s; allowed: $(spec "$s" 5) (probe: $line)"
    [[ $code == "$main_code" ]] && main=$n
  done
  ((total > 0 && 2 * main > total)) || die "$ids: fewer than half the answers were $main_code in scenario $s ($line)"
  echo "$rs $label $line" >>"$tmp/probes"
  log "probe $rs $label ($ids): $line"
}

# warm_directory id scenario: after a sluice's probe, more warm-up runs
# (the status script, 1 s each, at most WARM_MAX s) until its directory
# holds every account of the scenario: the probe alone (a second, slowed by
# the first look-ups) leaves about half of 10,000 accounts unseen, and their
# look-ups then land in the first round (about 12 us of Redis CPU each).
# A Zipf tail may stay unseen at the cap; the rounds note the look-ups.
warm_directory() {
  local id=$1 s=$2 want have end=$((SECONDS + WARM_MAX))
  [[ ${inst_kind[$id]:-} == sluice && -n ${inst_admin[$id]:-} ]] || return 0
  want=$(spec "$s" 4)
  while :; do
    have=$({ curl -s --max-time 2 "${inst_admin[$id]}/metrics" || true; } |
      awk '$1 == "sluice_directory_accounts" {a = $2} END {printf "%d", a}')
    ((have >= want)) && break
    ((SECONDS < end)) || { log "warm-up: $id holds $have of $want accounts after ${WARM_MAX} s"; break; }
    wrk_runs "$id" "$s" 1 "$tmp/warm-${s}-${id//./-}" "$tmp/$s-probe.lua"
  done
}

# settle_meter ids...: after a run, wait until every sluice among ids has
# its counts in Redis (nothing accumulated, no batch queued, seen after a
# spool round), at most SETTLE_MAX s, so that the Redis and proxy CPU of a
# run include the metering its requests cause, whatever --flush-ms is (a
# 10 s interval and 5 s runs would otherwise charge a flush to whichever
# contender runs when it lands).
settle_meter() {
  local id m end=$((SECONDS + SETTLE_MAX))
  for id in "$@"; do
    [[ ${inst_kind[$id]:-} == sluice && -n ${inst_admin[$id]:-} ]] || continue
    sleep 1.2 # the workers' tables reach the flusher at the next spool round
    while :; do
      m=$({ curl -s --max-time 2 "${inst_admin[$id]}/metrics" || true; } | awk '
        $1 == "sluice_meter_accumulated_requests" {a = $2} $1 == "sluice_meter_queue_batches" {q = $2}
        END {print (a == "" ? "none" : a + q)}')
      [[ $m == 0 || $m == none ]] && break
      ((SECONDS < end)) || { log "settle: $id still holds unflushed counts after ${SETTLE_MAX} s"; break; }
      sleep 0.2
    done
  done
}

# measure label scenario round "ids" [row-scenario]: one measured run (one
# wrk per id, started together), appends a line to results: requests and
# req/s summed over the wrk processes, p50/p99 the worst of them, CPU the sum
# of the ids' processes; then the ids' global-limits counters (instances,
# coordinated keys at the end, key updates and syncs during the run).
measure() {
  local c=$1 s=$2 r=$3 ids=$4 rs=${5:-$2} outb pids="" t0 t1 c0 c1 b0 b1 line id f
  local first=${4%% *}
  local cpus=${inst_cpus[$first]} nid
  nid=$(wc -w <<<"$ids")
  outb=$tmp/wrk-${rs/:/-}-$c-$r
  wait_uncoordinated "$ids"
  where="before round $r of $s against $ids"
  check_alive "${!pid_name[@]}"
  for id in $ids; do pids+=" $(pids_of "$id")"; done
  local g0="" g1="" gd="1 - - -"
  if [[ -n ${inst_admin[$first]:-} ]]; then
    g0=$(for id in $ids; do global_metrics "$id"; done)
  fi
  b0=$(backend_requests)
  # shellcheck disable=SC2086
  t0=$(proc_ticks $pids)
  c0=$(cpu_busy "$cpus")
  local all0 all1 own0 own1 ch0 ch1
  all0=$(cpu_busy "0-$((ncpu - 1))")
  # shellcheck disable=SC2046
  own0=$(proc_ticks $(all_own_pids))
  own_children_ticks; ch0=$own_child_ticks
  local rt0 rt1
  rt0=$(proc_ticks "$redis_pid")
  wrk_runs "$ids" "$s" "$DURATION" "$outb" "$tmp/$s.lua"
  # shellcheck disable=SC2086
  settle_meter $ids
  rt1=$(proc_ticks "$redis_pid")
  where="during round $r of $s against $ids"
  check_alive "${!pid_name[@]}"
  # shellcheck disable=SC2086
  t1=$(proc_ticks $pids)
  c1=$(cpu_busy "$cpus")
  all1=$(cpu_busy "0-$((ncpu - 1))")
  # shellcheck disable=SC2046
  own1=$(proc_ticks $(all_own_pids))
  own_children_ticks; ch1=$own_child_ticks
  local other=$(((all1 - all0) - (own1 - own0) - (ch1 - ch0)))
  b1=$(backend_requests)
  if [[ -n $g0 ]]; then
    g1=$(for id in $ids; do global_metrics "$id"; done)
    # instances, coordinated keys (summed over the instances, at the end), key updates, syncs
    gd=$(paste -d' ' <(echo "$g0") <(echo "$g1") | awk -v n="$nid" '
      {c += $6; u += $7 - $2; y += $8 - $3} END {printf "%d %d %d %d", n, c, u, y}')
    local rsy lku
    read -r rsy lku < <(paste -d' ' <(echo "$g0") <(echo "$g1") | awk '{t += $9 - $4; l += $10 - $5} END {print t + 0, l + 0}')
    ((rsy == 0)) || log "note: $rsy full directory resync(s) of $ids during round $r of $s (Redis reloads every account they hold)"
    ((lku < 100)) || log "note: $lku account lookups by $ids during round $r of $s (not all warmed up by the probe)"
  fi
  local breq=-
  [[ $b0 =~ ^[0-9]+$ && $b1 =~ ^[0-9]+$ ]] && breq=$((b1 - b0))
  local -A m=()
  local kv requests=0 non2xx=0 serr=0 rps=0 p50=0 p99=0 cpu_us
  for f in "${wrk_outs[@]}"; do
    line=$(grep '^BENCH_RESULT' "$f") || { cat "$f" >&2; die "no result line from wrk against $ids"; }
    m=()
    for kv in ${line#BENCH_RESULT }; do m[${kv%%=*}]=${kv#*=}; done
    requests=$((requests + m[requests])); non2xx=$((non2xx + m[non2xx]))
    serr=$((serr + m[err_connect] + m[err_read] + m[err_write] + m[err_timeout]))
    read -r rps p50 p99 < <(awk -v a="$rps" -v b="$p50" -v c="$p99" -v n="${m[requests]}" -v d="${m[duration_us]}" \
      -v p5="${m[p50_us]}" -v p9="${m[p99_us]}" 'BEGIN {
        printf "%.0f %.3f %.3f\n", a + n / (d / 1e6), (p5 / 1000 > b ? p5 / 1000 : b), (p9 / 1000 > c ? p9 / 1000 : c) }')
  done
  cpu_us=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$requests" \
    'BEGIN {if (n > 0) printf "%.2f", t / hz * 1e6 / n; else print "nan"}')
  echo "$rs $c $r $rps $p50 $p99 $cpu_us $requests $non2xx $serr $((t1 - t0)) $((c1 - c0)) $breq $other $cpus $(awk -v t=$((rt1 - rt0)) -v hz="$CLK_TCK" -v n="$requests" \
    'BEGIN {if (n > 0) printf "%.2f", t / hz * 1e6 / n; else print "nan"}') $((rt1 - rt0)) $gd" >>"$tmp/results"
  log "$(printf 'round %d/%d %-7s %-12s %7s req/s  p50 %s ms  p99 %s ms  %s us CPU/req  non-2xx %s  socket errors %s  backend saw %s  other CPU ticks %s%s' \
    "$r" "$ROUNDS" "$rs" "$c" "$rps" "$p50" "$p99" "$cpu_us" "$non2xx" "$serr" "$breq" "$other" \
    "$([[ -n $g0 ]] && awk -v g="$gd" -v t=$((rt1 - rt0)) 'BEGIN {split(g, a, " "); printf "  redis ticks %d  coordinated keys %d  key updates %d  syncs %d", t, a[2], a[3], a[4]}')")"
  if (((non2xx > 0 && $([[ $(spec "$s" 5) == 200 ]] && echo 1 || echo 0)) || serr > 0)); then
    log "anomaly against $ids ($s, round $r); wrk said:"
    grep -E 'Non-2xx|Socket errors|requests in' "${wrk_outs[@]}" >&2 || true
  fi
}

# ---------------------------------------------------------------- perf
perf_sluice() { # secs
  local secs=$1 pd=$tmp/perf.data s=${SCENARIOS%% *} id
  id=sluice.$(spec "$s" 3)
  command -v perf >/dev/null || { log "perf not on PATH; skipping perf"; return 0; }
  echo
  echo "### perf on sluice ($id, PID ${inst_pid[$id]}), $secs s under the same load ($s)"
  echo
  echo '```'
  wrk_run "$id" "$s" "$((2 * secs + 3))" "$tmp/wrk-perf.txt" "$tmp/$s.lua" &
  local wpid=$!
  sleep 1
  timeout $((secs + 20)) perf stat -e task-clock,context-switches,cpu-migrations \
    -p "${inst_pid[$id]}" -- sleep "$secs" 2>&1 | sed -n '/Performance counter/,$p' | sed '/^$/d' || true
  if timeout $((secs + 30)) perf record -q -e cpu-clock -F 999 -g -o "$pd" -p "${inst_pid[$id]}" -- sleep "$secs" \
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
start_redis
groups=""
for s in $SCENARIOS; do g=$(spec "$s" 3); [[ " $groups " == *" $g "* ]] || groups+=" $g"; done
for g in $groups; do
  for c in $CONTENDERS; do
    [[ $c == sluice_plain && $g != pass ]] && continue
    start_"$c" "$c.$g" "$g"
  done
done

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
cpu_model=$(sed -n 's/^model name[[:space:]]*:[[:space:]]*//p' /proc/cpuinfo | sed -n 1p)
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$({ git -C "$root" status --porcelain -- proxy limiter modstub 2>/dev/null || true; } | head -c1)
{
  echo "## proxy_bench $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- machine: $(nproc) CPUs, ${cpu_model:-unknown CPU}, $(uname -sr); source tree at commit $commit${dirty:+ (proxy/, limiter/ or modstub/ modified)}"
  echo "- versions: $("$SLUICE_BIN" --version 2>&1 | sed -n 1p); $("$NGINX_BIN" -v 2>&1 | sed 's/^nginx version: //'); haproxy $("$HAPROXY_BIN" -v 2>&1 | sed -n 's/^HAProxy version \([^ ]*\).*/\1/p'); $("$WRK_BIN" -v 2>&1 | sed -n 1p | cut -d' ' -f1-2); redis $("$REDIS_BIN" --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')"
  echo "- pinning (taskset): the proxy under test (sluice, sluice_plain, sluice_nometer, nginx, haproxy; one worker/thread each) on CPU $PROXY_CPUS; wrk, the backend and redis-server on CPU $LOAD_CPUS. Only one contender has load at a time, so it has CPU $PROXY_CPUS to itself (the idle ones sleep there)."
  echo "- load: wrk -t$THREADS -c$CONNS -d${DURATION}s --timeout $WRK_TIMEOUT, $ROUNDS round(s) interleaved (${CONTENDERS// /, } in turn), after a ${WARMUP}s probe + warm-up run per contender and scenario; median over rounds"
  echo "- backend: $backend_desc on 127.0.0.1:$backend_port; redis-server on 127.0.0.1:$redis_port with $ACCOUNTS accounts (SET P ak:AKnnnnn uidnnnnn, two prefixes)"
  echo "- binaries: $SLUICE_BIN (built $(date -u -r "$SLUICE_BIN" '+%Y-%m-%d %H:%M UTC'))"
  for c in $CONTENDERS; do echo "- $(describe_"$c")"; done
  for s in $SCENARIOS; do echo "- scenario **$s**: $(spec "$s" 6)"; done
  if [[ -n $MULTI_SCENARIOS ]]; then
    echo "- multi-instance part (issue 11, global limits): scenarios ${MULTI_SCENARIOS// /, }; configurations single (1 sluice, --global-limits on), fleet$MULTI_N ($MULTI_N sluices, --global-limits on, --global-sync-ms default), fleet${MULTI_N}_off ($MULTI_N, --global-limits off), each --workers 1, --metering $MULTI_METERING, on CPU $PROXY_CPUS, each configuration on a Redis prefix of its own; the load (wrk -t$THREADS, $CONNS connections in all) split over $MULTI_N wrk processes for the fleets; $ROUNDS round(s) interleaved"
    for s in $MULTI_SCENARIOS; do
      [[ " $SCENARIOS " == *" $s "* ]] || echo "- scenario **$s**: $(spec "$s" 6)"
    done
  fi
  echo "- CPU us/req = delta(utime+stime) of the proxy's processes from /proc/PID/stat over the wrk run (CLK_TCK=$CLK_TCK) / requests wrk completed"
} >"$tmp/header"
cat "$tmp/header" >&2

: >"$tmp/probes"
for s in $SCENARIOS; do
  for c in $CONTENDERS; do
    applies "$c" "$s" || continue
    probe "$c.$(spec "$s" 3)" "$s"
    warm_directory "$c.$(spec "$s" 3)" "$s"
  done
done
# the warm-up's counts in Redis before the first round, not charged to it
# shellcheck disable=SC2046
settle_meter $(for c in $CONTENDERS; do for s in $SCENARIOS; do applies "$c" "$s" && echo "$c.$(spec "$s" 3)"; done; done | sort -u)

: >"$tmp/results"
for ((r = 1; r <= ROUNDS; r++)); do
  for s in $SCENARIOS; do
    for c in $CONTENDERS; do applies "$c" "$s" && measure "$c" "$s" "$r" "$c.$(spec "$s" 3)"; done
  done
done

# Scaling: sluice with 1..N workers, pass group, on CPUs 0..N-1 (capped at
# the machine); from 2 workers on a 2-CPU machine the proxy shares CPU 1
# with wrk, the backend and redis.
scale_rounds=$ROUNDS
if [[ -n $SCALE ]]; then
  for w in $SCALE; do
    local_cpus=$PROXY_CPUS
    ((w > 1)) && local_cpus=0-$(((w < ncpu ? w : ncpu) - 1))
    launch_sluice "sluice_w$w.$(spec "$SCALE_SCENARIO" 3)" "$(spec "$SCALE_SCENARIO" 3)" "$local_cpus" "$w"
    probe "sluice_w$w.$(spec "$SCALE_SCENARIO" 3)" "$SCALE_SCENARIO"
  done
  for ((r = 1; r <= scale_rounds; r++)); do
    for w in $SCALE; do measure "sluice_w$w" "$SCALE_SCENARIO" "$r" "sluice_w$w.$(spec "$SCALE_SCENARIO" 3)" "scale:$SCALE_SCENARIO"; done
  done
fi

# Several instances on one Redis (issue 11's global limits): per group of
# the multi-instance scenarios, one sluice (single), N sluices with
# --global-limits on (fleetN) and N with it off (fleetN_off), each
# configuration on a Redis prefix of its own (so a fleet's instances see one
# another and nobody else), every instance --workers 1 on the proxy CPUs:
# the N share them, so that their total CPU compares with single's. Started
# only now, so that they do not heartbeat into Redis during the runs above.
if [[ -n $MULTI_SCENARIOS ]]; then
  for g in $(multi_groups); do
    for l in $(multi_labels); do
      gl=on; [[ $l == *_off ]] && gl=off
      for id in $(multi_ids "$l" "$g"); do
        LAUNCH_PREFIX=$(multi_prefix "$l" "$g") launch_sluice "$id" "$g" "$PROXY_CPUS" 1 --global-limits "$gl" \
          --metering "$MULTI_METERING" --resync-ms 86400000
      done
    done
  done
  # Probes of 2 x WARMUP s per instance, then warm-up runs of twice the
  # length until every wrk process has gone through its whole pool of
  # requests in one run (at most 3 more): a run replays its pool from the
  # start, so only then has every account the rounds send been looked up
  # (each of a fleet's wrk processes sends a third of the requests).
  for s in $MULTI_SCENARIOS; do
    for l in $(multi_labels); do
      ids=$(multi_ids "$l" "$(spec "$s" 3)")
      secs=$((2 * (WARMUP > 0 ? WARMUP : 1) * $(wc -w <<<"$ids")))
      probe "$ids" "$s" "multi:$s" "$l" "$secs"
      for ((i = 1; i <= 3; i++)); do
        short=$(cat "${wrk_outs[@]}" | awk -v p=$(($(pool_size "$s") * THREADS)) '/ requests in / && $1 < p {n++} END {print n + 0}')
        ((short > 0)) || break
        secs=$((2 * secs))
        log "warm-up multi:$s $l: $short wrk process(es) did not go through their pool of $(pool_size "$s") requests (per thread); $secs s more"
        wrk_runs "$ids" "$s" "$secs" "$tmp/warm-multi-$s-$l-$i" "$tmp/$s.lua"
      done
    done
  done
  # Redis's CPU with no load and only one configuration running (the
  # others paused): its fixed cost (heartbeats: one EVAL per sync interval
  # and instance with global limits on; directory and metering timers).
  declare -A idle_redis=()
  for g in $(multi_groups); do
    for l in $(multi_labels); do
      focus "$(multi_ids "$l" "$g")"
      idle_r0=$(proc_ticks "$redis_pid"); idle_t0=$(date +%s.%N)
      sleep "$DURATION"
      idle_r1=$(proc_ticks "$redis_pid"); idle_t1=$(date +%s.%N)
      idle_redis[$g,$l]=$(awk -v t=$((idle_r1 - idle_r0)) -v hz="$CLK_TCK" -v a="$idle_t0" -v b="$idle_t1" \
        'BEGIN {printf "%.1f", t / hz * 1000 / (b - a)}')
      log "redis-server with no load, only $l ($g group) running: ${idle_redis[$g,$l]} ms CPU per second"
    done
  done
  for ((r = 1; r <= ROUNDS; r++)); do
    for s in $MULTI_SCENARIOS; do
      for l in $(multi_labels); do
        focus "$(multi_ids "$l" "$(spec "$s" 3)")"
        measure "$l" "$s" "$r" "$(multi_ids "$l" "$(spec "$s" 3)")" "multi:$s"
      done
    done
  done
  unpause_all
fi

# ---------------------------------------------------------------- report
med() { # scenario contender column -> median over rounds
  awk -v s="$1" -v c="$2" -v k="$3" '$1==s && $2==c {print $k}' "$tmp/results" | median
}
sumcol() { # scenario contender column -> sum over rounds
  awk -v s="$1" -v c="$2" -v k="$3" '$1==s && $2==c {t+=$k} END {print t+0}' "$tmp/results"
}
peers() { local c; for c in $CONTENDERS; do [[ $c == nginx || $c == haproxy ]] && echo "$c"; done; }

report() {
  cat "$tmp/header"
  if [[ -n ${SCENARIOS// /} ]]; then # (-s "": the multi-instance part only)
    echo
    echo "### Pass and reject paths"
    echo
    echo "Median over rounds. CPU vs best peer = CPU us/req / the lowest CPU us/req of nginx and haproxy in the same scenario (lower is better; sluice's target is <= 1.00); req/s vs best peer = req/s / the highest req/s of nginx and haproxy. redis CPU us/req: redis-server's CPU over the run / requests; for a sluice, until its counts of the run are in Redis (at most ${SETTLE_MAX} s after it: a run's whole metering, whatever --flush-ms, so with a long interval an upper bound of the steady state by about (run + interval) / run) (sluice's lookups and metering; the other contenders do not use Redis; not charged to sluice, and it runs on the load CPU, so it takes CPU from wrk and the backend). non-2xx % is the share of answers that were not 2xx (429s on the reject path). Probe answers: statuses counted by bench/lua/status.lua in the ${WARMUP}s probe run before the rounds."
    echo
    echo "| scenario | contender | req/s | p50 ms | p99 ms | CPU us/req | CPU vs best peer | req/s vs best peer | redis CPU us/req | non-2xx % | socket errors | probe answers | rounds |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
    local s c
    local -A M=()
    for s in $SCENARIOS; do
      local best_cpu="" best_rps="" p
      for c in $CONTENDERS; do
        applies "$c" "$s" || continue
        M[$s,$c,rps]=$(med "$s" "$c" 4); M[$s,$c,p50]=$(med "$s" "$c" 5)
        M[$s,$c,p99]=$(med "$s" "$c" 6); M[$s,$c,cpu]=$(med "$s" "$c" 7)
      done
      for p in $(peers); do
        best_cpu=$(awk -v a="$best_cpu" -v b="${M[$s,$p,cpu]}" 'BEGIN {print (a == "" || b + 0 < a + 0) ? b : a}')
        best_rps=$(awk -v a="$best_rps" -v b="${M[$s,$p,rps]}" 'BEGIN {print (a == "" || b + 0 > a + 0) ? b : a}')
      done
      M[$s,best_cpu]=$best_cpu
      for c in $CONTENDERS; do
        applies "$c" "$s" || continue
        local req n2 se n probe
        req=$(sumcol "$s" "$c" 8); n2=$(sumcol "$s" "$c" 9); se=$(sumcol "$s" "$c" 10)
        n=$(awk -v s="$s" -v c="$c" '$1==s && $2==c {n++} END {print n+0}' "$tmp/results")
        probe=$(awk -v s="$s" -v c="$c" '$1==s && $2==c {$1=""; $2=""; sub(/^ +/, ""); print}' "$tmp/probes")
        awk -v s="$s" -v c="$c" -v rps="${M[$s,$c,rps]}" -v p50="${M[$s,$c,p50]}" -v p99="${M[$s,$c,p99]}" \
          -v cpu="${M[$s,$c,cpu]}" -v bc="$best_cpu" -v br="$best_rps" -v req="$req" -v n2="$n2" -v se="$se" \
          -v probe="$probe" -v n="$n" -v rcpu="$(med "$s" "$c" 16)" 'BEGIN {
            printf "| %s | %s | %.0f | %.3f | %.3f | %.2f | %s | %s | %.2f | %.2f | %d | %s | %d |\n", s, c, rps, p50, p99, cpu,
              (bc == "" ? "-" : sprintf("%.2f", cpu / bc)), (br == "" ? "-" : sprintf("%.2f", rps / br)), rcpu,
              (req > 0 ? 100 * n2 / req : 0), se, probe, n }'
      done
    done
    echo
    if [[ " $CONTENDERS " == *" sluice "* && -n $(peers) ]]; then
      for s in $SCENARIOS; do
        awk -v s="$s" -v a="${M[$s,sluice,cpu]}" -v b="${M[$s,best_cpu]}" 'BEGIN {
          printf "- **%s: sluice CPU us/request / best peer = %.2f** (%.2f vs %.2f us; target <= 1.00: %s)\n",
            s, a / b, a, b, (a <= b ? "met" : "NOT met") }'
      done
    fi
    if [[ " $CONTENDERS " == *" sluice "* && " $CONTENDERS " == *" sluice_plain "* ]]; then
      for s in $SCENARIOS; do
        applies sluice_plain "$s" || continue
        awk -v s="$s" -v a="${M[$s,sluice,cpu]}" -v b="${M[$s,sluice_plain,cpu]}" 'BEGIN {
          printf "- %s: cost of admission (sluice minus sluice --admission off, both metered): %+.2f us/req (%.2f vs %.2f, ratio %.2f)\n",
            s, a - b, a, b, a / b }'
      done
    fi
    if [[ " $CONTENDERS " == *" sluice "* && " $CONTENDERS " == *" sluice_nometer "* ]]; then
      for s in $SCENARIOS; do
        awk -v s="$s" -v a="${M[$s,sluice,cpu]}" -v b="${M[$s,sluice_nometer,cpu]}" 'BEGIN {
          if (b > 0) printf "- %s: cost of metering (sluice minus sluice --metering off, both admitting): %+.2f us/req (%.2f vs %.2f, ratio %.2f)\n",
            s, a - b, a, b, a / b }'
      done
    fi
  fi
  if [[ -n $SCALE ]]; then
    echo
    echo "### Scaling: sluice --workers N ($SCALE_SCENARIO scenario)"
    echo
    echo "Same load (wrk -t$THREADS -c$CONNS on CPU $LOAD_CPUS), $scale_rounds round(s) interleaved. With N > 1 workers on this ${ncpu}-CPU machine sluice is pinned to CPUs 0-$((ncpu - 1)) and shares CPU $LOAD_CPUS with wrk, the backend and redis-server: the proxy no longer has a core of its own, and req/s is bounded by the whole machine, not by sluice."
    echo
    echo "| workers | sluice CPUs | req/s | p50 ms | p99 ms | CPU us/req | socket errors | rounds |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|"
    for w in $SCALE; do
      local ss=scale:$SCALE_SCENARIO cw=sluice_w$w
      printf '| %s | %s | %.0f | %.3f | %.3f | %.2f | %s | %s |\n' "$w" \
        "$(awk -v s="$ss" -v c="$cw" '$1==s && $2==c {print $15; exit}' "$tmp/results")" \
        "$(med "$ss" "$cw" 4)" "$(med "$ss" "$cw" 5)" "$(med "$ss" "$cw" 6)" "$(med "$ss" "$cw" 7)" \
        "$(sumcol "$ss" "$cw" 10)" "$(awk -v s="$ss" -v c="$cw" '$1==s && $2==c {n++} END {print n+0}' "$tmp/results")"
    done
  fi
  [[ -n $MULTI_SCENARIOS ]] && report_multi
  local cap=$((ncpu * DURATION * CLK_TCK)) nwarn
  nwarn=$(awk -v cap=$cap '$14 > 0.05 * cap {n++} END {print n+0}' "$tmp/results")
  echo
  echo "### Interference"
  echo
  echo "$nwarn of $(wc -l <"$tmp/results") runs had more than 5% of the machine's CPU used by processes this script did not start (other CPU ticks > $((cap / 20)) of $cap)."
  awk -v cap=$cap '$14 > 0.05 * cap {
      printf "- **WARNING: interference**: %s, %s, round %s: %.0f%% of the machine; req/s and latency of that run are disturbed (CPU us/req less so)\n",
        $1, $2, $3, 100 * $14 / cap }' "$tmp/results"
  echo
  echo "<details><summary>every round</summary>"
  echo
  echo "| scenario | contender | round | req/s | p50 ms | p99 ms | CPU us/req | requests | non-2xx | socket errors | proxy CPU ticks | busy ticks of proxy CPUs | backend requests | other CPU ticks | proxy CPUs | redis CPU us/req | redis CPU ticks | instances | coordinated keys | key updates | syncs |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"
  awk '{ line = "|"; for (i = 1; i <= 21; i++) line = line " " $i " |"; print line }' "$tmp/results"
  echo
  echo "Busy ticks of the proxy CPUs minus the proxy's own ticks = softirq (loopback TCP) plus anything else that ran there."
  echo "Multi-instance rows (multi:...): req/s and requests summed over the instances' wrk processes, p50/p99 the worst of them, CPU ticks summed over the instances; coordinated keys summed over the instances at the end of the run, key updates and syncs summed over the instances during the run (- where not measured)."
  echo "Other CPU ticks = busy ticks of all CPUs minus those of the proxies, backend, redis, wrk and this script's helpers:"
  echo "CPU used by processes this script did not start (a clean run has next to none; each CPU gives $CLK_TCK ticks a second);"
  echo "load average at start: $load_start; at end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  echo "</details>"
  if ((PERF > 0)) && [[ " $CONTENDERS " == *" sluice "* ]]; then perf_sluice "$PERF"; fi
}

report_multi() {
  local s l g fl=fleet$MULTI_N off=fleet${MULTI_N}_off
  echo
  echo "### Several instances on one Redis: global limits (issue 11)"
  echo
  echo "Per scenario, interleaved round by round: **single**, one sluice with --global-limits on (as the sluice contender); **$fl**, $MULTI_N sluices with --global-limits on, one Redis and prefix, the load split across them ($MULTI_N wrk processes started together, $CONNS connections in all, $((CONNS / MULTI_N)) or $((CONNS / MULTI_N + 1)) each); **$off**, the same $MULTI_N with --global-limits off (each admits the whole limit), so that Redis's CPU of the coordination = $fl minus $off. Every instance --workers 1, --metering $MULTI_METERING$([[ $MULTI_METERING == off ]] && echo " (a measuring aid: Redis then serves only the lookups and the shares)"), all pinned to CPU $PROXY_CPUS (the $MULTI_N share it, so the total compares with single's); each configuration has a Redis prefix of its own and its own --spool-dir and admin port. sluice CPU us/req = the instances' utime+stime summed / requests completed (all wrk processes); vs single = that / single's (target for $fl: <= 1.03); redis CPU us/req = redis-server's utime+stime / requests (metering, lookups and, for $fl, the shares; target for the coordination, $fl minus $off: <= 0.30 us). p99: the worst of the wrk processes. Coordinated keys: sluice_global_coordinated_keys per instance at the end of the run (a busy key is coordinated on every instance); key updates and syncs: sluice_global_key_updates_total and sluice_global_syncs_total per instance and second of the run. During each run of this part every other sluice instance of the script is paused (SIGSTOP; continued, SIGCONT, for its own runs, which start once its instances share limits again: mode 1, all N seen, 3 syncs answered), so that Redis's CPU is that of the configuration under test alone: an idle instance with global limits on still sends one EVAL per sync interval."
  echo
  echo "Redis with no load (ms of CPU per second, over ${DURATION} s, only that configuration running; its fixed cost: heartbeats, directory and metering timers):"
  echo
  echo "| group | $(multi_labels | sed 's/ / | /g') |"
  echo "|---|$(for l in $(multi_labels); do printf -- '---:|'; done)"
  for g in $(multi_groups); do
    printf '| %s |' "$g"; for l in $(multi_labels); do printf ' %s |' "${idle_redis[$g,$l]:-?}"; done; echo
  done
  echo
  echo "| scenario | configuration | instances | req/s | p99 ms | sluice CPU us/req | vs single | redis CPU us/req | redis minus $off | non-2xx % | socket errors | coordinated keys per instance | key updates/s per instance | syncs/s per instance | probe answers | rounds |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
  for s in $MULTI_SCENARIOS; do
    local rs=multi:$s base_cpu off_redis
    base_cpu=$(med "$rs" single 7); off_redis=$(med "$rs" "$off" 16)
    for l in $(multi_labels); do
      awk -v s="$s" -v l="$l" -v rps="$(med "$rs" "$l" 4)" -v p99="$(med "$rs" "$l" 6)" -v cpu="$(med "$rs" "$l" 7)" \
        -v bc="$base_cpu" -v rc="$(med "$rs" "$l" 16)" -v ro="$off_redis" -v req="$(sumcol "$rs" "$l" 8)" \
        -v n2="$(sumcol "$rs" "$l" 9)" -v se="$(sumcol "$rs" "$l" 10)" -v d="$DURATION" \
        -v probe="$(awk -v s="$rs" -v c="$l" '$1==s && $2==c {$1=""; $2=""; sub(/^ +/, ""); print}' "$tmp/probes")" \
        -v cols="$(awk -v s="$rs" -v c="$l" '$1==s && $2==c {print $18, $19, $20, $21}' "$tmp/results")" 'BEGIN {
          nr = split(cols, v, /[ \n]+/) / 4
          for (i = 0; i < nr; i++) { n = v[4*i+1]; ck[i] = v[4*i+2] / n; ku[i] = v[4*i+3] / n / d; sy[i] = v[4*i+4] / n / d }
          printf "| %s | %s | %d | %.0f | %.3f | %.2f | %.3f | %.2f | %s | %.2f | %d | %s | %s | %s | %s | %d |\n", s, l, n, rps, p99, cpu,
            cpu / bc, rc, (l == "single" ? "-" : sprintf("%+.2f", rc - ro)), (req > 0 ? 100 * n2 / req : 0), se,
            medof(ck, nr, "%.1f"), medof(ku, nr, "%.0f"), medof(sy, nr, "%.1f"), probe, nr }
        function medof(a, k, f,   i, j, t) {   # median of a[0..k-1]
          for (i = 1; i < k; i++) for (j = i; j > 0 && a[j-1] > a[j]; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
          return k == 0 ? "-" : sprintf(f, k % 2 ? a[(k-1)/2] : (a[k/2-1] + a[k/2]) / 2) }'
    done
  done
  echo
  for s in $MULTI_SCENARIOS; do
    local rs=multi:$s
    # per-round ratios and differences, paired within the round
    local pr_cpu pr_red
    pr_cpu=$(awk -v s="$rs" -v a="$fl" '$1==s && $2=="single" {b[$3]=$7} $1==s && $2==a {f[$3]=$7; if ($3 > m) m = $3}
      END {for (r = 1; r <= m; r++) if ((r in f) && (r in b)) printf "%s%.3f", (n++ ? ", " : ""), f[r] / b[r]}' "$tmp/results")
    pr_red=$(awk -v s="$rs" -v a="$fl" -v o="$off" '$1==s && $2==a {f[$3]=$16; if ($3 > m) m = $3} $1==s && $2==o {b[$3]=$16}
      END {for (r = 1; r <= m; r++) if ((r in f) && (r in b)) printf "%s%+.2f", (n++ ? ", " : ""), f[r] - b[r]}' "$tmp/results")
    awk -v s="$s" -v fl="$fl" -v a="$(med "$rs" "$fl" 7)" -v b="$(med "$rs" single 7)" -v pr="$pr_cpu" 'BEGIN {
      printf "- **%s: %s sluice CPU us/request / single = %.3f** (%.2f vs %.2f us; target <= 1.03: %s; per round: %s)\n",
        s, fl, a / b, a, b, (a <= 1.03 * b ? "met" : "NOT met"), pr }'
    awk -v s="$s" -v fl="$fl" -v o="$off" -v a="$(med "$rs" "$fl" 7)" -v b="$(med "$rs" "$off" 7)" -v c="$(med "$rs" single 7)" 'BEGIN {
      printf "- %s: %s / %s sluice CPU us/request = %.3f (global limits alone); %s / single = %.3f (splitting the load over %d instances alone)\n",
        s, fl, o, a / b, o, b / c, '"$MULTI_N"' }'
    awk -v s="$s" -v fl="$fl" -v o="$off" -v a="$(med "$rs" "$fl" 16)" -v b="$(med "$rs" "$off" 16)" -v pr="$pr_red" 'BEGIN {
      printf "- **%s: Redis CPU per request of the coordination (%s minus %s) = %+.2f us** (%.2f vs %.2f; target <= 0.30: %s; per round: %s)\n",
        s, fl, o, a - b, a, b, (a - b <= 0.30 ? "met" : "NOT met"), pr }'
  done
}

# plot png: req/s and p99 per contender (bars) and scenario (groups), gnuplot.
plot() {
  local png=$1 s c col
  for col in 4:rps 6:p99; do
    {
      printf 'scenario'; for c in $CONTENDERS; do printf ' %s' "$c"; done; echo
      for s in $SCENARIOS; do
        printf '%s' "$s"
        for c in $CONTENDERS; do
          if applies "$c" "$s"; then printf ' %s' "$(med "$s" "$c" "${col%%:*}")"; else printf ' -'; fi
        done
        echo
      done
    } >"$tmp/plot-${col#*:}.dat"
  done
  local n
  n=$(wc -w <<<"$CONTENDERS")
  cat >"$tmp/plot.gp" <<EOF2
set terminal pngcairo size 1000,800 noenhanced font ",10"
set output "$png"
set datafile missing "-"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set key outside right top
set grid ytics
set yrange [0:*]
set multiplot layout 2,1 title "proxy_bench $(date -u '+%Y-%m-%d %H:%M UTC'): one worker each, proxy on CPU $PROXY_CPUS, load on CPU $LOAD_CPUS ($(nproc) CPUs, ${cpu_model:-?}); median of $ROUNDS round(s) x ${DURATION}s"
set title "throughput (req/s, higher is better)"
set ylabel "req/s"
plot for [i=2:$((n + 1))] "$tmp/plot-rps.dat" using i:xtic(1) title columnheader(i)
set title "p99 latency, client side (ms, lower is better)"
set ylabel "ms"
plot for [i=2:$((n + 1))] "$tmp/plot-p99.dat" using i:xtic(1) title columnheader(i)
unset multiplot
EOF2
  gnuplot "$tmp/plot.gp" 2>"$tmp/plot.log" || { log "gnuplot failed: $(head -n 3 "$tmp/plot.log")"; return 0; }
  log "plot written to $png"
}

report >"$tmp/report.md"
if [[ -z $OUTPUT ]]; then
  if [[ $quick == 1 ]]; then OUTPUT=$here/results/quick.md; else OUTPUT=$here/results/latest.md; fi
fi
mkdir -p "$(dirname "$OUTPUT")"
base=${OUTPUT%.md}
if [[ $PLOT == 1 && -n ${SCENARIOS// /} ]]; then
  plot "$base.png"
  printf '\nPlot: %s\n' "$base.png" >>"$tmp/report.md"
fi
{ echo "# scenario contender round rps p50_ms p99_ms cpu_us_per_req requests non2xx socket_errors proxy_ticks proxy_cpus_busy_ticks backend_requests other_ticks proxy_cpus redis_cpu_us_per_req redis_ticks instances coordinated_keys key_updates syncs"
  cat "$tmp/results"; } >"$base.tsv"
cat "$tmp/report.md"
cp "$tmp/report.md" "$OUTPUT"
log "report written to $OUTPUT (per-round data $base.tsv)"
