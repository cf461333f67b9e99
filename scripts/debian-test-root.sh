#!/bin/bash
# Build (once) the fresh Debian 12 root file system that tests/test_real_labs.py boots as real-lab
# test hosts. Cached under /var/cache/testbed/ so CI reuses it; rebuilt only when absent.
# The mirror is the one apt already uses on this machine (read from its sources), so no other
# host is named here.
set -euo pipefail
ROOT=${1:-/var/cache/testbed/debian12-root}
[[ -x $ROOT/usr/sbin/sshd && -e $ROOT/.testbed-complete ]] && { echo "$ROOT: cached"; exit 0; }
MIRROR=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
         | grep -oE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' | grep -oE 'https?://[^ ]+' | head -n1 || true)
[[ -n $MIRROR ]] || { echo "no Debian mirror in apt's sources" >&2; exit 1; }
rm -rf "$ROOT.tmp"
mkdir -p "$(dirname "$ROOT")"
start=$(date +%s)
debootstrap --variant=minbase \
  --include=openssh-server,python3,python3-apt,iproute2,systemd,systemd-sysv,dbus,procps,ca-certificates \
  bookworm "$ROOT.tmp" "$MIRROR"
# The hosts' apt reaches the same mirror (via this machine, see docs/real-labs.md).
rm -f "$ROOT.tmp/etc/apt/sources.list"
cp /etc/apt/sources.list.d/*.sources "$ROOT.tmp/etc/apt/sources.list.d/" 2>/dev/null || true
touch "$ROOT.tmp/.testbed-complete"
mv "$ROOT.tmp" "$ROOT"
echo "$ROOT: built in $(( $(date +%s) - start )) s"
