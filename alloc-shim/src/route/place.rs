//! Placing and giving back blocks off the home path: in the owner's overflow arena, through
//! the owner's explicit cache, charged and credited at once.

use std::ffi::c_int;
use std::sync::atomic::Ordering;

use tikv_jemalloc_sys as jem;

use super::counters::DETACHED;
use crate::accounting::ledger;
use crate::id::{Arena, Slot};
use crate::overflow::pushout;
use crate::profile;
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
    // SAFETY: `mallocx` needs
    // 1. `size > 0`: this function's contract;
    // 2. an existing arena: `overflow` is the engine's overflow arena (this function's
    //    contract);
    // 3. a cache this thread created, or none: `cache_flag`;
    // 4. otherwise only a power-of-two alignment and `MALLOCX_ZERO`: `flags` holds only an
    //    alignment (this function's contract).
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
    let cache = free_cache(t, ptr, owner);
    // SAFETY: `sdallocx` needs
    // 1. `ptr` from jemalloc, not yet freed: this function's contract;
    // 2. `size` within its `[requested, usable]`: the size it was allocated with;
    // 3. its alignment flags: `flags` (this function's contract);
    // 4. a cache this thread created, or none: `free_cache` (a cache holds blocks of any
    //    arena, so freeing into the owner's cache keeps the owner's blocks together).
    unsafe { jem::sdallocx(ptr.cast(), size, flags | cache) };
    t.on_free(owner, usable);
}

/// The cache flag to free `ptr` (owned by `owner`) with: none for a block of the fallback
/// range (a sample, or a range fallback), so it goes back to its fallback arena instead of
/// being handed out again from a cache, whose every free of it would then take the slow path;
/// the default cache's (0) for home's; else this thread's explicit cache for the owner.
#[inline]
pub(super) fn free_cache(t: &ThreadState, ptr: *const u8, owner: Slot) -> c_int {
    if profile::is_sampled_place(ptr) {
        jem::MALLOCX_TCACHE_NONE
    } else if t.is_home(owner) {
        0
    } else {
        t.cache_flag(owner)
    }
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
        // SAFETY: `sdallocx` needs `ptr` from jemalloc and not yet freed, `size` within its
        // `[requested, usable]`, and its alignment flags: this function's contract; the
        // cache flag is the default's or none.
        unsafe { jem::sdallocx(ptr.cast(), size, flags | free_cache(t, ptr, owner)) };
        t.on_free(owner, usable);
    } else {
        // SAFETY: `foreign_free` needs the same of `ptr`, `size`, `flags` and `usable`, and
        // `owner` its owner: this function's contract.
        unsafe { foreign_free(t, ptr, owner, size, flags, usable) };
    }
}
