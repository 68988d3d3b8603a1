#!/usr/bin/env bash
# The main job: installs what is missing, builds fph (Release), starts fphd
# and a few fph-guest agents that write memory and free it, and prints how
# much of the freed memory the host got back, measured from the kernel
# (memfd st_blocks), plus the Prometheus metrics URL.
#
#   scripts/demo.sh                 # 3 guests of 512 MiB, each frees 400 MiB
#   GUESTS=5 MEMORY=1G FREE=900M scripts/demo.sh
#   scripts/demo.sh --keep          # leave fphd running for Prometheus/Grafana; Ctrl-C stops
set -euo pipefail
cd "$(dirname "$0")/.."

GUESTS=${GUESTS:-3}
MEMORY=${MEMORY:-512M}
FREE=${FREE:-400M}
RESIDENT=${RESIDENT:-32M}
METRICS=${METRICS:-127.0.0.1:9477}
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1

scripts/install-deps.sh
BUILD=${FPH_RELEASE_BUILD_DIR:-build/release}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFPH_BUILD_TESTS=OFF >/dev/null
cmake --build "$BUILD" -j "$(nproc)" --target fphd fph-guest

RUN=$(mktemp -d /tmp/fph-demo-XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -n "${FPHD_PID:-}" ] && kill "$FPHD_PID" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

# Bytes the kernel holds for a process's guest RAM memfds.
backing() {
  local pid=$1 total=0 fd target
  for fd in /proc/"$pid"/fd/*; do
    target=$(readlink "$fd" 2>/dev/null) || continue
    case "$target" in *memfd:fph-guest-ram*)
      total=$((total + $(stat -L -c %b "$fd") * 512)) ;;
    esac
  done
  echo "$total"
}
mib() { echo $(( $1 / 1048576 )); }

# fphd: one shared socket; if the metrics port is taken, any free port.
start_fphd() {
  "$BUILD"/daemon/fphd --listen "$RUN/fphd.sock" --metrics "$1" >"$RUN/fphd.out" 2>"$RUN/fphd.log" &
  FPHD_PID=$!
  for _ in $(seq 100); do
    grep -q '"event":"ready"' "$RUN/fphd.out" 2>/dev/null && return 0
    kill -0 "$FPHD_PID" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}
start_fphd "$METRICS" || start_fphd 127.0.0.1:0 || { cat "$RUN/fphd.log"; exit 1; }
URL=$(sed -n 's/.*"metrics":"\([^"]*\)".*/\1/p' "$RUN/fphd.out")
echo "fphd running (pid $FPHD_PID), metrics at $URL"

for i in $(seq 1 "$GUESTS"); do
  "$BUILD"/guestagent/fph-guest --connect "$RUN/fphd.sock" --name "guest$i" --memory "$MEMORY" \
    --resident "$RESIDENT" --workload "alloc-free:$FREE:3000" >"$RUN/guest$i.out" 2>"$RUN/guest$i.log" &
  pids+=($!)
done
echo "started $GUESTS guests of $MEMORY: each writes $FREE, holds it 3 s, frees it"

# Peak: while the workloads hold their memory.
declare -A peak
sleep 2
for i in $(seq 1 "$GUESTS"); do peak[$i]=$(backing "${pids[$((i-1))]}"); done
for i in $(seq 1 "$GUESTS"); do
  until grep -q workload_freed "$RUN/guest$i.out"; do sleep 0.2; done
done
echo "all guests freed their memory; Linux-style reporting runs every 2 s..."
start=$(date +%s)
# Wait until nothing more is reclaimed for 6 s (three reporting passes), at most 120 s.
last=-1; stable=0
while [ $(( $(date +%s) - start )) -lt 120 ] && [ $stable -lt 6 ]; do
  sum=0
  for p in "${pids[@]}"; do sum=$((sum + $(backing "$p"))); done
  if [ "$sum" = "$last" ]; then stable=$((stable + 1)); else stable=0; fi
  last=$sum
  sleep 1
done

printf '\n%-8s %10s %10s %12s %12s %10s\n' guest "RAM MiB" "freed MiB" "peak MiB" "now MiB" reclaimed
total_freed=0; total_back=0
for i in $(seq 1 "$GUESTS"); do
  p=${pids[$((i-1))]}
  now=$(backing "$p")
  freed=$(grep -m1 '"workload_freed"' "$RUN/guest$i.out" | sed 's/.*"bytes":\([0-9]*\).*/\1/')
  ram=$(grep -m1 '"event":"ready"' "$RUN/guest$i.out" | sed 's/.*"memory_bytes":\([0-9]*\).*/\1/')
  got=$(( peak[$i] - now ))
  printf '%-8s %10s %10s %12s %12s %9s%%\n' "guest$i" "$(mib "$ram")" \
    "$(mib "$freed")" "$(mib "${peak[$i]}")" "$(mib "$now")" "$(( got * 100 / freed ))"
  total_freed=$((total_freed + freed)); total_back=$((total_back + got))
done
echo "host got back $(mib $total_back) MiB of $(mib $total_freed) MiB freed by the guests (measured: memfd st_blocks)"
echo
echo "metrics: $URL"
curl -s "$URL" | grep -E '^fphd_(discarded_bytes_total|reclaimed_bytes_total|reported_bytes_total|requests_total\{.*outcome="discarded"|sessions )' || true

for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
bad=0
for i in $(seq 1 "$GUESTS"); do
  wait "${pids[$((i-1))]}" || bad=1
  grep -h '"event":"summary"' "$RUN/guest$i.out" | sed -n 's/.*"corrupted_bytes":\([0-9]*\).*/guest'"$i"' integrity: \1 corrupted bytes/p'
done
pids=()
if [ "$KEEP" = 1 ]; then
  echo "fphd keeps running at $URL (Ctrl-C to stop); logs in $RUN"
  wait "$FPHD_PID"
fi
[ $bad = 0 ] || { echo "a guest reported a failure; logs in $RUN"; exit 1; }
