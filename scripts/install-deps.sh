#!/usr/bin/env bash
# Installs what fph needs to build, test and benchmark, from Debian 12's
# packages. Idempotent: apt-get skips what is already there. Needs root (or sudo).
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libtbb-dev libtbbbind-2-5 libhwloc-dev hwloc libnuma-dev
  prometheus-cpp-dev nlohmann-json3-dev libcli11-dev libfmt-dev
  libtomlplusplus-dev libsystemd-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  clang
  curl python3 python3-yaml
  prometheus
  gnuplot-nox
  user-mode-linux busybox-static
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
