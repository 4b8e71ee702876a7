#!/usr/bin/env bash
# Installs the Debian 12 packages sluice needs to build, test, demo and
# benchmark. Idempotent: packages already present are not touched, and apt is
# only called when something is missing.
set -euo pipefail

# Usage: deps/install.sh [all|build|runtime]
#   build:   what compiling sluice needs (the Docker build stage uses this)
#   runtime: the shared libraries the binaries load (the Docker runtime stage)
#   all:     build + tests + demo + benchmarks (the default)
build=(build-essential cmake pkg-config libuv1-dev libhiredis-dev libjemalloc-dev libyaml-dev node-llhttp)
runtime=(libuv1 libhiredis0.14 libjemalloc2 libyaml-0-2)
tests=(libcmocka-dev redis-server redis-sentinel redis-tools python3 curl procps wrk nginx-light haproxy gnuplot-nox
       clang-14 libclang-rt-14-dev)
case "${1:-all}" in
  build) pkgs=("${build[@]}") ;;
  runtime) pkgs=("${runtime[@]}") ;;
  all) pkgs=("${build[@]}" "${tests[@]}") ;;
  *) echo "usage: deps/install.sh [all|build|runtime]" >&2; exit 2 ;;
esac

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$p")
done

if ((${#missing[@]})); then
  echo "deps: installing ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then
    echo "deps: missing packages and not root; run as root: apt-get install ${missing[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # The distro's redis/sentinel/nginx services are not ours: tests and the
  # demo start their own instances on loopback ports they choose. A
  # policy-rc.d that says 101 keeps apt from starting what it installs
  # (Docker images have one already; one made here is removed after).
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# deps/install.sh: no service starts while packages install\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    made_policy=1
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
  ((made_policy)) && rm -f "$policy" && trap - EXIT
  # Not started at the next boot either: a sentinel installed here would
  # bind 26379 and watch a 127.0.0.1:6379 nobody runs.
  if [[ " ${missing[*]} " == *" redis-sentinel "* ]] && [[ -d /run/systemd/system ]]; then
    systemctl disable --now redis-sentinel.service >/dev/null 2>&1 || true
  fi
fi
exit 0
