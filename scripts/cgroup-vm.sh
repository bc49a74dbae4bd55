#!/usr/bin/env bash
# The container proof in a real kernel's memory controller (examples/cgroup_limits.rs): qemu
# with 1 GiB of memory, two CPUs and no swap, Debian's kernel with cgroup v2 (and its default
# transparent huge pages, `always`), a busybox initramfs and an ext4 disk image for the
# overflow files and the scanned file. Each case runs in a cgroup of its own; the guest prints
# one RESULT line per case with the kernel's counters (memory.events, memory.peak, stall time).
# Needs root (apt) the first time. Not part of CI: about 15 minutes under software emulation,
# most of it the cases themselves.
# Usage: scripts/cgroup-vm.sh [CASE...] (over-limit, over-limit-ungoverned, high-then-max,
# max-only, scan; default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${CGROUP_VM_DIR:-/tmp/nodedb-cgroup-vm}"
if ! command -v qemu-system-x86_64 >/dev/null || ! ls /boot/vmlinuz-* >/dev/null 2>&1 ||
    ! command -v busybox >/dev/null || ! command -v mkfs.ext4 >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 linux-image-amd64 \
        busybox-static cpio e2fsprogs
fi
kernel=$(ls /boot/vmlinuz-* | sort -V | tail -n 1)
version=${kernel#/boot/vmlinuz-}
modules=/lib/modules/$version

bin=$(RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$work/target" \
    cargo build --release -p nodedb-mem --example cgroup_limits \
    --target x86_64-unknown-linux-gnu --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
test -x "$bin" || { echo "building examples/cgroup_limits.rs failed" >&2; exit 1; }

rm -rf "$work/root" && mkdir -p "$work/root"/{bin,proc,sys,dev,mnt,modules}
cp "$(command -v busybox)" "$work/root/bin/"
for a in sh mount umount cat insmod poweroff sync sleep grep mkdir; do
    ln -s busybox "$work/root/bin/$a"
done
cp "$bin" "$work/root/bin/cgroup_limits"
# The disk and ext4 drivers, in load order (Debian builds them as modules).
load=""
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_legacy_dev \
    drivers/virtio/virtio_pci_modern_dev drivers/virtio/virtio_pci drivers/block/virtio_blk \
    lib/crc16 crypto/crc32c_generic lib/libcrc32c fs/mbcache fs/jbd2/jbd2 fs/ext4/ext4; do
    for ext in ko ko.xz ko.zst; do
        f="$modules/kernel/$m.$ext"
        [ -f "$f" ] || continue
        case $ext in
            ko) cp "$f" "$work/root/modules/" ;;
            ko.xz) xz -dc "$f" > "$work/root/modules/$(basename "$m").ko" ;;
            ko.zst) zstd -qdc "$f" > "$work/root/modules/$(basename "$m").ko" ;;
        esac
        load="$load $(basename "$m")"
        break
    done
done
args="${*:-}"
cat > "$work/root/init" <<INIT
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t cgroup2 none /sys/fs/cgroup || { echo "=== no cgroup v2"; poweroff -f; }
for m in $load; do insmod /modules/\$m.ko || echo "=== insmod \$m failed"; done
n=0; while [ ! -b /dev/vda ] && [ \$n -lt 100 ]; do sleep 0.1; n=\$((n + 1)); done
mount -t ext4 /dev/vda /mnt || { echo "=== no disk"; poweroff -f; }
echo "=== guest: \$(grep MemTotal /proc/meminfo), \$(grep -c ^processor /proc/cpuinfo) CPUs, THP \$(cat /sys/kernel/mm/transparent_hugepage/enabled)"
/bin/cgroup_limits /mnt $args
echo "=== exit \$?"
umount /mnt
poweroff -f
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip) > "$work/initrd.gz"

# A fresh 4 GiB ext4 disk (sparse), formatted on the host without mounting it.
rm -f "$work/disk.img"
truncate -s 4G "$work/disk.img"
mkfs.ext4 -q -F "$work/disk.img"

# Software emulation by default (KVM nested in the development VM hung at boot);
# CGROUP_VM_ACCEL=kvm tries KVM where it works.
accel=${CGROUP_VM_ACCEL:-tcg} cpu=max
if [ "$accel" = kvm ]; then cpu=host,-arch-capabilities; fi
timeout 3000 qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -m 1G -smp 2 \
    -drive file="$work/disk.img",format=raw,if=virtio,cache=none \
    -kernel "$kernel" -initrd "$work/initrd.gz" -append "console=ttyS0 quiet panic=-1" \
    -nographic -no-reboot | grep -E '^(RESULT|===|  )'
