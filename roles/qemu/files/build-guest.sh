#!/usr/bin/env bash
# Builds the testbed guest image: Debian's kernel plus a small initramfs holding busybox,
# the workloads (compiled statically) and the virtio modules of that kernel, with ext4 so
# that the init can mount the kernel guest's root disk (build-kernel-root.sh).
#
# The kernel is stored uncompressed (an ELF vmlinux, which QEMU boots through its PVH entry):
# under TCG, the bzImage decompressing itself takes longer than the whole boot that follows.
# For the same reason the initramfs is not compressed either.
#
# usage: build-guest.sh KERNEL_VERSION WORKLOADS_DIR INIT_SCRIPT OUTPUT_DIR
# (an empty KERNEL_VERSION picks the newest installed /boot/vmlinuz-*-amd64)
#
# Cached: OUTPUT_DIR/inputs.sha256 fingerprints every input (this script, the init script,
# the workload sources and headers, the kernel, its modules and busybox) and
# OUTPUT_DIR/outputs.sha256 the image's files; when both match, nothing is rebuilt, and a
# damaged image (a file that no longer matches its digest) is rebuilt. Outputs are written under
# temporary names and renamed, digests last. The last line of stdout is "changed" or "unchanged"
# (for Ansible's changed_when).
set -euo pipefail
kver=$1 workloads=$2 init=$3 out=$4
if [[ -z $kver ]]; then
    newest=$(find /boot -maxdepth 1 -name 'vmlinuz-*-amd64' | sort -V | tail -n 1)
    [[ -n $newest ]] || { echo "build-guest: no /boot/vmlinuz-*-amd64 (install linux-image-amd64)" >&2; exit 1; }
    kver=${newest#/boot/vmlinuz-}
fi
kernel=/boot/vmlinuz-$kver
moddir=/lib/modules/$kver
busybox=/bin/busybox
modules_wanted=(virtio_pci virtio_blk crc32c_generic ext4) # ext4 checksums with crc32c

# Modules in load order: each module after the modules it depends on.
ordered=()
add_module() {
    local name=$1 dep
    [[ " ${ordered[*]} " == *" $name "* ]] && return
    for dep in $(modinfo -k "$kver" -F depends "$name" | tr ',' ' '); do
        add_module "$dep"
    done
    ordered+=("$name")
}
for m in "${modules_wanted[@]}"; do add_module "$m"; done
module_files=()
for m in "${ordered[@]}"; do module_files+=("$(modinfo -k "$kver" -n "$m")"); done

sources=("$workloads"/*.c)
shopt -s nullglob
headers=("$workloads"/*.h) # what the sources include: a change to one rebuilds them too
shopt -u nullglob
fingerprint=$(cat "$0" "$init" "${sources[@]}" "${headers[@]}" "$kernel" "${module_files[@]}" "$busybox" | sha256sum | cut -d' ' -f1)
if [[ -f $out/inputs.sha256 && $(cat "$out/inputs.sha256") == "$fingerprint" ]] \
      && (cd "$out" && sha256sum --quiet --strict -c outputs.sha256 >/dev/null 2>&1); then
    echo unchanged
    exit 0
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{bin,usr/bin,etc,proc,sys,dev,tmp,mnt,lib/modules}
cp "$busybox" "$stage/bin/busybox"
install -m 0755 "$init" "$stage/init"
for src in "${sources[@]}"; do
    gcc -O2 -static -Wall -Wextra -Werror -o "$stage/usr/bin/$(basename "$src" .c)" "$src" -lm
done
for i in "${!ordered[@]}"; do
    cp "${module_files[$i]}" "$stage/lib/modules/${ordered[$i]}.ko"
done
printf '%s\n' "${ordered[@]}" > "$stage/etc/modules.order"
mknod -m 600 "$stage/dev/console" c 5 1

mkdir -p "$out"
(cd "$stage" && find . -print0 | cpio --null -o -H newc --quiet --owner 0:0) > "$out/initramfs.cpio.new"
python3 - "$kernel" "$out/vmlinux.new" <<'PY'
"""Unpack the ELF vmlinux from an xz-compressed bzImage (Debian's amd64 kernels)."""
import lzma
import sys

image = open(sys.argv[1], "rb").read()
start = image.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit(f"build-guest: {sys.argv[1]}: no xz-compressed kernel inside")
vmlinux = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(image[start:])
if not vmlinux.startswith(b"\x7fELF"):
    sys.exit(f"build-guest: {sys.argv[1]}: the xz payload is not an ELF kernel")
open(sys.argv[2], "wb").write(vmlinux)
PY
rm -f "$out/inputs.sha256" "$out/outputs.sha256" # a crash from here on leaves no valid record
mv "$out/initramfs.cpio.new" "$out/initramfs.cpio"
mv "$out/vmlinux.new" "$out/vmlinux"
(cd "$out" && sha256sum vmlinux initramfs.cpio > outputs.sha256.new && mv outputs.sha256.new outputs.sha256)
echo "$fingerprint" > "$out/inputs.sha256.new"
mv "$out/inputs.sha256.new" "$out/inputs.sha256"
echo changed
