#!/usr/bin/env bash
# Builds the libFuzzer targets with clang and runs each one, merging new
# coverage back into the repository corpus (docs/fuzzing.md).
#
#   scripts/fuzz.sh                      # all six targets, 10^7 runs each
#   RUNS=1000000 scripts/fuzz.sh         # fewer runs
#   scripts/fuzz.sh fuzz_session         # only some targets
#   MAX_TIME=600 scripts/fuzz.sh         # also stop each target after 600 s
#   JOBS=2 NICE=10 BUILD=build/fuzz scripts/fuzz.sh
#   SKIP_BUILD=1 scripts/fuzz.sh fuzz_admin   # run what $BUILD already holds
#   TIMEOUT=900 scripts/fuzz.sh          # per-input limit (s), e.g. when the run
#                                        # may be paused with SIGSTOP for a benchmark
#   FUZZ_FLAGS="-entropic=0" scripts/fuzz.sh  # more libFuzzer flags
#
# Per target: the build (cmake -DFPH_LIBFUZZER=ON, clang, into $BUILD), a run
# of -runs=$RUNS over a scratch copy of tests/fuzz/corpus/<target> (so the
# repository corpus only grows through the merge), then `-merge=1` of the
# scratch corpus into tests/fuzz/corpus/<target> (only inputs that add
# coverage; inputs capped at MAX_LEN bytes). Crash, leak and timeout
# artifacts go to $BUILD/artifacts/<target>/. Targets run one at a time,
# under nice. Prints per target: executions, exec/s, seconds, new corpus
# files, crashes. Exit status 1 if any target crashed.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${BUILD:-$ROOT/build/fuzz}
RUNS=${RUNS:-10000000}
MAX_TIME=${MAX_TIME:-0}
JOBS=${JOBS:-2}
NICE=${NICE:-10}
ALL=(fuzz_vhost_user fuzz_virtqueue fuzz_balloon_stats fuzz_device_state fuzz_admin fuzz_session)
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=("${ALL[@]}")

max_len() {
  case "$1" in
    fuzz_session) echo 1024 ;;      # programs of at most 96 steps
    fuzz_virtqueue) echo 16384 ;;   # ring header + guest memory image
    fuzz_device_state) echo 8192 ;;
    *) echo 4096 ;;
  esac
}
# Per-input time limit (s): the session target waits for replies and
# in-flight requests with bounded waits of up to 1 s.
timeout_for() {
  if [ -n "${TIMEOUT:-}" ]; then echo "$TIMEOUT"; elif [ "$1" = fuzz_session ]; then echo 30; else echo 10; fi
}

if [ "${SKIP_BUILD:-0}" = 1 ]; then
  echo "== not building (SKIP_BUILD=1): using $BUILD"
else
  echo "== build ($BUILD)"
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DFPH_LIBFUZZER=ON \
    -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_C_COMPILER=clang -DFPH_BUILD_BENCH=OFF >/dev/null
  nice -n "$NICE" cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]/%/_libfuzzer}"
fi

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
SUMMARY=()
failed=0
for t in "${TARGETS[@]}"; do
  bin="$BUILD/tests/fuzz/${t}_libfuzzer"
  corpus="$ROOT/tests/fuzz/corpus/$t"
  scratch="$BUILD/scratch/$t"
  artifacts="$BUILD/artifacts/$t"
  log="$BUILD/logs/$t.log"
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  rm -rf "$scratch" && mkdir -p "$scratch" && cp -a "$corpus/." "$scratch/"
  # Crashes, leaks, timeouts, OOMs; "slow-unit-*" files (an input that took
  # over 10 s once: under nice on a busy machine, scheduling) are not failures.
  count_crashes() { find "$artifacts" -type f ! -name 'slow-unit-*' | wc -l; }
  count_slow() { find "$artifacts" -type f -name 'slow-unit-*' | wc -l; }
  crashes_before=$(count_crashes)
  slow_before=$(count_slow)
  files_before=$(find "$corpus" -type f | wc -l)
  echo "== $t: $RUNS runs (log $log)"
  start=$(date +%s.%N)
  rc=0
  extra=()
  [ "$MAX_TIME" != 0 ] && extra+=(-max_total_time="$MAX_TIME")
  # Programs need length to get deep: do not let libFuzzer grow it slowly.
  [ "$t" = fuzz_session ] && extra+=(-len_control=0)
  # shellcheck disable=SC2206
  [ -n "${FUZZ_FLAGS:-}" ] && extra+=(${FUZZ_FLAGS})
  nice -n "$NICE" "$bin" "$scratch" -runs="$RUNS" -max_len="$(max_len "$t")" -timeout="$(timeout_for "$t")" \
    -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$artifacts/" "${extra[@]}" >"$log" 2>&1 || rc=$?
  end=$(date +%s.%N)
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", b - a }')
  execs=$(awk '/stat::number_of_executed_units:/ { v = $2 } END { print v + 0 }' "$log")
  rate=$(awk -v e="$execs" -v s="$secs" 'BEGIN { printf "%.0f", (s > 0 ? e / s : 0) }')
  # Merge what adds coverage into the repository corpus (small inputs only).
  nice -n "$NICE" "$bin" -merge=1 -max_len="$(max_len "$t")" -timeout="$(timeout_for "$t")" \
    "$corpus" "$scratch" >"$log.merge" 2>&1 || echo "   (merge failed, see $log.merge)"
  files_after=$(find "$corpus" -type f | wc -l)
  crashes=$(( $(count_crashes) - crashes_before ))
  slow=$(( $(count_slow) - slow_before ))
  [ "$rc" != 0 ] && [ "$crashes" = 0 ] && crashes="exit $rc"
  [ "$rc" != 0 ] && failed=1
  line=$(printf "%-20s executions %10s  exec/s %7s  seconds %6s  new corpus files %4s  crashes %s  slow units %s" \
    "$t" "$execs" "$rate" "$secs" "$((files_after - files_before))" "$crashes" "$slow")
  echo "   $line"
  SUMMARY+=("$line")
done
echo "== summary (artifacts in $BUILD/artifacts/)"
printf '%s\n' "${SUMMARY[@]}"
du -sh "$ROOT/tests/fuzz/corpus" | sed 's/^/corpus size: /'
exit $failed
