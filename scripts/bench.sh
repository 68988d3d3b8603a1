#!/usr/bin/env bash
# The benchmark command: installs what is missing, builds a Release tree
# (no sanitizers, no tests) and runs fph-bench. Extra arguments go to
# fph-bench, e.g.
#   scripts/bench.sh                          # full: 4 GiB, 1/4/16 guests, shmem + hugetlb, 3 repetitions
#   scripts/bench.sh --quick --guests=1,4     # smoke run
#   scripts/bench.sh --benchmark_format=json --benchmark_out=bench.json
# Needs root for the hugetlb scenarios (it reserves huge pages through
# /proc/sys/vm/nr_hugepages and restores the old value at the end).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
BUILD=${FPH_BENCH_BUILD_DIR:-build/release}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFPH_BUILD_TESTS=OFF -DFPH_SANITIZE=OFF
cmake --build "$BUILD" -j "$(nproc)" --target fph-bench fphd fph-guest
exec "$BUILD/bench/fph-bench" "$@"
