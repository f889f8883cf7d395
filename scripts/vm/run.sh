#!/bin/sh
# Run a command inside Debian 12's own kernel (linux-image-amd64, 6.1, with its modules) under
# qemu/KVM, on the host's root filesystem: same checkout, venv, BCC and tools, but a kernel with
# geneve, ipip, wireguard and kprobes. Usage:
#   scripts/vm/run.sh 'cd /work/main && .venv/bin/python -m pytest -q tests/lab/test_tunnel.py'
# Prints the guest's console; exits with the command's status (124: the guest timed out, 125: it
# never reported one). SLUICE_VM_KERNEL picks another /boot/vmlinuz-*, SLUICE_VM_TIMEOUT (s) bounds it.
set -eu
kvm_kind() {
    if [ ! -e /dev/kvm ]; then echo "no /dev/kvm"
    elif [ -d /sys/module/kvm_pvm ]; then echo "/dev/kvm is kvm_pvm"
    else echo "no vmx/svm CPU flag"; fi
}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
build="$repo/build/vm"
[ $# -ge 1 ] || { echo "usage: $0 'command run in the guest by sh'" >&2; exit 2; }

kernel=${SLUICE_VM_KERNEL:-$(ls /boot/vmlinuz-6.1.* 2>/dev/null | sort -V | tail -n 1)}
[ -n "$kernel" ] && [ -f "$kernel" ] || {
    echo "vm: no Debian 6.1 kernel in /boot: run scripts/vm/bootstrap.sh" >&2; exit 2; }
release=${kernel#/boot/vmlinuz-}
[ -d "/lib/modules/$release/kernel" ] || { echo "vm: no modules for $release" >&2; exit 2; }

# KVM needs hardware virtualisation (vmx/svm). /dev/kvm alone is not enough: under kvm_pvm (a
# paravirtual KVM for nested sandboxes) only kernels built as PVM guests boot, Debian's hangs
# before its first console line. Then qemu emulates the CPU (TCG): same kernel, slower.
if [ -w /dev/kvm ] && grep -q -w -E 'vmx|svm' /proc/cpuinfo; then
    accel="-enable-kvm -cpu host,-arch-capabilities"
else
    accel="-accel tcg,thread=multi -cpu max"
    echo "vm: no hardware virtualisation for KVM here ($(kvm_kind)): emulating the CPU with TCG" >&2
fi

# The initramfs: busybox and the modules that reach the host's root (9p over virtio, overlay);
# every other module comes from the host's /lib/modules once that root is mounted.
initrd="$build/initramfs-$release.cpio.gz"
if [ ! -f "$initrd" ] || [ "$here/initramfs-init" -nt "$initrd" ] || [ "$0" -nt "$initrd" ]; then
    stage=$(mktemp -d)
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage/bin" "$stage/modules" "$stage/proc" "$stage/sys" "$stage/dev" "$build"
    cp /bin/busybox "$stage/bin/busybox"
    cp "$here/initramfs-init" "$stage/init"
    for m in virtio_pci 9pnet_virtio 9p overlay; do
        modprobe -S "$release" --show-depends "$m" | sed -n 's/^insmod \([^ ]*\).*/\1/p'
    done | awk '!seen[$0]++' | while read -r path; do
        cp "$path" "$stage/modules/"
        basename "$path" >>"$stage/modules/order"
    done
    (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1) >"$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$stage"
    trap - EXIT
fi

# One run at a time per checkout: the output share is a fixed directory.
out="$build/run"
rm -rf "$out"
mkdir -p "$out"
printf '%s\n' "$*" >"$out/command"

status=0
timeout --foreground -k 10 "${SLUICE_VM_TIMEOUT:-3000}" qemu-system-x86_64 \
    $accel -m "${SLUICE_VM_MEMORY:-4G}" -smp "${SLUICE_VM_CPUS:-2}" \
    -nodefaults -no-user-config -display none -serial stdio -no-reboot \
    -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 edd=off random.trust_cpu=on sluice_out=$out sluice_init=$here/guest-init" \
    -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
    -virtfs "local,path=$out,mount_tag=out,security_model=none" \
    </dev/null || status=$?
if [ "$status" -eq 124 ]; then
    echo "vm: the guest did not finish within ${SLUICE_VM_TIMEOUT:-3000}s" >&2
    exit 124
fi
if [ ! -s "$out/rc" ]; then
    echo "vm: the guest reported no exit status (qemu exited $status); see the console above" >&2
    exit 125
fi
exit "$(cat "$out/rc")"
