#!/usr/bin/env bash
# The main job: installs what is missing, builds fph (Release), starts fphd
# and a few fph-guest agents that write memory and free it, and prints how
# much of the freed memory the host got back, measured from the kernel
# (memfd st_blocks), plus the Prometheus metrics URL and `fphctl sessions`
# (what each VM got back, as fphd counts it).
#
#   scripts/demo.sh                 # 3 guests of 512 MiB, each frees 400 MiB
#   GUESTS=5 MEMORY=1G FREE=900M scripts/demo.sh
#   scripts/demo.sh --keep          # leave fphd running for Prometheus/Grafana; Ctrl-C stops
#
# Real Linux guests: GUESTS_KIND=linux boots GUESTS user-mode Linux kernels
# (scripts/linux-guest.sh, docs/linux-guests.md) whose stock virtio_balloon
# driver reports to fphd; fph-linux-workload in each writes RESIDENT+FREE,
# frees FREE, then reallocates and verifies every page it kept. Same table,
# measured from the st_blocks of each guest's RAM file (/proc/PID/fd), plus
# each guest's own verifier and `fphctl sessions`.
#   GUESTS_KIND=linux scripts/demo.sh              # 3 guests of 512 MiB, each frees 256 MiB
#   GUESTS_KIND=linux GUESTS=2 FREE=384M scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# The real-Linux mode: UML guests against fphd. Runs and exits; the
# fph-guest mode below is untouched.
# fphd on one shared socket $RUN/fphd.sock, metrics on $1 (the caller retries
# with port 0 if that port is taken), any further arguments passed on; waits
# for its ready line. Sets FPHD_PID.
start_fphd() {
  local metrics=$1
  shift
  "$BUILD"/daemon/fphd --listen "$RUN/fphd.sock" --metrics "$metrics" "$@" \
    >"$RUN/fphd.out" 2>"$RUN/fphd.log" &
  FPHD_PID=$!
  for _ in $(seq 100); do
    grep -q '"event":"ready"' "$RUN/fphd.out" 2>/dev/null && return 0
    kill -0 "$FPHD_PID" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

linux_demo() {
  GUESTS=${GUESTS:-3}
  MEMORY=${MEMORY:-512M}
  FREE=${FREE:-256M}  # UML writes guest memory at ~30-50 MiB/s: this takes about a minute
  RESIDENT=${RESIDENT:-32M}
  METRICS=${METRICS:-127.0.0.1:9477}
  KEEP=0
  [ "${1:-}" = "--keep" ] && KEEP=1
  to_mib() {
    case "$1" in
      *[Gg]) echo $(( ${1%[Gg]} * 1024 )) ;;
      *[Mm]) echo "${1%[Mm]}" ;;
      *[0-9]) echo $(( $1 / 1048576 )) ;;
      *) echo "demo: cannot read size '$1' (use e.g. 256M or 1G)" >&2; exit 2 ;;
    esac
  }
  local free_mib keep_mib mem_mib
  free_mib=$(to_mib "$FREE"); keep_mib=$(to_mib "$RESIDENT"); mem_mib=$(to_mib "$MEMORY")

  scripts/install-deps.sh
  BUILD=${FPH_RELEASE_BUILD_DIR:-build/release}
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFPH_BUILD_TESTS=OFF >/dev/null
  cmake --build "$BUILD" -j "$(nproc)" --target fphd fphctl fph-linux-workload

  RUN=$(mktemp -d /tmp/fph-demo-XXXXXX)
  gpid=() gbg=() gtmp=() gfd=()
  cleanup_linux() {
    local p
    # UML ignores SIGTERM and forks helpers: SIGKILL each guest's process group.
    for p in "${gpid[@]}" "${gbg[@]}"; do [ -n "$p" ] && kill -KILL -- "-$p" "$p" 2>/dev/null || true; done
    [ -n "${FPHD_PID:-}" ] && kill "$FPHD_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    for p in "${gtmp[@]}"; do rm -rf "$p"; done
    rm -rf "$RUN/root"  # the guest root (busybox, module, workload); consoles and logs stay
  }
  trap cleanup_linux EXIT
  trap 'exit 130' INT TERM

  start_fphd "$METRICS" --admin-socket "$RUN/admin.sock" ||
    start_fphd 127.0.0.1:0 --admin-socket "$RUN/admin.sock" || { cat "$RUN/fphd.log"; exit 1; }
  URL=$(sed -n 's/.*"metrics":"\([^"]*\)".*/\1/p' "$RUN/fphd.out")
  echo "fphd running (pid $FPHD_PID), metrics at $URL"

  scripts/linux-guest.sh build "$RUN/root" --workload "$BUILD/linuxguest/fph-linux-workload" 2>/dev/null

  # First "FPH EVENT ..." line of guest I's console matching PATTERN (a regex
  # on the rest of the line), waiting up to T seconds.
  marker() {
    local i=$1 pat=$2 t=$3 line
    for _ in $(seq $((t * 5))); do
      line=$(grep -m1 -E "FPH $pat" "$RUN/guest$i.console" 2>/dev/null) && { echo "${line%$'\r'}"; return 0; }
      sleep 0.2
    done
    echo "demo: guest$i: no 'FPH $pat' after $t s; console $RUN/guest$i.console:" >&2
    tail -n 30 "$RUN/guest$i.console" >&2
    return 1
  }
  word() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }
  send() { echo >&"${gfd[$(($1 - 1))]}"; }
  ram() { scripts/linux-guest.sh ram "${gpid[$(($1 - 1))]}" 2>/dev/null || echo 0; }
  mib() { echo $(( $1 / 1048576 )); }

  local i fd tmp
  for i in $(seq 1 "$GUESTS"); do
    tmp=$(mktemp -d /dev/shm/fph-demo-guest"$i".XXXXXX)
    gtmp+=("$tmp")
    mkfifo "$RUN/guest$i.in"
    exec {fd}<>"$RUN/guest$i.in"  # the guest's console input, held open by the demo
    gfd+=("$fd")
    # Its own process group (the script execs UML: pid == group), so the
    # guest and its helpers can be SIGKILLed together.
    setsid scripts/linux-guest.sh boot --socket "$RUN/fphd.sock" --rootdir "$RUN/root" --mem "$MEMORY" \
      --tmpdir "$tmp" -- "--total=$((free_mib + keep_mib))" "--keep=$keep_mib" "--realloc=$keep_mib" \
      "--seed=$i" --wait-stdin <"$RUN/guest$i.in" >"$RUN/guest$i.console" 2>&1 &
    gbg+=("$!")
  done
  for i in $(seq 1 "$GUESTS"); do
    gpid[$((i - 1))]=$(word pid "$(marker "$i" 'uml ' 30)")
  done
  echo "booted $GUESTS Linux guests (user-mode Linux $(ls /usr/lib/uml/modules 2>/dev/null | head -1)) of $MEMORY: each writes $((free_mib + keep_mib)) MiB, frees $free_mib MiB"
  local names=""
  for i in $(seq 1 "$GUESTS"); do names+="${names:+, }guest$i = linux.uml-${gpid[$((i - 1))]}"; done
  echo "fphd's VM names (metrics, fphctl): $names"
  local b
  for i in $(seq 1 "$GUESTS"); do
    b=$(marker "$i" 'balloon ' 120)
    [ "$(word bound "$b")" = 1 ] || { echo "demo: guest$i: virtio_balloon did not bind: $b"; exit 1; }
  done
  echo "virtio_balloon bound in every guest; the workloads write their memory (slow in UML)..."

  # Peak: while the workloads hold their memory.
  declare -A peak freed
  for i in $(seq 1 "$GUESTS"); do marker "$i" 'waiting phase=allocated' 900 >/dev/null; done
  for i in $(seq 1 "$GUESTS"); do peak[$i]=$(ram "$i"); done
  for i in $(seq 1 "$GUESTS"); do send "$i"; done
  for i in $(seq 1 "$GUESTS"); do freed[$i]=$(word bytes "$(marker "$i" 'freed ' 120)"); done
  echo "all guests freed their memory; the Linux driver reports every 2 s..."
  local start last=-1 stable=0 sum
  start=$(date +%s)
  # Wait until nothing more is reclaimed for 6 s (three reporting passes), at most 120 s.
  while [ $(( $(date +%s) - start )) -lt 120 ] && [ $stable -lt 6 ]; do
    sum=0
    for i in $(seq 1 "$GUESTS"); do sum=$((sum + $(ram "$i"))); done
    if [ "$sum" = "$last" ]; then stable=$((stable + 1)); else stable=0; fi
    last=$sum
    sleep 1
  done

  printf '\n%-8s %10s %10s %12s %12s %10s\n' guest "RAM MiB" "freed MiB" "peak MiB" "now MiB" reclaimed
  local total_freed=0 total_back=0 now got
  for i in $(seq 1 "$GUESTS"); do
    now=$(ram "$i")
    got=$(( peak[$i] - now ))
    printf '%-8s %10s %10s %12s %12s %9s%%\n' "guest$i" "$mem_mib" \
      "$(mib "${freed[$i]}")" "$(mib "${peak[$i]}")" "$(mib "$now")" "$(( got * 100 / freed[$i] ))"
    total_freed=$((total_freed + freed[$i])); total_back=$((total_back + got))
  done
  echo "host got back $(mib $total_back) MiB of $(mib $total_freed) MiB freed by the Linux guests (measured: RAM file st_blocks)"
  echo
  echo "metrics: $URL"
  curl -s "$URL" | grep -E '^fphd_(discarded_bytes_total|reclaimed_bytes_total|reported_bytes_total|requests_total\{.*outcome="discarded"|sessions )' || true
  echo
  echo "fphctl sessions:"
  "$BUILD"/daemon/fphctl --socket "$RUN/admin.sock" sessions || true

  # Each workload verifies what it kept, reallocates, verifies everything it owns.
  echo
  local bad=0 v1 v2 done_line probs
  for i in $(seq 1 "$GUESTS"); do send "$i"; done
  for i in $(seq 1 "$GUESTS"); do marker "$i" 'waiting phase=reallocated' 300 >/dev/null && send "$i" || bad=1; done
  for i in $(seq 1 "$GUESTS"); do
    v1=$(marker "$i" 'verify phase=freed' 300) || { bad=1; continue; }
    v2=$(marker "$i" 'verify phase=final' 300) || { bad=1; continue; }
    done_line=$(marker "$i" 'done ' 60) || { bad=1; continue; }
    probs=$(word count "$(marker "$i" 'dmesg_problems ' 60)")
    probs=${probs:-unknown}
    echo "guest$i integrity: $(( $(word corrupted_pages "$v1") + $(word corrupted_pages "$v2") )) corrupted pages" \
      "(guest's own verifier: kept $(word checked_pages "$v1") pages after the free, all $(word checked_pages "$v2") at the end;" \
      "workload $(word status "$done_line"); kernel problem lines: $probs)"
    [ "$(word status "$done_line")" = ok ] && [ "$probs" = 0 ] || bad=1
  done
  for i in $(seq 1 "$GUESTS"); do marker "$i" 'halt' 60 >/dev/null || true; done
  for i in $(seq 1 "$GUESTS"); do kill -KILL -- "-${gpid[$((i - 1))]}" 2>/dev/null || true; done
  if [ "$KEEP" = 1 ]; then
    echo "fphd keeps running at $URL (Ctrl-C to stop); logs in $RUN"
    wait "$FPHD_PID"
  fi
  [ $bad = 0 ] || { echo "a guest reported a failure; consoles in $RUN"; exit 1; }
}
if [ "${GUESTS_KIND:-fph-guest}" = linux ]; then
  linux_demo "$@"
  exit 0
elif [ "${GUESTS_KIND:-fph-guest}" != fph-guest ]; then
  echo "demo: GUESTS_KIND is fph-guest (default) or linux" >&2
  exit 2
fi

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
cmake --build "$BUILD" -j "$(nproc)" --target fphd fphctl fph-guest

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

start_fphd "$METRICS" --admin-socket "$RUN/admin.sock" ||
  start_fphd 127.0.0.1:0 --admin-socket "$RUN/admin.sock" || { cat "$RUN/fphd.log"; exit 1; }
URL=$(sed -n 's/.*"metrics":"\([^"]*\)".*/\1/p' "$RUN/fphd.out")
echo "fphd running (pid $FPHD_PID), metrics at $URL, admin socket $RUN/admin.sock"

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
# What each VM got back, as fphd counts it (the same counters as the metrics):
# reclaimed is kernel-verified, headroom is what a guest calls free and the
# host still backs (stats queue). Live: fphctl -s "$RUN/admin.sock" top
echo
echo "fphctl sessions:"
"$BUILD"/daemon/fphctl --socket "$RUN/admin.sock" sessions || true

for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
bad=0
for i in $(seq 1 "$GUESTS"); do
  wait "${pids[$((i-1))]}" || bad=1
  grep -h '"event":"summary"' "$RUN/guest$i.out" | sed -n 's/.*"corrupted_bytes":\([0-9]*\).*/guest'"$i"' integrity: \1 corrupted bytes/p'
done
pids=()
if [ "$KEEP" = 1 ]; then
  echo "fphd keeps running at $URL (Ctrl-C to stop); logs in $RUN"
  echo "  $BUILD/daemon/fphctl --socket $RUN/admin.sock top    # per VM, refreshed"
  wait "$FPHD_PID"
fi
[ $bad = 0 ] || { echo "a guest reported a failure; logs in $RUN"; exit 1; }
