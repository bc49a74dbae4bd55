#!/usr/bin/env bash
# The page-cache proof under real memory pressure (examples/cache_pressure.rs) on an emulated
# small machine (scripts/vm-lib.sh): qemu with 1 GiB of memory and two CPUs, Debian's kernel, a
# busybox initramfs, and an ext4 disk image on a virtio disk (with the host's cache bypassed),
# so that the guest's page cache has to evict to make room. A 256 MiB index is kept hot by a
# query thread while 2 GiB are flushed, once per mode (plain / governed / direct writes,
# protected or not). Needs root (apt) the first time. Not part of CI. Output: the guest's
# RESULT lines.
# Usage: scripts/page-cache-vm.sh [cache_pressure arguments, default: every mode]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${PAGE_CACHE_VM_DIR:-/tmp/nodedb-page-cache-vm}"
. scripts/vm-lib.sh
vm_tools
bin=$(vm_build nodedb-mem --example cache_pressure)
test -x "$bin" || { echo "building examples/cache_pressure.rs failed" >&2; exit 1; }
vm_initrd "$bin" cache_pressure "" "${*:-}"
vm_disk
vm_boot "${PAGE_CACHE_VM_ACCEL:-tcg}" '^(RESULT|===|[a-z-]+: )'
