#!/bin/sh
# Idempotent setup for `make test-kernel` on Debian 12 as root: the guest kernel (Debian's own 6.1
# with its modules), qemu and a static busybox for the initramfs. Not part of `make test`.
#
# linux-image-amd64 only adds files to /boot and /lib/modules: nothing here boots from /boot (the
# host's kernel is given by its hypervisor; the guest's by qemu -kernel), so it changes no boot.
set -eu
PKGS="linux-image-amd64 linux-headers-amd64 qemu-system-x86 busybox-static wireguard-tools iperf3 kmod cpio"

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "vm bootstrap: installing Debian packages:$missing"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
fi
