#!/usr/bin/env bash
# Builds the libFuzzer harnesses (tests/fuzz, clang-14, -DSLUICE_FUZZ=ON) in
# build-fuzz and runs them (docs/fuzzing.md).
#
#   bash scripts/fuzz.sh [RUNS | --time SECONDS] [--jobs N] [harness...]
#
# RUNS (default 20000): a short run, each harness for that many inputs from
# a fresh copy of its seed corpus with a fixed seed, after replaying every
# saved crash in tests/fuzz/regress/<harness>/; what scripts/test.sh runs.
# --time SECONDS: a long run of each harness with a random seed; the corpus
# grows in build-fuzz/fuzz-corpus/<harness> from one long run to the next.
# --jobs N: N fuzzing processes per harness (long runs).
# Crashes go to build-fuzz/fuzz-crashes/; logs to build-fuzz/fuzz-logs/.
# Exits non-zero when any harness crashed (or failed to build).
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD/tests/fuzz
dir=build-fuzz
runs=${FUZZ_RUNS:-20000}
time_s=
jobs=1
build=1
harnesses=()
while (($#)); do
  case $1 in
    --time) time_s=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --build-dir) dir=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    [0-9]*) runs=$1; shift ;;
    *) harnesses+=("$1"); shift ;;
  esac
done
((${#harnesses[@]})) || harnesses=(fuzz_classify fuzz_config fuzz_http_util fuzz_request fuzz_response fuzz_llhttp_request fuzz_llhttp_response fuzz_dir_reply fuzz_spool fuzz_flusher_reply fuzz_fleet_reply fuzz_cluster_reply)
dir=$(realpath -m "$dir")

if ((build)); then
  cc=${FUZZ_CC:-clang-14}
  command -v "$cc" >/dev/null || { echo "fuzz: $cc not found (apt-get install clang-14 libclang-rt-14-dev)" >&2; exit 1; }
  CC=$cc cmake -S . -B "$dir" -DSLUICE_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build "$dir" -j "$(nproc)" --target "${harnesses[@]}"
fi

export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
mkdir -p "$dir/fuzz-logs" "$dir/fuzz-crashes"
failed=()
for h in "${harnesses[@]}"; do
  bin=$dir/bin/$h
  [[ -x $bin ]] || { echo "fuzz: $bin not built" >&2; failed+=("$h"); continue; }
  log=$dir/fuzz-logs/$h${time_s:+.long}.log # a short run keeps the last long run's log
  opts=(-artifact_prefix="$dir/fuzz-crashes/$h-" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
  [[ -f $src/$h.dict ]] && opts+=(-dict="$src/$h.dict")
  regress=()
  if [[ -d $src/regress/$h ]]; then
    mapfile -t regress < <(find "$src/regress/$h" -type f | sort)
  fi
  t0=$SECONDS
  rc=0
  if ((${#regress[@]})); then # each file once: a fixed bug stays fixed
    "$bin" "${opts[@]}" "${regress[@]}" >"$log.regress" 2>&1 || { rc=$?; cat "$log.regress" >>"$log"; }
  fi
  if ((rc == 0)); then
    if [[ -n $time_s ]]; then
      work=$dir/fuzz-corpus/$h
      mkdir -p "$work"
      opts+=(-max_total_time="$time_s")
      ((jobs > 1)) && opts+=(-jobs="$jobs" -workers="$jobs")
    else
      work=$dir/fuzz-work/$h
      rm -rf "$work"
      mkdir -p "$work"
      opts+=(-runs="$runs" -seed="${FUZZ_SEED:-1}")
    fi
    # The first directory takes the new inputs; the seeds stay as they are.
    (cd "$dir/fuzz-logs" && "$bin" "${opts[@]}" "$work" "$src/corpus/$h") >"$log" 2>&1 || rc=$?
  fi
  if ((jobs > 1)) && [[ -n $time_s ]]; then cat "$dir"/fuzz-logs/fuzz-*.log >>"$log" 2>/dev/null || true; fi
  execs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | awk '{s += $2} END {print s + 0}')
  cov=$(grep -oE '(DONE|INITED|pulse|NEW|REDUCE) +cov: [0-9]+ ft: [0-9]+' "$log" | tail -1 | sed -E 's/.*(cov: [0-9]+ ft: [0-9]+)/\1/')
  if ((rc == 0)); then
    echo "fuzz: $h ok: $execs runs, ${cov:-cov: ?}, corpus $(find "$work" -type f | wc -l) new, $((SECONDS - t0)) s"
  else
    echo "fuzz: $h FAILED (exit $rc): see $log" >&2
    grep -E 'ERROR|SUMMARY|runtime error|Test unit written|artifact' "$log" | head -20 >&2 || true
    failed+=("$h")
  fi
done
if ((${#failed[@]})); then
  echo "fuzz: failed: ${failed[*]}" >&2
  exit 1
fi
