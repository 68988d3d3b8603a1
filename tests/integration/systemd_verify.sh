#!/usr/bin/env bash
# The shipped systemd units, sysusers/tmpfiles snippets and configuration are
# valid: systemd-analyze verify (with ExecStart pointing at the built fphd),
# sysusers/tmpfiles applied to a scratch root, fphd --check-config.
#   systemd_verify.sh SOURCE_DIR FPHD
set -euo pipefail
src=$1
fphd=$2
tmp=$(mktemp -d /tmp/fph-sdv-XXXXXX)
trap 'rm -rf "$tmp"' EXIT

command -v systemd-analyze >/dev/null || { echo "systemd-analyze missing (apt-get install systemd)"; exit 1; }
cp "$src"/systemd/fphd.service "$src"/systemd/fphd.socket "$src"/systemd/fphd-admin.socket "$tmp"/
sed -i "s|^ExecStart=/usr/local/bin/fphd|ExecStart=$fphd|" "$tmp"/fphd.service
grep -q "^ExecStart=$fphd " "$tmp"/fphd.service
out=$(cd "$tmp" && systemd-analyze verify --man=no ./fphd.service ./fphd.socket ./fphd-admin.socket 2>&1) || {
  echo "$out"; echo "systemd-analyze verify failed"; exit 1; }
# verify prints warnings without failing: any line about our units fails.
if echo "$out" | grep -E "fphd(-admin)?\.(service|socket)"; then
  echo "systemd-analyze verify warned about the units"; exit 1
fi
echo "systemd-analyze verify: ok"

# The unit must keep what makes fphd work.
grep -q '^Type=notify' "$src"/systemd/fphd.service
grep -q '^WatchdogSec=' "$src"/systemd/fphd.service
grep -q '^User=fphd' "$src"/systemd/fphd.service
grep -q '^FileDescriptorName=admin' "$src"/systemd/fphd-admin.socket

mkdir -p "$tmp/root/etc" "$tmp/root/run"
systemd-sysusers --root="$tmp/root" "$src"/systemd/fphd.sysusers
grep -q '^fphd:' "$tmp/root/etc/passwd"
systemd-tmpfiles --root="$tmp/root" --create "$src"/systemd/fphd.tmpfiles
test -d "$tmp/root/run/fphd"
echo "sysusers, tmpfiles: ok"

"$fphd" --config "$src"/etc/fphd.toml --check-config
echo "etc/fphd.toml: ok"
