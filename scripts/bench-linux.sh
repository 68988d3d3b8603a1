#!/usr/bin/env bash
# Reclaim latency and fphd CPU with real Linux guests (user-mode Linux):
# installs what is missing, builds a Release tree, runs bench/linux_bench.py.
# Time from each workload's free until 50% / 90% of the freed memory is back
# (guest RAM file st_blocks sampled every 50 ms), fphd CPU per GiB reclaimed,
# medians over repetitions. Results: docs/bench-linux.md. Extra arguments go
# to the python script, e.g.
#   scripts/bench-linux.sh                         # 1 and 4 guests, 3 repetitions
#   scripts/bench-linux.sh --guests=1 --reps=1     # smoke run
#   scripts/bench-linux.sh --reps=5 --json=bench-linux.json
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
BUILD=${FPH_BENCH_BUILD_DIR:-build/release}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFPH_BUILD_TESTS=OFF -DFPH_SANITIZE=OFF >/dev/null
cmake --build "$BUILD" -j "$(nproc)" --target fphd fph-linux-workload
exec python3 bench/linux_bench.py --build "$BUILD" "$@"
