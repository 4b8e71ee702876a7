#!/usr/bin/env bash
# The test command: installs what is missing, builds release and
# ASan+UBSan trees, runs the whole CTest suite on both, then the tests
# labelled `tsan` under ThreadSanitizer (the limiter's and lookup ring's
# concurrency tests, and the proxy, admission and metering integration
# tests, which drive every thread sluice runs), then short fuzz runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deps/install.sh
jobs=$(nproc)

# Each phase says how long it took (the whole suite should stay near 12
# minutes on a 2-core machine).
phase_start=$SECONDS
phase() { echo "=== $1 (previous phase: $((SECONDS - phase_start)) s, total ${SECONDS} s)"; phase_start=$SECONDS; }

run_tree() { # dir sanitize label-filter
  local dir=$1 san=$2; shift 2
  phase "build $dir (sanitizers: ${san:-none})"
  cmake -S . -B "$dir" -DSLUICE_SANITIZE="$san" -DCMAKE_BUILD_TYPE="$([[ -n $san ]] && echo RelWithDebInfo || echo Release)" >/dev/null
  cmake --build "$dir" -j "$jobs"
  phase "test $dir"
  # -j: the light tests in parallel; the busy ones alone (RUN_SERIAL,
  # tests/integration/CMakeLists.txt)
  ctest --test-dir "$dir" --output-on-failure --timeout 300 -j "$jobs" "$@"
}

run_tree build ""
# All but the three-instance global limits test (a minute of fixed 10 s
# windows): its code runs under ASan in unit_fleet, fuzz_fleet_reply and
# every admission test; the suite stays near 12 minutes on 2 cores. Some
# cases skip themselves on the sanitizer trees (harness.release_only, each
# saying which cases run its paths there).
run_tree build-asan "address,undefined" -E '^global$'
run_tree build-tsan "thread" -L tsan

# The libFuzzer harnesses (clang-14, build-fuzz), each for a short fixed
# number of runs with a fixed seed after replaying tests/fuzz/regress/
# (docs/fuzzing.md says how to run them long).
phase "fuzz"
bash scripts/fuzz.sh 20000
phase "done"
