#!/usr/bin/env bash
# Real Linux guests for fphd: user-mode Linux (a Linux 6.1 kernel that runs as
# an ordinary process, Debian package user-mode-linux) whose in-kernel
# vhost-user front end (virtio_uml) gives the stock virtio_balloon driver a
# balloon device served by fphd. docs/linux-guests.md has the details.
#
#   scripts/linux-guest.sh build ROOTDIR [--workload PATH]
#       Builds a guest root directory (the guest mounts it as its root over
#       hostfs): static busybox and its applet links, /init, the
#       virtio_balloon.ko of the installed UML kernel, fph-linux-workload.
#       Nothing in it is written by a running guest, so many guests can
#       share one ROOTDIR.
#
#   scripts/linux-guest.sh boot --socket SOCK [--rootdir ROOTDIR] [--mem 512M]
#           [--tmpdir DIR] [--no-balloon] [--kernel-arg ARG]... [--shell]
#           [--workload PATH] [-- WORKLOAD-ARGS...]
#       Boots one guest whose balloon device is the vhost-user back end
#       listening on SOCK (fphd --listen or --vm; UML connects as a client,
#       so fphd must be listening first). The guest's console is this
#       process's stdin and stdout. /init loads virtio_balloon (unless
#       --no-balloon), runs fph-linux-workload WORKLOAD-ARGS, prints its
#       markers, the kernel's problem lines, and halts: the process exits.
#       Without --rootdir, a root is built in a temporary directory.
#       --kernel-arg adds a word to the kernel command line (e.g.
#       page_reporting.page_reporting_order=9). --shell leaves a shell on
#       the console instead of halting. Guest RAM is a file UML creates and
#       unlinks in --tmpdir (default: a new directory under /dev/shm, removed
#       at exit); with --tmpdir the script execs UML, so its pid is this
#       process's pid and the caller removes DIR.
#
#   scripts/linux-guest.sh ram PID
#       Bytes the host kernel holds for the RAM of the UML guest whose main
#       process is PID: st_blocks * 512 of its deleted RAM file in $TMPDIR,
#       found through /proc/PID/fd.
#
# Console output, one event per line (key=value words; a "text=" word is
# always last and takes the rest of the line):
#   FPH uml pid=N tmpdir=DIR                       (from this script, before boot)
#   FPH init kernel=VERSION balloon=0|1 args=...    (from /init)
#   FPH balloon loaded=1 bound=0|1 page_reporting_order=N driver_order=N cmdline_order=N|none
#   FPH <workload events>                           (fph-linux-workload: start,
#        allocated, waiting/holding/resumed, freed, verify, reallocated, done)
#   FPH workload exit=N
#   FPH devices virtio=N balloon_bound=N                (virtio devices at the end)
#   FPH dmesg_problem text=...                      (oops, BUG, panic, WARNING, probe failures)
#   FPH dmesg_problems count=N
#   FPH halt
# With `-- --wait-stdin` the workload waits at each phase for a line on the
# console (this script's stdin): that is how the tests drive the phases.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
UML=${FPH_UML_KERNEL:-/usr/bin/linux.uml}
UML_MODULES=${FPH_UML_MODULES:-/usr/lib/uml/modules}
BUSYBOX=${FPH_BUSYBOX:-/bin/busybox}

die() { echo "linux-guest: $*" >&2; exit 1; }

need_packages() {
  [ -x "$UML" ] || die "$UML not found: install the Debian package user-mode-linux (scripts/install-deps.sh)"
  [ -x "$BUSYBOX" ] || die "$BUSYBOX not found: install busybox-static (scripts/install-deps.sh)"
  if ! file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked'; then
    # `file` may be missing; ldd says "not a dynamic executable" for static ones.
    if ldd "$BUSYBOX" >/dev/null 2>&1; then
      die "$BUSYBOX is dynamically linked: install busybox-static (scripts/install-deps.sh)"
    fi
  fi
}

balloon_module() {
  local v n=0 found=""
  for v in "$UML_MODULES"/*/; do
    [ -f "$v/kernel/drivers/virtio/virtio_balloon.ko" ] || continue
    found="$v/kernel/drivers/virtio/virtio_balloon.ko"
    n=$((n + 1))
  done
  [ -n "$found" ] || die "no virtio_balloon.ko under $UML_MODULES/*/kernel/drivers/virtio (package user-mode-linux)"
  [ "$n" -eq 1 ] || die "$n kernel versions under $UML_MODULES; set FPH_UML_MODULES to one"
  echo "$found"
}

default_workload() {
  local c
  for c in "${FPH_LINUX_WORKLOAD:-}" "$REPO"/build/*/linuxguest/fph-linux-workload; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return; }
  done
  die "fph-linux-workload not found: build the CMake target fph-linux-workload or pass --workload"
}

write_init() {
  cat >"$1" <<'INIT'
#!/bin/busybox sh
# /init of an fph UML guest (written by scripts/linux-guest.sh). Kernel
# command line words reach it as environment: fph_balloon=0|1,
# fph_args=ARG,ARG,... (the workload's arguments, comma separated),
# fph_shell=1 (a shell on the console at the end instead of halting).
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
[ -e /dev/console ] || mount -t devtmpfs devtmpfs /dev

args=$(echo "${fph_args:-}" | tr ',' ' ')
echo "FPH init kernel=$(uname -r) balloon=${fph_balloon:-1} args=$args"

if [ "${fph_balloon:-1}" = 1 ]; then
  if insmod /lib/modules/virtio_balloon.ko; then
    bound=0
    for _ in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
      if ls /sys/bus/virtio/drivers/virtio_balloon/ 2>/dev/null | grep -q '^virtio'; then bound=1; break; fi
      sleep 0.1
    done
    # Linux 6.1's page_reporting_register() overwrites the order given on the
    # command line with the driver's (virtio_balloon: pageblock order, 10
    # here); later kernels (default -1) keep it. Put the command line's value back: the
    # first reporting pass runs 2 s after the driver registers.
    param=/sys/module/page_reporting/parameters/page_reporting_order
    driver_order=$(cat $param 2>/dev/null || echo unknown)
    cmdline_order=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^page_reporting\.page_reporting_order=//p' | tail -n 1)
    if [ -n "$cmdline_order" ] && [ "$cmdline_order" != "$driver_order" ]; then
      echo "$cmdline_order" >$param
    fi
    order=$(cat $param 2>/dev/null || echo unknown)
    echo "FPH balloon loaded=1 bound=$bound page_reporting_order=$order driver_order=$driver_order cmdline_order=${cmdline_order:-none}"
  else
    echo "FPH balloon loaded=0 bound=0 page_reporting_order=unknown"
  fi
fi

# shellcheck disable=SC2086
/bin/fph-linux-workload $args
echo "FPH workload exit=$?"

# The virtio devices left at the end (a back end that went away takes its
# device with it: virtio_uml does not reconnect).
nvirtio=$(ls /sys/bus/virtio/devices 2>/dev/null | wc -l)
nbound=$(ls /sys/bus/virtio/drivers/virtio_balloon 2>/dev/null | grep -c '^virtio' || true)
echo "FPH devices virtio=$nvirtio balloon_bound=$nbound"

n=0
dmesg | grep -E 'Oops|BUG|[Pp]anic|WARNING|Call Trace|probe of .* failed|reports error|segfault' >/tmp/problems || true
while IFS= read -r line; do
  echo "FPH dmesg_problem text=$line"
  n=$((n + 1))
done </tmp/problems
echo "FPH dmesg_problems count=$n"

if [ "${fph_shell:-0}" = 1 ]; then
  echo "FPH shell (exit or halt -f to stop the guest)"
  /bin/sh
fi
echo "FPH halt"
halt -f
INIT
  chmod 755 "$1"
}

cmd_build() {
  local root="" workload=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --workload) workload=$2; shift 2 ;;
      -*) die "build: unknown option $1" ;;
      *) [ -z "$root" ] || die "build: one ROOTDIR"; root=$1; shift ;;
    esac
  done
  [ -n "$root" ] || die "usage: $0 build ROOTDIR [--workload PATH]"
  need_packages
  [ -n "$workload" ] || workload=$(default_workload)
  [ -x "$workload" ] || die "workload $workload is not an executable"
  if ldd "$workload" >/dev/null 2>&1; then die "$workload is not statically linked"; fi
  local ko
  ko=$(balloon_module)

  mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,lib/modules}
  cp "$BUSYBOX" "$root/bin/busybox"
  local a
  for a in $("$BUSYBOX" --list); do
    [ "$a" = busybox ] || ln -sf busybox "$root/bin/$a"
  done
  cp "$ko" "$root/lib/modules/virtio_balloon.ko"
  cp "$workload" "$root/bin/fph-linux-workload"
  write_init "$root/init"
  echo "linux-guest: built $root (kernel $(basename "$(dirname "$(dirname "$(dirname "$(dirname "$ko")")")")"), $(basename "$ko"), $workload)" >&2
}

cmd_boot() {
  local socket="" root="" mem=512M tmp="" balloon=1 shell=0 workload=""
  local -a kargs=() wargs=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --socket) socket=$2; shift 2 ;;
      --rootdir) root=$2; shift 2 ;;
      --mem) mem=$2; shift 2 ;;
      --tmpdir) tmp=$2; shift 2 ;;
      --no-balloon) balloon=0; shift ;;
      --kernel-arg) kargs+=("$2"); shift 2 ;;
      --shell) shell=1; shift ;;
      --workload) workload=$2; shift 2 ;;
      --) shift; wargs=("$@"); break ;;
      *) die "boot: unknown argument $1" ;;
    esac
  done
  [ -n "$socket" ] || die "usage: $0 boot --socket SOCK [--rootdir DIR] [--mem 512M] [-- workload args]"
  [ -S "$socket" ] || die "$socket is not a listening socket (start fphd first)"
  need_packages
  local own_root=""
  if [ -z "$root" ]; then
    own_root=$(mktemp -d /tmp/fph-uml-root.XXXXXX)
    root=$own_root
    cmd_build "$root" ${workload:+--workload "$workload"}
  fi
  [ -x "$root/init" ] || die "$root has no /init: run '$0 build $root' first"
  root=$(cd "$root" && pwd)
  local a joined=""
  for a in "${wargs[@]}"; do
    case "$a" in *,* | *\ *) die "workload argument '$a' has a comma or a space (the kernel command line cannot carry it)" ;; esac
    joined+="${joined:+,}$a"
  done

  local own_tmp=""
  if [ -z "$tmp" ]; then
    local base=/dev/shm
    [ "$(stat -f -c %T "$base" 2>/dev/null)" = tmpfs ] || base=/tmp
    own_tmp=$(mktemp -d "$base/fph-uml.XXXXXX")
    tmp=$own_tmp
  fi
  mkdir -p "$tmp"
  local -a cmd=("$UML" "mem=$mem" root=/dev/root rootfstype=hostfs "hostfs=$root" rw init=/init
    "virtio_uml.device=$socket:5" con0=fd:0,fd:1 con=null "uml_dir=$tmp" umid=guest
    "fph_balloon=$balloon" "fph_shell=$shell")
  [ -z "$joined" ] || cmd+=("fph_args=$joined")
  cmd+=("${kargs[@]}")
  export TMPDIR=$tmp

  if [ -z "$own_tmp" ] && [ -z "$own_root" ]; then
    echo "FPH uml pid=$$ tmpdir=$tmp"
    exec "${cmd[@]}"
  fi
  # We own temporary directories: run UML as a child and clean up after it.
  local pid stty_saved=""
  [ -t 0 ] && stty_saved=$(stty -g)
  # UML does not die of SIGTERM: its helpers are its children, take them too.
  trap 'pkill -KILL -P "$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null' INT TERM HUP
  "${cmd[@]}" <&0 &
  pid=$!
  echo "FPH uml pid=$pid tmpdir=$tmp"
  local rc=0
  wait "$pid" || rc=$?
  [ -z "$stty_saved" ] || stty "$stty_saved"
  [ -z "$own_tmp" ] || rm -rf "$own_tmp"
  [ -z "$own_root" ] || rm -rf "$own_root"
  return "$rc"
}

cmd_ram() {
  local pid=${1:?usage: $0 ram PID} tmp fd target total=0 seen=""
  tmp=$(tr '\0' '\n' <"/proc/$pid/environ" | sed -n 's/^TMPDIR=//p')
  [ -n "$tmp" ] || die "process $pid has no TMPDIR"
  for fd in /proc/"$pid"/fd/*; do
    target=$(readlink "$fd" 2>/dev/null) || continue
    case "$target" in "$tmp"/*" (deleted)") ;; *) continue ;; esac
    local ino blocks
    read -r ino blocks < <(stat -L -c '%i %b' "$fd")
    case " $seen " in *" $ino "*) continue ;; esac
    seen+=" $ino"
    total=$((total + blocks * 512))
  done
  [ -n "$seen" ] || die "process $pid has no deleted file open under $tmp"
  echo "$total"
}

case "${1:-}" in
  build) shift; cmd_build "$@" ;;
  boot) shift; cmd_boot "$@" ;;
  ram) shift; cmd_ram "$@" ;;
  *) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
