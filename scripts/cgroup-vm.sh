#!/usr/bin/env bash
# The container proof in a real kernel's memory controller (examples/cgroup_limits.rs) on an
# emulated machine (scripts/vm-lib.sh): qemu with 1 GiB of memory, two CPUs and no swap,
# Debian's kernel with cgroup v2 (and its default transparent huge pages, `always`), a busybox
# initramfs and an ext4 disk image for the overflow files and the scanned file. Each case runs
# in a cgroup of its own; the guest prints one RESULT line per case with the kernel's counters
# (memory.events, memory.peak, stall time). Needs root (apt) the first time. Not part of CI:
# about 80 s once built.
# With CGROUP_VM_MAIN_JOB=1 the README's main job runs too, at a reduced scale, governed and
# not (its static release build takes about 25 minutes the first time).
# Usage: scripts/cgroup-vm.sh [CASE...] (over-limit, over-limit-ungoverned, high-then-max,
# max-only, max-untold, scan, main-job, main-job-ungoverned; default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
work="${CGROUP_VM_DIR:-/tmp/nodedb-cgroup-vm}"
. scripts/vm-lib.sh
vm_tools
bin=$(vm_build nodedb-mem --example cgroup_limits)
test -x "$bin" || { echo "building examples/cgroup_limits.rs failed" >&2; exit 1; }
# The main job's binary goes on the disk: run from there, its pages are charged as any
# program's are.
rm -rf "$work/disk" && mkdir -p "$work/disk/bin"
if [ "${CGROUP_VM_MAIN_JOB:-0}" = 1 ]; then
    job=$(vm_build nodedb-mem-validation)
    test -x "$job" || { echo "building nodedb-mem-validation failed" >&2; exit 1; }
    cp "$job" "$work/disk/bin/"
fi
vm_initrd "$bin" cgroup_limits \
    'mount -t cgroup2 none /sys/fs/cgroup || { echo "=== no cgroup v2"; poweroff -f; }' "${*:-}"
vm_disk "$work/disk"
vm_boot "${CGROUP_VM_ACCEL:-tcg}" '^(RESULT|===|  )'
