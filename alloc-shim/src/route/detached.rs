//! Without the thread's state (during its teardown, after its exit flush): no batching, no
//! cache for foreign blocks, the ledger updated at once, the owner by address.

use std::ffi::c_int;
use std::sync::atomic::Ordering;

use tikv_jemalloc_sys as jem;

use super::counters::{DETACHED, range_fallback};
use super::flags::{align_flags, usable};
use super::sample::forget;
use crate::accounting::ledger;
use crate::id::{Arena, Slot};
use crate::space::reservation::owner_of;

/// An allocation on a thread without usable state (tearing down).
///
/// # Safety
/// `size > 0`; `align` is a power of two.
#[cold]
pub(super) unsafe fn detached_entry(size: usize, align: usize, zero: bool) -> *mut u8 {
    let Some(usable) = usable(size, align) else {
        return std::ptr::null_mut();
    };
    // SAFETY: `detached_alloc` needs
    // 1. `size > 0`: this function's contract;
    // 2. at most the alignment in the flags: `align_flags` of a power-of-two `align`;
    // 3. `usable` the block's usable size: `usable(size, align)`.
    unsafe { detached_alloc(size, align_flags(size, align), usable, zero) }
}

/// An allocation on a thread past its exit flush.
///
/// # Safety
/// `size > 0`; `flags` holds at most the alignment; `usable` is the block's usable size.
#[cold]
unsafe fn detached_alloc(size: usize, flags: c_int, usable: u64, zero: bool) -> *mut u8 {
    DETACHED.fetch_add(1, Ordering::Relaxed);
    let zero = if zero { jem::MALLOCX_ZERO } else { 0 };
    // SAFETY: `mallocx` needs
    // 1. `size > 0`: this function's contract;
    // 2. only an alignment, `MALLOCX_ZERO` and `MALLOCX_TCACHE_NONE` in the flags: `flags`
    //    holds at most the alignment (this function's contract).
    let mut p = unsafe { jem::mallocx(size, flags | zero | jem::MALLOCX_TCACHE_NONE) }.cast::<u8>();
    if p.is_null() {
        // The thread may still be bound to an engine arena whose range is full.
        // SAFETY: `range_fallback` needs `size > 0` and alignment-only `flags` (this
        // function's contract) and an automatic arena: arena 0 always is.
        p = unsafe { range_fallback(Slot::UNATTRIBUTED, Arena(0), size, flags, usable, zero != 0) };
    }
    if !p.is_null() {
        ledger::charge(owner_of(p), usable);
    }
    p
}

/// A free on a thread past its exit flush.
///
/// # Safety
/// `ptr` is a live block of this allocator allocated with `size` and alignment flags `flags`,
/// of `usable` bytes.
#[cold]
pub(super) unsafe fn detached_dealloc(ptr: *mut u8, size: usize, flags: c_int, usable: u64) {
    DETACHED.fetch_add(1, Ordering::Relaxed);
    let owner = owner_of(ptr);
    forget(ptr);
    // SAFETY: `sdallocx` needs
    // 1. `ptr` from jemalloc, not yet freed: this function's contract;
    // 2. `size` within its `[requested, usable]`: the size it was allocated with;
    // 3. its alignment flags: `flags` (this function's contract); bypassing the cache is
    //    always allowed.
    unsafe { jem::sdallocx(ptr.cast(), size, flags | jem::MALLOCX_TCACHE_NONE) };
    ledger::credit(owner, usable);
}

/// A `realloc` on a thread past its exit flush.
///
/// # Safety
/// As for [`GlobalAlloc::realloc`], with `flags` the new size's alignment flags and the two
/// usable sizes those of the old and new layouts.
#[cold]
pub(super) unsafe fn detached_realloc(
    ptr: *mut u8,
    new_size: usize,
    flags: c_int,
    old_usable: u64,
    new_usable: u64,
) -> *mut u8 {
    DETACHED.fetch_add(1, Ordering::Relaxed);
    let owner = owner_of(ptr);
    // A sampled block leaves the profile here (a detached thread keeps nothing sampled).
    forget(ptr);
    // SAFETY: `rallocx` needs
    // 1. `ptr` from jemalloc, not yet freed: `GlobalAlloc::realloc`'s contract;
    // 2. `new_size > 0`: the same contract;
    // 3. only an alignment (the new layout's, `flags`) and `MALLOCX_TCACHE_NONE`.
    let q = unsafe { jem::rallocx(ptr.cast(), new_size, flags | jem::MALLOCX_TCACHE_NONE) }
        .cast::<u8>();
    if !q.is_null() {
        ledger::credit(owner, old_usable);
        ledger::charge(owner_of(q), new_usable);
    }
    q
}
