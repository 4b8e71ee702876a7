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
tests=(libcmocka-dev redis-server redis-tools python3 curl procps wrk nginx-light haproxy gnuplot-nox
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
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The distro's redis/nginx services are not ours: tests and the demo start
# their own instances on loopback ports they choose.
exit 0
