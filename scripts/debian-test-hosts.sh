#!/bin/bash
# Boot fresh Debian 12 test hosts (tests/test_real_labs.py): each is the cached debootstrap root
# (scripts/debian-test-root.sh) under its own overlay, booted by systemd-nspawn in its own network
# namespace `tr-NAME` on the bridge tr-br0 (198.18.0.240-.249; this machine is 198.18.0.250 there).
# chronyd may start (CAP_SYS_TIME: Debian's unit requires it); the tests run it with -x, so it
# never adjusts the machine's clock. Their apt reaches Debian through apt-cacher-ng on
# 198.18.0.250:3142 (the machine's own mirror). Each host's /var/lib/testbed is a directory of
# this machine's file system (bound from $STATE/NAME/data), not the overlay root: nfs-ganesha
# exports the VM disk area under it, and ganesha needs file handles (name_to_handle_at), which
# overlayfs does not give, and open_by_handle_at, which systemd-nspawn's seccomp filter refuses
# (EPERM) unless allowed with CAP_DAC_READ_SEARCH.
# CAP_NET_ADMIN: tc in the host's own network namespace (the link_shaping role's test); without
# it `tc qdisc add` fails with EPERM.
#   up NAME=ADDRESS...   boot the hosts (fresh: any old overlay is discarded)
#   down                 stop every test host and remove what `up` made
set -euo pipefail
ROOT=/var/cache/testbed/debian12-root
STATE=/var/lib/testbed-tr
ME=198.18.0.250
cmd=${1:?up NAME=ADDRESS... | down}; shift

# Signal the process of a pid file only while it is still the program that wrote it: a pid file
# outlives its process (an nspawn host that powered off), and pids wrap (32768 here), so a bare
# `kill $(cat file)` once killed a lab VM's QEMU that had been given the old number.
stop_pidfile() {
  local pidfile=$1 program=$2 pid
  [[ -e $pidfile ]] || return 0
  pid=$(cat "$pidfile")
  rm -f "$pidfile"
  [[ $pid =~ ^[0-9]+$ ]] || return 0
  owned() { [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$program"* ]]; }
  owned || return 0
  local children
  children=$(pgrep -P "$pid" || true)
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do owned || return 0; sleep 0.2; done
  # Still shutting down after 10 s (e.g. libvirt-guests waiting for guests that ignore ACPI):
  # a killed systemd-nspawn leaves the host's init running, orphaned, with its network
  # namespace and veth. Its init is pid 1 of the host's pid namespace: killing it ends them all.
  for child in $children; do
    [[ $(cat "/proc/$child/comm" 2>/dev/null) == systemd ]] && kill -9 "$child" 2>/dev/null
  done
  kill -9 "$pid" 2>/dev/null || true
}

# Each host's own cgroup in the hierarchies systemd-nspawn hands to the container (name=systemd
# and the cgroup2 one). With --keep-unit, nspawn puts the container in `payload` under the cgroup
# it was started in; this machine has no systemd, so every host would be started in the root
# cgroup and all would share /payload: a unit's cgroup, /payload/system.slice/UNIT, was then the
# same on every host. Stopping nfs-ganesha on one host met the other's ganesha in it ("Failed to
# kill control group ... Input/output error"), and a start while the other host's systemd removed
# that cgroup failed before ganesha ran (status=219/CGROUP): CI failed on it twice.
CGROUP_ROOTS=(/sys/fs/cgroup/systemd /sys/fs/cgroup/unified)
join_cgroup() {
  local root
  for root in "${CGROUP_ROOTS[@]}"; do
    [[ -d $root ]] || continue
    mkdir -p "$root/testbed-tr-$1"
    echo "$BASHPID" > "$root/testbed-tr-$1/cgroup.procs"
  done
}

# Remove a stopped host's cgroups, deepest first (a cgroup is removed only when empty).
remove_cgroup() {
  local root
  for root in "${CGROUP_ROOTS[@]}"; do
    [[ -d $root/testbed-tr-$1 ]] || continue
    find "$root/testbed-tr-$1" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
}

down() {
  for pidfile in "$STATE"/*/nspawn.pid; do
    stop_pidfile "$pidfile" systemd-nspawn
  done
  stop_pidfile "$STATE/acng.pid" apt-cacher-ng
  for dir in "$STATE"/*/; do
    [[ -d $dir/merged ]] || continue
    umount -l "$dir/merged" 2>/dev/null || true
    name=$(basename "$dir")
    ip netns del "tr-$name" 2>/dev/null || true
    remove_cgroup "$name"
    rm -rf "$dir"
  done
  ip link del tr-br0 2>/dev/null || true
}

up() {
  bash "$(dirname "$0")/debian-test-root.sh" "$ROOT"
  down
  mkdir -p "$STATE" /var/cache/testbed/acng
  [[ -e $STATE/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/id_ed25519"
  ip link add tr-br0 type bridge && ip link set tr-br0 up
  ip addr add "$ME/32" dev tr-br0
  apt-cacher-ng ForeGround=1 BindAddress="$ME" Port=3142 CacheDir=/var/cache/testbed/acng \
    LogDir="$STATE" PidFile="$STATE/acng.pid" > "$STATE/acng.out" 2>&1 &
  for spec in "$@"; do
    name=${spec%%=*} address=${spec#*=} dir=$STATE/${spec%%=*}
    mkdir -p "$dir"/{upper,work,merged,data}
    mount -t overlay overlay -o "lowerdir=$ROOT,upperdir=$dir/upper,workdir=$dir/work" "$dir/merged"
    install -d -m 0700 "$dir/merged/root/.ssh"
    install -m 0600 "$STATE/id_ed25519.pub" "$dir/merged/root/.ssh/authorized_keys"
    echo "Acquire::http::Proxy \"http://$ME:3142\";" > "$dir/merged/etc/apt/apt.conf.d/01testbed-proxy"
    echo "$name" > "$dir/merged/etc/hostname"
    # As Debian's installer does: the host resolves its own name without DNS (there is none
    # here; libvirtd looks its name up, and each lookup would wait for DNS to time out).
    printf '127.0.1.1\t%s\n' "$name" >> "$dir/merged/etc/hosts"
    ip netns add "tr-$name"
    ip link add "tr-$name" type veth peer name eth0 netns "tr-$name"
    ip link set "tr-$name" master tr-br0 up
    ip -n "tr-$name" addr add "$address/24" dev eth0
    ip -n "tr-$name" link set eth0 up
    ip -n "tr-$name" link set lo up
    ip route add "$address/32" dev tr-br0 src "$ME"
    (
      join_cgroup "$name"
      exec systemd-nspawn --boot --register=no --keep-unit --quiet --machine="tr-$name" -D "$dir/merged" \
        --network-namespace-path="/run/netns/tr-$name" --console=passive \
        --capability=CAP_SYS_TIME,CAP_DAC_READ_SEARCH,CAP_NET_ADMIN --system-call-filter=open_by_handle_at \
        --bind="$dir/data:/var/lib/testbed"
    ) > "$dir/console.log" 2>&1 &
    echo $! > "$dir/nspawn.pid"
  done
  for spec in "$@"; do
    address=${spec#*=}
    for _ in $(seq 120); do
      timeout 2 bash -c "exec 3<>/dev/tcp/$address/22 && head -c 4 <&3" 2>/dev/null | grep -q SSH && break
      sleep 0.5
    done
  done
}

"$cmd" "$@"
