# Shared by the emulated-machine scripts (scripts/page-cache-vm.sh, scripts/cgroup-vm.sh):
# qemu with 1 GiB of memory, two CPUs and no swap, Debian's kernel, a busybox initramfs that
# loads the disk and ext4 drivers and mounts an ext4 disk image at /mnt, and one statically
# built example run in the guest. Source it; `work` names the scripts' working directory.

# Installs qemu, a kernel, busybox and the ext4 tools with apt when one is missing (root).
vm_tools() {
    if ! command -v qemu-system-x86_64 >/dev/null || ! ls /boot/vmlinuz-* >/dev/null 2>&1 ||
        ! command -v busybox >/dev/null || ! command -v mkfs.ext4 >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 linux-image-amd64 \
            busybox-static cpio e2fsprogs
    fi
    kernel=$(ls /boot/vmlinuz-* | sort -V | tail -n 1)
    modules=/lib/modules/${kernel#/boot/vmlinuz-}
}

# Builds `cargo build --release -p $1 $2...` statically for the guest; prints the executable.
vm_build() {
    local package=$1
    shift
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$work/target" \
        cargo build --release -p "$package" "$@" --target x86_64-unknown-linux-gnu \
        --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1
}

# Makes $work/initrd.gz: busybox, the executable $1 as /bin/$2, and an init that mounts /proc,
# /sys and /dev, runs the lines of $3 (extra set-up), loads the disk drivers, mounts the disk
# at /mnt, prints the guest's figures, runs "/bin/$2 /mnt $4" and powers off.
vm_initrd() {
    local bin=$1 name=$2 setup=$3 args=$4 load="" m ext f
    rm -rf "$work/root" && mkdir -p "$work/root"/{bin,proc,sys,dev,mnt,modules}
    cp "$(command -v busybox)" "$work/root/bin/"
    for a in sh mount umount cat insmod poweroff sync sleep grep mkdir; do
        ln -s busybox "$work/root/bin/$a"
    done
    cp "$bin" "$work/root/bin/$name"
    # The disk and ext4 drivers, in load order (Debian builds them as modules).
    for m in drivers/virtio/virtio_ring drivers/virtio/virtio \
        drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci_modern_dev \
        drivers/virtio/virtio_pci drivers/block/virtio_blk lib/crc16 crypto/crc32c_generic \
        lib/libcrc32c fs/mbcache fs/jbd2/jbd2 fs/ext4/ext4; do
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
    cat > "$work/root/init" <<INIT
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
$setup
for m in $load; do insmod /modules/\$m.ko || echo "=== insmod \$m failed"; done
n=0; while [ ! -b /dev/vda ] && [ \$n -lt 100 ]; do sleep 0.1; n=\$((n + 1)); done
mount -t ext4 /dev/vda /mnt || { echo "=== no disk"; poweroff -f; }
echo "=== guest: \$(grep MemTotal /proc/meminfo), \$(grep -c ^processor /proc/cpuinfo) CPUs, THP \$(cat /sys/kernel/mm/transparent_hugepage/enabled)"
/bin/$name /mnt $args
echo "=== exit \$?"
umount /mnt
poweroff -f
INIT
    chmod +x "$work/root/init"
    (cd "$work/root" && find . | cpio -o -H newc 2>/dev/null | gzip) > "$work/initrd.gz"
}

# A fresh 4 GiB ext4 disk image (sparse), formatted on the host without mounting it, holding
# the files of directory $1 if given.
vm_disk() {
    rm -f "$work/disk.img"
    truncate -s 4G "$work/disk.img"
    if [ -n "${1:-}" ]; then
        mkfs.ext4 -q -F -d "$1" "$work/disk.img"
    else
        mkfs.ext4 -q -F "$work/disk.img"
    fi
}

# Boots the guest (acceleration $1: software emulation `tcg` by default, since KVM nested in
# the development VM hung at the guest's first instruction; `kvm` where it works) and keeps
# the console lines matching the extended regular expression $2.
vm_boot() {
    local accel=${1:-tcg} cpu=max
    if [ "$accel" = kvm ]; then cpu=host,-arch-capabilities; fi
    timeout 3000 qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -m 1G -smp 2 \
        -drive file="$work/disk.img",format=raw,if=virtio,cache=none \
        -kernel "$kernel" -initrd "$work/initrd.gz" -append "console=ttyS0 quiet panic=-1" \
        -nographic -no-reboot | grep -E "$2"
}
