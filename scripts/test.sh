#!/usr/bin/env bash
# The test command: installs what is missing, builds everything with
# AddressSanitizer + UndefinedBehaviorSanitizer, and runs the whole suite
# (unit tests, fuzz drivers, integration tests with real processes).
#   scripts/test.sh            # everything
#   scripts/test.sh -L unit    # extra arguments go to ctest
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
BUILD=${FPH_TEST_BUILD_DIR:-build/test}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFPH_SANITIZE=ON -DFPH_BUILD_BENCH=ON
cmake --build "$BUILD" -j "$(nproc)"

# ASan: fail on leaks in our own code but not on the libraries' one-time
# allocations; keep going after the first UBSan report is not allowed.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
cd "$BUILD"
ctest --output-on-failure --timeout 900 -j 2 "$@"
