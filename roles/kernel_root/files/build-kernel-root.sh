#!/usr/bin/env bash
# Builds the root of the Kernel app: a Debian 12 root made with debootstrap holding the toolchain
# a kernel compile needs and Debian's linux-source, configured (x86_64 defconfig) and prepared
# (`make prepare`) natively here, so that the Kernel workload only compiles objects (see
# workloads/kernel/kernel and docs/workloads.md); then, for QEMU, the kernel guest's root disk.
#
# A QEMU kernel guest still boots the busybox initramfs of the qemu role's build-guest.sh, whose
# init mounts the disk made here (through a per-VM qcow2 overlay whose backing file is this
# image, so every write of the compile goes to the VM's own disk) and chroots into it to run the
# workload. A container mounts the tree itself at /mnt, under an overlay whose upper layer is in
# its private directory (testbed.drivers.container), and chroots into it the same way.
#
# usage: build-kernel-root.sh WORKLOAD_SCRIPT OUTPUT_DIR|- [CACHE_DIR]
#   WORKLOAD_SCRIPT  workloads/kernel/kernel, installed as /usr/local/bin/kernel in the root
#   OUTPUT_DIR       where kernel-root.qcow2 goes (the PM's share of the VM storage); `-`: no
#                    image, the tree only (containers)
#   CACHE_DIR        the root's directory tree, kept between builds (default
#                    /var/cache/testbed/kernel-root)
#
# Cached in three steps, each redone only when what it depends on changed or what it made is
# damaged: the debootstrap (marker .testbed-root: the package list; redone when the root's
# toolchain does not run), the prepared source tree (marker usr/src/linux/.testbed-prepared: the
# configuration and object-list rule; redone when a listed object's source is missing) and the
# disk image (OUTPUT_DIR/kernel-root.sha256: fingerprint of this script, the workload and both
# markers, then the image's own digest; redone when the image no longer matches it). Each step
# builds under a temporary name and renames, its marker last.
# The last line of stdout is "changed" or "unchanged" (for Ansible's changed_when).
set -euo pipefail
script=$1 out=$2 root=${3:-/var/cache/testbed/kernel-root}
# What a kernel build needs (linux-source's Recommends, minus what only packaging uses).
packages=gcc,make,bc,flex,bison,libelf-dev,libssl-dev,binutils,libc6-dev,xz-utils,linux-source-6.1
config=x86_64_defconfig
objects_dir=kernel # the objects of this directory, in this configuration, make the list
image=$out/kernel-root.qcow2
changed=unchanged

# Run a command inside the root, with /proc and /dev, in a mount namespace of its own (the
# mounts vanish with it, whatever happens).
in_root() {
    unshare --mount --fork -- bash -c 'mount --rbind /dev "$0/dev" && mount -t proc proc "$0/proc" \
        && exec chroot "$0" "$@"' "$root" "$@"
}

# 1. The Debian root, from the mirror apt already uses (as scripts/debian-test-root.sh).
if [[ ! -f $root/.testbed-root || $(cat "$root/.testbed-root") != "$packages" ]] \
   || ! in_root sh -c 'gcc --version && make --version && bc --version' >/dev/null 2>&1; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
             | grep -oE '^(URIs:|deb) +https?://[^ ]+/debian/?( |$)' | grep -oE 'https?://[^ ]+' | head -n1 || true)
    [[ -n $mirror ]] || { echo "build-kernel-root: no Debian mirror in apt's sources" >&2; exit 1; }
    rm -rf "$root.tmp" "$root"
    mkdir -p "$(dirname "$root")"
    debootstrap --variant=minbase --include="$packages" bookworm "$root.tmp" "$mirror" >&2
    rm -f "$root.tmp"/var/cache/apt/archives/*.deb
    echo "$packages" > "$root.tmp/.testbed-root"
    mv "$root.tmp" "$root"
    changed=changed
fi

# 2. The source tree: extracted, configured, prepared; the object list comes from a native
# build of $objects_dir (which also proves every listed object compiles), whose objects are
# then removed so that the guest compiles them.
tree=$root/usr/src/linux
rule="$config $objects_dir/**.o from .c"
if [[ ! -f $tree/.testbed-prepared || $(cat "$tree/.testbed-prepared") != "$rule" ]] \
   || ! (cd "$tree" && [[ -s testbed-objects.list ]] && sed 's/\.o$/.c/' testbed-objects.list | xargs ls >/dev/null 2>&1); then
    rm -rf "$tree"
    tarball=$(find "$root/usr/src" -maxdepth 1 -name 'linux-source-*.tar.xz' | head -n1)
    [[ -n $tarball ]] || { echo "build-kernel-root: no linux-source tarball in $root/usr/src" >&2; exit 1; }
    mkdir "$tree.tmp"
    tar -xJf "$tarball" -C "$tree.tmp" --strip-components=1
    mv "$tree.tmp" "$tree"
    jobs=$(nproc)
    in_root make -C /usr/src/linux -s "$config" >&2
    in_root make -C /usr/src/linux -s -j"$jobs" prepare >&2
    in_root make -C /usr/src/linux -s -j"$jobs" "$objects_dir/" >&2
    (cd "$tree" && find "$objects_dir" -name '*.o' -print | while read -r object; do
        [[ -f ${object%.o}.c ]] && echo "$object"
    done | LC_ALL=C sort > testbed-objects.list)
    (cd "$tree" && xargs -a testbed-objects.list rm -f)
    echo "$rule" > "$tree/.testbed-prepared"
    changed=changed
fi
if ! cmp -s "$script" "$root/usr/local/bin/kernel"; then
    install -m 0755 "$script" "$root/usr/local/bin/kernel"
    changed=changed
fi
if [[ $out == - ]]; then
    echo "$changed"
    exit 0
fi

# 3. The disk image: an ext4 file system of the root (mkfs.ext4 -d keeps the files' times, so
# make in the guest finds the prepared tree up to date), as qcow2, the overlays' backing file.
fingerprint=$(cat "$0" "$script" "$root/.testbed-root" "$tree/.testbed-prepared" | sha256sum | cut -d' ' -f1)
if [[ -f $out/kernel-root.sha256 && $(head -n1 "$out/kernel-root.sha256") == "$fingerprint" ]] \
   && [[ -f $image && $(sed -n 2p "$out/kernel-root.sha256") == "$(sha256sum < "$image" | cut -d' ' -f1)" ]]; then
    echo unchanged
    exit 0
fi
mkdir -p "$out"
raw=$(mktemp -p "$out" kernel-root.XXXXXX.raw)
trap 'rm -f "$raw" "$image.new"' EXIT
# Room for the root plus 1 GiB free for what compiles write (into each VM's overlay). Inode
# tables and journal are zeroed here: else every guest's kernel would zero them in the
# background after mounting, hundreds of MB written to its overlay beside the workload.
size_mb=$(( $(du -sm "$root" | cut -f1) * 11 / 10 + 1024 ))
mkfs.ext4 -q -F -L kernel-root -E lazy_itable_init=0,lazy_journal_init=0 -d "$root" "$raw" "${size_mb}M"
qemu-img convert -f raw -O qcow2 "$raw" "$image.new"
rm -f "$out/kernel-root.sha256"
mv "$image.new" "$image"
printf '%s\n%s\n' "$fingerprint" "$(sha256sum < "$image" | cut -d' ' -f1)" > "$out/kernel-root.sha256.new"
mv "$out/kernel-root.sha256.new" "$out/kernel-root.sha256"
echo changed
