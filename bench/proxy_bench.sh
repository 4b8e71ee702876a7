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
# ratio to the best peer; then sluice with 1..N workers (scaling), and a
# gnuplot PNG of req/s and p99.
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
WRK_TIMEOUT=${BENCH_WRK_TIMEOUT:-2s}     # wrk's per-request timeout
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
                         sluice_base: BENCH_BASE_BIN run as sluice, to compare two builds in one run)
  --scale LIST          sluice --workers counts for the scaling run, "" for none [BENCH_SCALE="$SCALE"]
  --scale-scenario S    scenario of the scaling run              [BENCH_SCALE_SCENARIO=$SCALE_SCENARIO]
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

for v in ROUNDS DURATION CONNS THREADS WARMUP BACKEND_WORKERS PERF ACCOUNTS REJECT_ACCOUNTS REJECT_QPS; do
  [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
done
((ROUNDS >= 1 && DURATION >= 1 && CONNS >= 1 && THREADS >= 1)) ||
  die "rounds, duration, connections and threads must be >= 1"
((CONNS >= THREADS)) || die "wrk needs connections >= threads"
((ACCOUNTS >= 1 && ACCOUNTS <= 100000 && REJECT_ACCOUNTS >= 1 && REJECT_ACCOUNTS <= ACCOUNTS)) ||
  die "accounts must be 1..100000 and reject accounts 1..accounts"
((REJECT_QPS >= 1)) || die "reject qps must be >= 1"
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
declare -A inst_url=() inst_pid=() inst_cpus=() inst_kind=() inst_workers=()

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
# same accounts, every feature's default_qps = the reject limit). Redis's
# own CPU is not charged to sluice.
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
  # SET P ak:AKnnnnn uidnnnnn for both prefixes, and the feature limits, as
  # Redis protocol through redis-cli --pipe.
  awk -v n="$ACCOUNTS" -v feats="$FEATURES" -v pass="$PASS_QPS" -v rej="$REJECT_QPS" '
    function arg(x) { return sprintf("$%d\r\n%s\r\n", length(x), x) }
    function set(k, v) { printf "*3\r\n%s%s%s", arg("SET"), arg(k), arg(v) }
    function hset(k, f, v) { printf "*4\r\n%s%s%s%s", arg("HSET"), arg(k), arg(f), arg(v) }
    BEGIN {
      for (i = 0; i < n; i++) {
        ak = sprintf("AK%05d", i); uid = sprintf("uid%05d", i)
        set("sluice:ak:" ak, uid); set("sluicerj:ak:" ak, uid)
      }
      k = split(feats, f, " ")
      for (i = 1; i <= k; i++) {
        hset("sluice:feature:" f[i], "default_qps", pass)
        hset("sluicerj:feature:" f[i], "default_qps", rej)
      }
    }' | redis_cmd --pipe >"$tmp/redis/seed.log" 2>&1 || { cat "$tmp/redis/seed.log" >&2; die "could not seed redis-server"; }
  grep -q 'errors: 0' "$tmp/redis/seed.log" || { cat "$tmp/redis/seed.log" >&2; die "seeding redis-server had errors"; }
  local last
  last=$(printf %05d $((ACCOUNTS - 1)))
  [[ $(redis_cmd get "sluice:ak:AK$last") == "uid$last" ]] ||
    die "redis-server lacks the seeded accounts"
}

# ---------------------------------------------------------------- contenders
# start_<contender> id group: one instance (sets inst_* of id).
# pids_of id: the processes whose CPU is charged to it.

launch_sluice() { # id group cpus workers [extra args...]; LAUNCH_BIN: another binary
  local id=$1 group=$2 cpus=$3 workers=$4 listen admin pid rc prefix=sluice: bin=${LAUNCH_BIN:-$SLUICE_BIN}
  shift 4
  local -a extra=("$@")
  [[ -n ${redis_port:-} ]] || start_redis
  [[ $group == reject ]] && prefix=sluicerj:
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
      return 0
    fi
  done
  die "$id: no free port after 3 tries"
}
start_sluice() { launch_sluice "$1" "$2" "$PROXY_CPUS" 1; }
start_sluice_plain() {
  [[ $("$SLUICE_BIN" --help 2>&1 || true) == *--admission* ]] ||
    die "contender sluice_plain needs a sluice with --admission ($SLUICE_BIN has none)"
  launch_sluice "$1" "$2" "$PROXY_CPUS" 1 --admission off
}
describe_sluice() {
  echo "sluice ($("$SLUICE_BIN" --version 2>&1 | sed -n 1p)): --workers 1, admission on, metering on (always), --upstream and --upstream-llm both the backend (separate pools), --upstream-keepalive $UPSTREAM_KEEPALIVE, access log off, its own --spool-dir; pass group: Redis prefix sluice: (every feature default_qps $PASS_QPS), reject group: prefix sluicerj: (default_qps $REJECT_QPS per feature); limit per (UID, feature, region); CPU = the sluice process (all its threads)"
}
describe_sluice_plain() { echo "sluice_plain: the same sluice with --admission off (no classification, no lookup, no limiter; still metered, under UID -); pass scenarios only"; }
start_sluice_nometer() {
  [[ $("$SLUICE_BIN" --help 2>&1 || true) == *--metering* ]] ||
    die "contender sluice_nometer needs a sluice with --metering ($SLUICE_BIN has none)"
  launch_sluice "$1" "$2" "$PROXY_CPUS" 1 --metering off
}
start_sluice_base() { LAUNCH_BIN=$BASE_BIN launch_sluice "$1" "$2" "$PROXY_CPUS" 1; }
describe_sluice_base() { echo "sluice_base: $BASE_BIN ($("$BASE_BIN" --version 2>&1 | sed -n 1p)) run exactly as sluice: two builds compared in the same run"; }
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
scenario_forward() {
  printf '%s\n' - "/?Action=TextModeration&AccessKeyId=AK00000" pass "$ACCOUNTS" "200" \
    "GET /?Action=TextModeration&AccessKeyId=AK00000 (the first bench's request, one account), admitted: all 200"
}
spec() { scenario_"$1" | sed -n "${2}p"; } # scenario line
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
scenario_lua() { # scenario: the scenario's wrk Lua (may be empty)
  local f
  f=$(spec "$1" 1)
  [[ $f == - ]] || cat "$here/lua/$f"
}

[[ -r $here/lua/api.lua && -r $here/lua/status.lua ]] || die "bench/lua/api.lua or status.lua missing"
for s in $SCENARIOS ${SCALE:+$SCALE_SCENARIO}; do
  declare -F "scenario_$s" >/dev/null || die "unknown scenario '$s' (known: $(declare -F | sed -n 's/^declare -f scenario_//p' | tr '\n' ' '))"
  { scenario_lua "$s"; echo; report_lua; } >"$tmp/$s.lua"
  { scenario_lua "$s"; echo; cat "$here/lua/status.lua"; } >"$tmp/$s-probe.lua"
done

# ---------------------------------------------------------------- one run
wrk_run() { # id scenario seconds outfile luafile
  local id=$1 s=$2 secs=$3 out=$4 lua=$5
  BENCH_LUA_DIR=$here/lua BENCH_ACCOUNTS=$(spec "$s" 4) \
    timeout -k 5 $((secs + 30)) taskset -c "$LOAD_CPUS" "$WRK_BIN" -t"$THREADS" -c"$CONNS" -d"${secs}s" \
    --timeout "$WRK_TIMEOUT" -s "$lua" "${inst_url[$id]}$(spec "$s" 2)" >"$out" 2>&1 ||
    { cat "$out" >&2; die "wrk failed against $id ($s)"; }
}

# probe id scenario: a run with the status-counting script (also the
# warm-up: sluice looks every account up once); checks the statuses.
probe() {
  local id=$1 s=$2 line allowed first total=0 main=0 kv code n out
  out=$tmp/probe-$s-${id//./-}.txt
  wrk_run "$id" "$s" "$((WARMUP > 0 ? WARMUP : 1))" "$out" "$tmp/$s-probe.lua"
  line=$(grep '^BENCH_STATUS' "$out") || { cat "$out" >&2; die "no status line from the probe of $id ($s)"; }
  allowed=" $(spec "$s" 5) "; first=$(spec "$s" 5 | cut -d' ' -f1)
  for kv in ${line#BENCH_STATUS}; do
    code=${kv%%=*}; n=${kv#*=}; total=$((total + n))
    [[ $allowed == *" $code "* ]] || die "$id answered HTTP $code ($n times) in scenario $s; allowed: $(spec "$s" 5) (probe: $line)"
    [[ $code == "$first" ]] && main=$n
  done
  ((total > 0 && 2 * main > total)) || die "$id: fewer than half the answers were $first in scenario $s ($line)"
  echo "$s ${id%%.*} ${line#BENCH_STATUS }" >>"$tmp/probes"
  log "probe $s $id: ${line#BENCH_STATUS }"
}

measure() { # label scenario round id [row-scenario]: one measured wrk run, appends to results
  local c=$1 s=$2 r=$3 id=$4 rs=${5:-$2} out pids t0 t1 c0 c1 b0 b1 line cpus=${inst_cpus[$4]}
  out=$tmp/wrk-${rs/:/-}-$c-$r.txt
  where="before round $r of $s against $id"
  check_alive "${!pid_name[@]}"
  pids=$(pids_of "$id")
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
  wrk_run "$id" "$s" "$DURATION" "$out" "$tmp/$s.lua"
  rt1=$(proc_ticks "$redis_pid")
  where="during round $r of $s against $id"
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
  local breq=-
  [[ $b0 =~ ^[0-9]+$ && $b1 =~ ^[0-9]+$ ]] && breq=$((b1 - b0))
  line=$(grep '^BENCH_RESULT' "$out") || { cat "$out" >&2; die "no result line from wrk against $id"; }
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
  echo "$rs $c $r $rps $p50 $p99 $cpu_us $requests $non2xx $serr $((t1 - t0)) $((c1 - c0)) $breq $other $cpus $(awk -v t=$((rt1 - rt0)) -v hz="$CLK_TCK" -v n="$requests" \
    'BEGIN {if (n > 0) printf "%.2f", t / hz * 1e6 / n; else print "nan"}')" >>"$tmp/results"
  log "$(printf 'round %d/%d %-7s %-12s %7s req/s  p50 %s ms  p99 %s ms  %s us CPU/req  non-2xx %s  socket errors %s  backend saw %s  other CPU ticks %s' \
    "$r" "$ROUNDS" "$s" "$c" "$rps" "$p50" "$p99" "$cpu_us" "$non2xx" "$serr" "$breq" "$other")"
  if (((non2xx > 0 && $(spec "$s" 5 | cut -d' ' -f1) == 200) || serr > 0)); then
    log "anomaly against $id ($s, round $r); wrk said:"
    grep -E 'Non-2xx|Socket errors|requests in' "$out" >&2 || true
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
dirty=$(git -C "$root" status --porcelain -- proxy limiter modstub 2>/dev/null | head -c1)
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
  echo "- CPU us/req = delta(utime+stime) of the proxy's processes from /proc/PID/stat over the wrk run (CLK_TCK=$CLK_TCK) / requests wrk completed"
} >"$tmp/header"
cat "$tmp/header" >&2

: >"$tmp/probes"
for s in $SCENARIOS; do
  for c in $CONTENDERS; do applies "$c" "$s" && probe "$c.$(spec "$s" 3)" "$s"; done
done

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
  echo
  echo "### Pass and reject paths"
  echo
  echo "Median over rounds. CPU vs best peer = CPU us/req / the lowest CPU us/req of nginx and haproxy in the same scenario (lower is better; sluice's target is <= 1.00); req/s vs best peer = req/s / the highest req/s of nginx and haproxy. redis CPU us/req: redis-server's CPU over the run / requests (sluice's lookups and metering; the other contenders do not use Redis; not charged to sluice, and it runs on the load CPU, so it takes CPU from wrk and the backend). non-2xx % is the share of answers that were not 2xx (429s on the reject path). Probe answers: statuses counted by bench/lua/status.lua in the ${WARMUP}s probe run before the rounds."
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
  echo "| scenario | contender | round | req/s | p50 ms | p99 ms | CPU us/req | requests | non-2xx | socket errors | proxy CPU ticks | busy ticks of proxy CPUs | backend requests | other CPU ticks | proxy CPUs | redis CPU us/req |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
  awk '{ line = "|"; for (i = 1; i <= 16; i++) line = line " " $i " |"; print line }' "$tmp/results"
  echo
  echo "Busy ticks of the proxy CPUs minus the proxy's own ticks = softirq (loopback TCP) plus anything else that ran there."
  echo "Other CPU ticks = busy ticks of all CPUs minus those of the proxies, backend, redis, wrk and this script's helpers:"
  echo "CPU used by processes this script did not start (a clean run has next to none; each CPU gives $CLK_TCK ticks a second);"
  echo "load average at start: $load_start; at end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  echo "</details>"
  if ((PERF > 0)) && [[ " $CONTENDERS " == *" sluice "* ]]; then perf_sluice "$PERF"; fi
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
if [[ $PLOT == 1 ]]; then
  plot "$base.png"
  printf '\nPlot: %s\n' "$base.png" >>"$tmp/report.md"
fi
{ echo "# scenario contender round rps p50_ms p99_ms cpu_us_per_req requests non2xx socket_errors proxy_ticks proxy_cpus_busy_ticks backend_requests other_ticks proxy_cpus redis_cpu_us_per_req"
  cat "$tmp/results"; } >"$base.tsv"
cat "$tmp/report.md"
cp "$tmp/report.md" "$OUTPUT"
log "report written to $OUTPUT (per-round data $base.tsv)"
