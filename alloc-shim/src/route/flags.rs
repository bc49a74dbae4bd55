//! The request as jemalloc takes it: alignment flags, the usable size, the plain calls.

use std::ffi::{c_int, c_void};

use tikv_jemalloc_sys as jem;

use crate::sys::size_class::usable_size;

/// jemalloc guarantees this alignment for every allocation of at least this size
/// (`MALLOC_ALIGNMENT` on x86-64 and aarch64 Linux).
pub(super) const MIN_ALIGN: usize = 16;

/// The alignment flags jemalloc needs for `layout` (none when its natural alignment suffices).
#[inline(always)]
pub(super) fn align_flags(size: usize, align: usize) -> c_int {
    if align <= MIN_ALIGN && align <= size {
        0
    } else {
        jem::MALLOCX_LG_ALIGN(align.trailing_zeros() as usize)
    }
}

/// Allocates on the fast path: the thread's arena and cache.
///
/// # Safety
/// `size > 0`; `flags` holds at most a power-of-two alignment (`MALLOCX_LG_ALIGN`).
#[inline(always)]
pub(super) unsafe fn fast_alloc(size: usize, flags: c_int, zero: bool) -> *mut c_void {
    // SAFETY: size > 0 (GlobalAlloc callers guarantee it), and `flags` only holds an
    // alignment that is a power of two, which is all malloc, calloc and mallocx require.
    unsafe {
        match (flags, zero) {
            (0, false) => jem::malloc(size),
            (0, true) => jem::calloc(1, size),
            (f, false) => jem::mallocx(size, f),
            (f, true) => jem::mallocx(size, f | jem::MALLOCX_ZERO),
        }
    }
}

#[inline(always)]
pub(super) fn usable(size: usize, align: usize) -> Option<u64> {
    usable_size(size, align).map(|u| u as u64)
}
