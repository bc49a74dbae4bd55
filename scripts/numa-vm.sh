#!/usr/bin/env bash
# Runs the NUMA test binary (alloc-shim/tests/numa.rs) on an emulated two-node machine:
# qemu with two NUMA nodes of 1 GiB (one CPU each), Debian's kernel, a busybox initramfs.
# Needs root (apt) and about 1 GiB of downloads the first time; takes ~5 minutes.
# Not part of CI. Output: the guest console, including /proc/self/numa_maps lines.
set -euo pipefail
cd "$(dirname "$0")/.."
work="${NUMA_VM_DIR:-/tmp/nodedb-numa-vm}"
if ! command -v qemu-system-x86_64 >/dev/null || ! ls /boot/vmlinuz-* >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 linux-image-amd64 busybox-static cpio
fi
kernel=$(ls /boot/vmlinuz-* | sort -V | tail -n 1)
bin=$(RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$work/target" \
    cargo test -p nodedb-mem-alloc --test numa --no-run --target x86_64-unknown-linux-gnu \
    --message-format=json 2>/dev/null | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
rm -rf "$work/root" && mkdir -p "$work/root"/{bin,proc,sys,dev}
cp "$(command -v busybox)" "$work/root/bin/"
for a in sh mount cat grep poweroff; do ln -s busybox "$work/root/bin/$a"; done
cp "$bin" "$work/root/bin/numa-test"
cat > "$work/root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
for n in /sys/devices/system/node/node*; do echo "$n cpus=$(cat $n/cpulist) $(grep MemTotal $n/meminfo)"; done
/bin/numa-test --nocapture --test-threads=1
echo "=== exit $?"
poweroff -f
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip) > "$work/initrd.gz"
timeout 600 qemu-system-x86_64 -accel tcg -cpu max -m 2G -smp 2 \
    -object memory-backend-ram,id=m0,size=1G -object memory-backend-ram,id=m1,size=1G \
    -numa node,nodeid=0,cpus=0,memdev=m0 -numa node,nodeid=1,cpus=1,memdev=m1 \
    -kernel "$kernel" -initrd "$work/initrd.gz" -append "console=ttyS0 quiet panic=-1" \
    -nographic -no-reboot | grep -v '^\['
