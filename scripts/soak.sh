#!/usr/bin/env bash
# Soak with adversarial guests (issue 11; docs/soak.md). NOT run in CI.
#
# One fphd; N honest fph-guests churning (allocate, write, verify, free, over
# and over, the integrity check on); M fph-hostile loops that connect,
# misbehave with one case of a catalogue, disconnect, repeat. Runs until the
# honest guests have reclaimed --target-gib in total (fphd's
# fphd_reclaimed_bytes_total, kernel-verified), sampling every second, then
# stops the hostile loops, checks fphd's RssAnon and fd count against the
# baseline taken before they started, stops the honest guests (each prints
# its integrity summary) and prints PASS or FAIL. Exit 0 = PASS.
#
#   scripts/soak.sh                          # 3 guests, 2 hostile loops, 100 GiB
#   scripts/soak.sh --target-gib 10 --guests 2 --hostile 4
#
# Options (defaults): --target-gib 100, --guests 3, --hostile 2,
#   --memory 128M (each guest's RAM), --churn 64M (what its churn holds at most),
#   --delay-ms 200 (page reporting delay), --max-minutes 60 (give up: FAIL),
#   --gap-bound 5 (seconds: longest allowed reclaim gap of an honest guest),
#   --rss-slack-mib 16, --fd-slack 2, --no-build, --keep (leave the run dir).
set -euo pipefail
cd "$(dirname "$0")/.."

TARGET_GIB=100 GUESTS=3 HOSTILE=2 MEMORY=128M CHURN=64M DELAY_MS=200 MAX_MIN=60
GAP_BOUND=5 RSS_SLACK_MIB=16 FD_SLACK=2 BUILD_IT=1 KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --target-gib) TARGET_GIB=$2; shift 2 ;;
    --guests) GUESTS=$2; shift 2 ;;
    --hostile) HOSTILE=$2; shift 2 ;;
    --memory) MEMORY=$2; shift 2 ;;
    --churn) CHURN=$2; shift 2 ;;
    --delay-ms) DELAY_MS=$2; shift 2 ;;
    --max-minutes) MAX_MIN=$2; shift 2 ;;
    --gap-bound) GAP_BOUND=$2; shift 2 ;;
    --rss-slack-mib) RSS_SLACK_MIB=$2; shift 2 ;;
    --fd-slack) FD_SLACK=$2; shift 2 ;;
    --no-build) BUILD_IT=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "soak: unknown option $1 (--help)" >&2; exit 2 ;;
  esac
done

BUILD=build/soak
if [ "$BUILD_IT" = 1 ]; then
  # Tests off: the soak needs none of them (and no GoogleTest).
  cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFPH_BUILD_BENCH=OFF \
    -DFPH_BUILD_TESTS=OFF >/dev/null
  cmake --build "$BUILD" -j "$(nproc)" --target fphd fph-guest fph-hostile fphctl
fi
FPHD=$BUILD/daemon/fphd GUEST=$BUILD/guestagent/fph-guest HOST=$BUILD/tools/hostile/fph-hostile
CTL=$BUILD/daemon/fphctl

RUN=$(mktemp -d /tmp/fph-soak-XXXXXX)
FPHD_PID="" gpids=() hpids=()
cleanup() {
  local p
  for p in "${hpids[@]}" "${gpids[@]}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done
  [ -n "$FPHD_PID" ] && kill "$FPHD_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  [ "$KEEP" = 1 ] || [ "${SOAK_FAILED:-0}" = 1 ] || rm -rf "$RUN"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
rss_kib() { awk '/^RssAnon:/ { print $2 }' "/proc/$FPHD_PID/status" 2>/dev/null || echo 0; }
fds() { ls "/proc/$FPHD_PID/fd" 2>/dev/null | wc -l; }
scrape() { curl -s --max-time 5 "$URL" >"$RUN/metrics.txt" 2>/dev/null || : >"$RUN/metrics.txt"; }
# Sum of a metric over its series whose labels match a regex (on the {...} part).
msum() { awk -v m="$1" -v re="$2" '
  index($0, m "{") == 1 { l = substr($0, length(m) + 1); sub(/ [^ ]*$/, "", l); if (l ~ re) s += $NF }
  $1 == m && re == "" { s += $2 }
  END { printf "%.0f", s }' "$RUN/metrics.txt"; }
gib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1073741824 }'; }

# --- fphd ---
# Backoff off: the honest guests churn on purpose (the soak counts reclaimed
# bytes and reclaim gaps); refault backoff would rightly hold their discards.
"$FPHD" --listen "$RUN/fphd.sock" --metrics 127.0.0.1:0 --admin-socket "$RUN/admin.sock" --backoff off \
  >"$RUN/fphd.out" 2>"$RUN/fphd.log" &
FPHD_PID=$!
for _ in $(seq 100); do
  grep -q '"event":"ready"' "$RUN/fphd.out" 2>/dev/null && break
  kill -0 "$FPHD_PID" 2>/dev/null || { cat "$RUN/fphd.log"; exit 1; }
  sleep 0.1
done
URL=$(sed -n 's/.*"metrics":"\([^"]*\)".*/\1/p' "$RUN/fphd.out")
[ -n "$URL" ] || { echo "soak: fphd did not get ready"; cat "$RUN/fphd.log"; exit 1; }
echo "soak: fphd pid $FPHD_PID, metrics $URL, run dir $RUN"

# --- honest guests ---
for i in $(seq 1 "$GUESTS"); do
  "$GUEST" --connect "$RUN/fphd.sock" --name "soak-g$i" --memory "$MEMORY" --resident 8M \
    --workload "churn:$CHURN:1000000" --reporting-delay-ms "$DELAY_MS" --seed "$i" \
    >"$RUN/g$i.out" 2>"$RUN/g$i.log" &
  gpids+=($!)
done
echo "soak: $GUESTS honest fph-guests of $MEMORY churning up to $CHURN each (reporting delay $DELAY_MS ms, integrity check on)"

# Baseline: every honest guest attached and reclaimed once, then 3 s to settle.
declare -A rec last_growth gap
t0=$(now)
while :; do
  scrape
  ok=1
  for i in $(seq 1 "$GUESTS"); do
    [ "$(msum fphd_reclaimed_bytes_total "vm=\"soak-g$i\"")" -gt 0 ] || ok=0
    kill -0 "${gpids[$((i - 1))]}" 2>/dev/null || { echo "soak: guest $i exited during setup"; cat "$RUN/g$i.log"; exit 1; }
  done
  [ $ok = 1 ] && break
  if awk -v e="$(elapsed "$t0")" 'BEGIN { exit !(e > 60) }'; then echo "soak: no reclaim after 60 s"; exit 1; fi
  sleep 0.5
done
sleep 3
BASE_RSS=$(rss_kib) BASE_FDS=$(fds)
echo "soak: baseline (honest guests attached, reclaiming): RssAnon $BASE_RSS KiB, $BASE_FDS fds"

# --- hostile loops ---
hseed=() hstarts=0
start_hostile() {  # $1: loop index (1-based), $2: seed
  "$HOST" --socket "$RUN/fphd.sock" --seed "$2" --name "hostile$1" >>"$RUN/h$1.out" 2>>"$RUN/h$1.log" &
  hpids[$(($1 - 1))]=$!
  hstarts=$((hstarts + 1))
}
for j in $(seq 1 "$HOSTILE"); do hseed[$j]=$((j * 7)); start_hostile "$j" "${hseed[$j]}"; done
echo "soak: $HOSTILE fph-hostile loops started; target $TARGET_GIB GiB reclaimed by the honest guests"

# --- run: sample every second ---
TARGET=$(awk -v g="$TARGET_GIB" 'BEGIN { printf "%.0f", g * 1073741824 }')
T_START=$(now)
for i in $(seq 1 "$GUESTS"); do rec[$i]=-1; last_growth[$i]=$T_START; gap[$i]=0; done
HOSTILE_DIED=0 GUEST_DIED=0 total=0 rss_trace="" next_mark=25
while :; do
  sleep 1
  scrape
  t=$(now)
  kill -0 "$FPHD_PID" 2>/dev/null || { echo "soak: fphd died"; break; }
  total=0
  for i in $(seq 1 "$GUESTS"); do
    r=$(msum fphd_reclaimed_bytes_total "vm=\"soak-g$i\"")
    total=$((total + r))
    # The gap: time since the sample at which the counter last grew (so
    # with 1 s sampling a guest reclaiming all the time shows ~1 s).
    g=$(awk -v a="${last_growth[$i]}" -v b="$t" 'BEGIN { printf "%.1f", b - a }')
    awk -v g="$g" -v m="${gap[$i]}" 'BEGIN { exit !(g > m) }' && gap[$i]=$g
    if [ "$r" -gt "${rec[$i]}" ]; then rec[$i]=$r; last_growth[$i]=$t; fi
    kill -0 "${gpids[$((i - 1))]}" 2>/dev/null || { [ "$GUEST_DIED" = 1 ] || echo "soak: honest guest $i exited"; GUEST_DIED=1; }
  done
  for j in $(seq 1 "$HOSTILE"); do
    if ! kill -0 "${hpids[$((j - 1))]}" 2>/dev/null; then
      wait "${hpids[$((j - 1))]}" || { echo "soak: fph-hostile $j exited with $?; restarting"; HOSTILE_DIED=$((HOSTILE_DIED + 1)); }
      hseed[$j]=$((hseed[$j] + 1000)); start_hostile "$j" "${hseed[$j]}"
    fi
  done
  [ "$GUEST_DIED" = 1 ] && break
  pct=$((total * 100 / TARGET))
  if [ "$pct" -ge "$next_mark" ] && [ "$next_mark" -le 75 ]; then
    rss_trace+="${rss_trace:+, }$next_mark%: $(rss_kib) KiB/$(fds) fds"
    echo "soak: $(gib "$total") GiB reclaimed after $(elapsed "$T_START") s (RssAnon $(rss_kib) KiB, $(fds) fds, sessions opened $(msum fphd_sessions_opened_total ""))"
    next_mark=$((next_mark + 25))
  fi
  [ "$total" -ge "$TARGET" ] && break
  awk -v e="$(elapsed "$T_START")" -v m="$MAX_MIN" 'BEGIN { exit !(e > m * 60) }' && { echo "soak: --max-minutes $MAX_MIN reached"; break; }
done
DURATION=$(elapsed "$T_START")
TOTAL=$total

# --- stop the hostile loops, let fphd tear their sessions down ---
for p in "${hpids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
for p in "${hpids[@]}"; do wait "$p" 2>/dev/null || true; done
hpids=()
for _ in $(seq 20); do
  scrape
  [ "$(msum fphd_sessions "")" -le "$GUESTS" ] && break
  sleep 0.5
done
sleep 3
scrape
END_RSS=$(rss_kib) END_FDS=$(fds)
FPHD_ALIVE=no
kill -0 "$FPHD_PID" 2>/dev/null && FPHD_ALIVE=yes
OPENED=$(msum fphd_sessions_opened_total "") LIVE=$(msum fphd_sessions "")
cp "$RUN/metrics.txt" "$RUN/metrics.end.txt"

# --- stop the honest guests: each prints its integrity summary ---
for p in "${gpids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
declare -A grc
for i in $(seq 1 "$GUESTS"); do
  grc[$i]=0
  wait "${gpids[$((i - 1))]}" || grc[$i]=$?
done
gpids=()

# --- figures ---
echo
echo "=== soak: fphd + $GUESTS honest fph-guests ($MEMORY, churn $CHURN, delay $DELAY_MS ms) + $HOSTILE fph-hostile loops ==="
echo "duration            $DURATION s"
echo "total reclaimed     $(gib "$TOTAL") GiB (honest guests, fphd_reclaimed_bytes_total; target $TARGET_GIB GiB)"
echo "reclaim rate        $(awk -v b="$TOTAL" -v s="$DURATION" 'BEGIN { printf "%.1f MiB/s, %.2f GiB/min", b / s / 1048576, b / s * 60 / 1073741824 }')"
echo
echo "hostile connections by case (sum over $HOSTILE loops, $hstarts starts, $HOSTILE_DIED abnormal exits):"
cat "$RUN"/h*.out | awk '
  $1 == "case" { next }
  NF == 7 && $2 ~ /^[0-9]+$/ { if (!($1 in r)) o[n++] = $1; r[$1] += $2; nf[$1] += $3; ns[$1] += $4; na[$1] += $5; c[$1] += $6; s[$1] += $7 }
  END {
    printf "  %-24s %8s %8s %8s %8s %8s\n", "case", "conns", "nacked", "closed", "served", "nosetup"
    for (i = 0; i < n; i++) { k = o[i]; t += r[k]
      printf "  %-24s %8d %8d %8d %8d %8d\n", k, r[k], na[k], c[k], s[k], ns[k] }
    printf "  %-24s %8d\n", "total", t }'
echo
echo "fphd protocol errors by reason (fphd_protocol_errors_total, all VMs):"
awk 'index($0, "fphd_protocol_errors_total{") == 1 {
    match($0, /reason="[^"]*"/); r = substr($0, RSTART + 8, RLENGTH - 9); s[r] += $NF }
  END { for (r in s) printf "  %-36s %d\n", r, s[r] }' "$RUN/metrics.end.txt" | sort
echo
echo "sessions            opened $OPENED, closed $((OPENED - LIVE)), live at the end $LIVE"
echo "fphd alive          $FPHD_ALIVE"
echo "fphd RssAnon        baseline $BASE_RSS KiB, end $END_RSS KiB (during: ${rss_trace:-n/a}); slack $RSS_SLACK_MIB MiB"
echo "fphd RssAnon growth $(awk -v a="$BASE_RSS" -v b="$END_RSS" -v n="$((OPENED - LIVE))" 'BEGIN { printf "%.1f KiB per closed session (%d KiB over %d)", n ? (b - a) / n : 0, b - a, n }')"
echo "fphd fds            baseline $BASE_FDS, end $END_FDS; slack $FD_SLACK"
# The log a hostile front end costs (each session's lines are budgeted:
# log.h LineBudget; the counters above count every event).
LOG_LINES=$(wc -l <"$RUN/fphd.log") LOG_KIB=$(( $(stat -c %s "$RUN/fphd.log") / 1024 ))
HELD=$(awk 'match($0, /disconnected \([0-9]+ of its log lines were held back/) {
    split(substr($0, RSTART, RLENGTH), w, " "); s += substr(w[2], 2) } END { print s + 0 }' "$RUN/fphd.log")
echo "fphd log            $LOG_LINES lines, $LOG_KIB KiB ($(awk -v l="$LOG_LINES" -v n="$OPENED" 'BEGIN { printf "%.1f", n ? l / n : 0 }') lines per session); $HELD lines held back by the per-VM budgets"
echo
printf '%-10s %14s %16s %18s %18s %10s\n' guest "reclaimed GiB" "corrupted bytes" "reported nonzero B" "longest gap (s)" "exit"
fail=()
for i in $(seq 1 "$GUESTS"); do
  s=$(grep -h '"event":"summary"' "$RUN/g$i.out" | tail -1 || true)
  cb=$(sed -n 's/.*"corrupted_bytes":\([0-9]*\).*/\1/p' <<<"$s"); cb=${cb:-missing}
  nz=$(sed -n 's/.*"reported_nonzero_bytes":\([0-9]*\).*/\1/p' <<<"$s"); nz=${nz:-missing}
  printf '%-10s %14s %16s %18s %18s %10s\n' "soak-g$i" "$(gib "${rec[$i]}")" "$cb" "$nz" "${gap[$i]}" "${grc[$i]}"
  [ "$cb" = 0 ] || fail+=("soak-g$i corrupted bytes $cb")
  [ "$nz" = 0 ] || fail+=("soak-g$i reported pages not reading zero: $nz bytes")
  [ "${grc[$i]}" = 0 ] || fail+=("soak-g$i exited ${grc[$i]}")
  awk -v g="${gap[$i]}" -v b="$GAP_BOUND" 'BEGIN { exit !(g > b) }' && fail+=("soak-g$i reclaim gap ${gap[$i]} s > $GAP_BOUND s")
done
echo
[ "$FPHD_ALIVE" = yes ] || fail+=("fphd died")
[ "$GUEST_DIED" = 0 ] || fail+=("an honest guest exited during the run")
[ "$TOTAL" -ge "$TARGET" ] || fail+=("target not reached: $(gib "$TOTAL") of $TARGET_GIB GiB")
[ "$END_FDS" -le $((BASE_FDS + FD_SLACK)) ] || fail+=("fds $END_FDS > baseline $BASE_FDS + $FD_SLACK")
[ "$END_RSS" -le $((BASE_RSS + RSS_SLACK_MIB * 1024)) ] || fail+=("RssAnon $END_RSS KiB > baseline $BASE_RSS KiB + $RSS_SLACK_MIB MiB")
crit="fphd alive; corrupted = 0 and reported-nonzero = 0 for every honest guest; fds <= baseline + $FD_SLACK; RssAnon <= baseline + $RSS_SLACK_MIB MiB; reclaim gap <= $GAP_BOUND s"
if [ ${#fail[@]} = 0 ]; then
  echo "PASS ($crit)"
  # fphd exits 0 on SIGTERM after returning every taken request.
  kill -TERM "$FPHD_PID"; wait "$FPHD_PID" || echo "note: fphd exited $? on SIGTERM"
  FPHD_PID=""
  exit 0
fi
SOAK_FAILED=1
echo "FAIL ($crit):"
for f in "${fail[@]}"; do echo "  - $f"; done
echo "logs in $RUN (fphd.log, g*.out/log, h*.out/log, metrics.end.txt)"
exit 1
