#!/usr/bin/env bash
# The page-cache proof under real memory pressure (examples/cache_pressure.rs) on an emulated
# small machine: qemu with 1 GiB of memory and two CPUs, Debian's kernel, a busybox initramfs,
# and an ext4 disk image on a virtio disk (with the host's cache bypassed), so that the guest's
# page cache has to evict to make room. A 256 MiB index is kept hot by a query thread while
# 2 GiB are flushed, once per mode (plain / governed / direct writes, protected or not).
# Needs root (apt) the first time. Not part of CI. Output: the guest's RESULT lines.
# Usage: scripts/page-cache-vm.sh [cache_pressure arguments, default: every mode]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${PAGE_CACHE_VM_DIR:-/tmp/nodedb-page-cache-vm}"
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
    cargo build --release -p nodedb-mem --example cache_pressure \
    --target x86_64-unknown-linux-gnu --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
test -x "$bin" || { echo "building examples/cache_pressure.rs failed" >&2; exit 1; }

rm -rf "$work/root" && mkdir -p "$work/root"/{bin,proc,sys,dev,mnt,modules}
cp "$(command -v busybox)" "$work/root/bin/"
for a in sh mount umount cat insmod poweroff sync sleep grep; do ln -s busybox "$work/root/bin/$a"; done
cp "$bin" "$work/root/bin/cache_pressure"
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
for m in $load; do insmod /modules/\$m.ko || echo "=== insmod \$m failed"; done
n=0; while [ ! -b /dev/vda ] && [ \$n -lt 100 ]; do sleep 0.1; n=\$((n + 1)); done
mount -t ext4 /dev/vda /mnt || { echo "=== no disk"; poweroff -f; }
echo "=== guest: \$(grep MemTotal /proc/meminfo), \$(grep -c ^processor /proc/cpuinfo) CPUs"
/bin/cache_pressure /mnt $args
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

# Software emulation by default: under KVM nested in this project's 2-core VM the guest kernel
# hung at its first instruction. PAGE_CACHE_VM_ACCEL=kvm tries KVM where it works.
accel=${PAGE_CACHE_VM_ACCEL:-tcg} cpu=max
if [ "$accel" = kvm ]; then cpu=host,-arch-capabilities; fi
timeout 3000 qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -m 1G -smp 2 \
    -drive file="$work/disk.img",format=raw,if=virtio,cache=none \
    -kernel "$kernel" -initrd "$work/initrd.gz" -append "console=ttyS0 quiet panic=-1" \
    -nographic -no-reboot | grep -E '^(RESULT|===|[a-z-]+: )'
