#!/usr/bin/env bash
# Decides the accelerator the QEMU driver uses: "kvm" only if a KVM guest boots this image to
# its ready line within TIMEOUT seconds (on some machines /dev/kvm exists but guests hang),
# else "tcg". Writes IMAGE_DIR/accel (by rename); probes again only when the image or /dev/kvm
# changed or the recorded answer is neither kvm nor tcg.
#
# usage: probe-kvm.sh IMAGE_DIR TIMEOUT
# The last line of stdout is "changed" or "unchanged" (for Ansible's changed_when).
set -euo pipefail
image=$1 timeout=$2
key=$(cat "$image/inputs.sha256"; stat -c '%t:%T' /dev/kvm 2>/dev/null || echo none)
if [[ -f $image/accel.key && $(cat "$image/accel.key") == "$key" \
      && $(cat "$image/accel" 2>/dev/null) =~ ^(kvm|tcg)$ ]]; then
    echo unchanged
    exit 0
fi
accel=tcg
if [[ -r /dev/kvm && -w /dev/kvm ]]; then
    # The pipeline's status is grep's: QEMU is cut off by the timeout or SIGPIPE either way.
    if (set +o pipefail; timeout "$timeout" qemu-system-x86_64 -accel kvm -m 128 -nodefaults -no-user-config \
        -display none -no-reboot -kernel "$image/vmlinux" -initrd "$image/initramfs.cpio" \
        -append "console=ttyS0 quiet panic=-1" -serial stdio </dev/null 2>/dev/null \
        | grep -q -m1 '^@ready'); then
        accel=kvm
    fi
fi
echo "$accel" > "$image/accel.new" && mv "$image/accel.new" "$image/accel"
echo "$key" > "$image/accel.key.new" && mv "$image/accel.key.new" "$image/accel.key"
echo "accel: $accel"
echo changed
