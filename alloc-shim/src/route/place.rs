//! Placing and giving back blocks off the home path: in the owner's overflow arena, through
//! the owner's explicit cache, charged and credited at once.

use std::ffi::c_int;
use std::sync::atomic::Ordering;

use tikv_jemalloc_sys as jem;

use super::counters::DETACHED;
use crate::accounting::ledger;
use crate::id::{Arena, Slot};
use crate::overflow::pushout;
use crate::thread::ThreadState;

#[inline(always)]
pub(super) fn count_detached(t: &ThreadState) {
    if t.is_detached() {
        DETACHED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Charges a block that overflow could not take (a breach, already counted) where it is,
/// past the owner's limit if need be.
pub(super) fn charge_where_it_is(t: &ThreadState, owner: Slot, usable: u64) {
    if !t.on_alloc(owner, usable) {
        ledger::charge(owner, usable);
    }
}

/// Allocates `size` bytes in `engine`'s overflow arena `overflow`, through this thread's
/// cache for that overflow slot. Null if the region cannot take it.
///
/// # Safety
/// `size > 0`; `overflow` is `engine`'s overflow arena; `flags` holds only an alignment.
#[inline(always)]
pub(super) unsafe fn overflow_alloc(
    t: &ThreadState,
    engine: Slot,
    overflow: Arena,
    size: usize,
    flags: c_int,
    zero: bool,
) -> *mut u8 {
    let z = if zero { jem::MALLOCX_ZERO } else { 0 };
    let cache = t.cache_flag(engine.overflow().unwrap_or(Slot::UNATTRIBUTED));
    let f = flags | z | cache | overflow.flag();
    // SAFETY: size > 0; flags name an existing arena, this thread's cache for its slot (or
    // none), an alignment and maybe zeroing.
    let p = unsafe { jem::mallocx(size, f) }.cast::<u8>();
    if !p.is_null() {
        pushout::note(engine.index(), size as u64, p);
    }
    p
}

/// A free of a block owned by an engine other than home: into this thread's explicit cache
/// for the owner, never into the default cache.
///
/// # Safety
/// `ptr` is a live block of this allocator, owned by `owner`, allocated with `size` and
/// alignment flags `flags`, of `usable` bytes.
#[inline(never)]
unsafe fn foreign_free(
    t: &ThreadState,
    ptr: *mut u8,
    owner: Slot,
    size: usize,
    flags: c_int,
    usable: u64,
) {
    count_detached(t);
    // SAFETY: as in `GlobalAlloc::dealloc`.
    unsafe { jem::sdallocx(ptr.cast(), size, flags | t.cache_flag(owner)) };
    t.on_free(owner, usable);
}

/// Frees a live block owned by `owner` (`size` bytes, alignment flags `flags`, `usable`
/// bytes charged), through the cache its owner's blocks go to, and credits the owner.
///
/// # Safety
/// `ptr` is a live block of this allocator with that size and alignment, owned by `owner`.
pub(super) unsafe fn free_owned(
    t: &ThreadState,
    ptr: *mut u8,
    owner: Slot,
    size: usize,
    flags: c_int,
    usable: u64,
) {
    if t.is_home(owner) {
        // SAFETY: the caller's contract.
        unsafe { jem::sdallocx(ptr.cast(), size, flags) };
        t.on_free(owner, usable);
    } else {
        // SAFETY: the caller's contract.
        unsafe { foreign_free(t, ptr, owner, size, flags, usable) };
    }
}
