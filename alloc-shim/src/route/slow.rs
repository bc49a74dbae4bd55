//! Allocations and frees the home path did not take: home allocations that must be checked,
//! visits to other engines, allocations for an engine over its limit, foreign frees.

use std::ffi::c_int;
use std::sync::atomic::Ordering;

use tikv_jemalloc_sys as jem;

use super::counters::{ACTIVE, UNROUTED, range_fallback};
use super::detached::detached_dealloc;
use super::flags::{align_flags, fast_alloc, usable};
use super::place::{charge_where_it_is, count_detached, free_cache, free_owned, overflow_alloc};
use super::relocate::account;
use super::sample::{after, forget, place_due};
use crate::accounting::bound::FAST_MAX;
use crate::id::Slot;
use crate::overflow::{
    OverflowPolicy, count_breach, count_refusal, overflow_arena, overflow_policy, wants_overflow,
};
use crate::space::reservation::owner_of;
use crate::thread::ThreadState;

/// Every allocation the home path did not take.
///
/// # Safety
/// `size > 0`; `align` is a power of two (a `Layout`'s).
#[inline(never)]
pub(super) unsafe fn alloc_slow(t: &ThreadState, size: usize, align: usize, zero: bool) -> *mut u8 {
    let Some(usable) = usable(size, align) else {
        return std::ptr::null_mut();
    };
    let flags = align_flags(size, align);
    if t.at_home() && size | align <= FAST_MAX && t.home_ready() {
        // A home allocation counted by jemalloc, as on the home path, with the check the
        // hook would make (it is not armed for this thread yet, or not available).
        // SAFETY: `fast_alloc` needs
        // 1. `size > 0`: this function's contract;
        // 2. flags holding at most a power-of-two alignment: `align_flags` of a `Layout`'s.
        let p = unsafe { fast_alloc(size, flags, zero) }.cast::<u8>();
        if !p.is_null() {
            t.check();
            // SAFETY: `after` needs `p` live with `size` and `flags`, of `usable` bytes,
            // nothing kept: just allocated so.
            return unsafe { after(t, p, size, flags, usable, zero, 0) };
        }
    }
    let began = t.begin_slow();
    // SAFETY: `slow_alloc` needs
    // 1. `size > 0`: this function's contract;
    // 2. `flags` holding at most the alignment: `align_flags`;
    // 3. `usable` the block's usable size: `usable(size, align)`, jemalloc's size class.
    let p = unsafe { slow_alloc(t, size, flags, usable, zero) };
    t.end_slow(began);
    // SAFETY: as above.
    unsafe { after(t, p, size, flags, usable, zero, 0) }
}

/// Every free the home path did not take.
///
/// # Safety
/// `ptr` is live, allocated by this allocator with `size` and `align`.
#[inline(never)]
pub(super) unsafe fn dealloc_slow(t: &ThreadState, ptr: *mut u8, size: usize, align: usize) {
    // The allocation succeeded with this layout, so its usable size exists.
    let usable = usable(size, align).unwrap_or(0);
    let flags = align_flags(size, align);
    if t.is_detached() {
        // SAFETY: `detached_dealloc` needs
        // 1. `ptr` a live block of this allocator with `size`: this function's contract;
        // 2. its alignment flags: `align_flags` of the layout it was allocated with;
        // 3. `usable` its usable bytes: `usable` of that layout.
        return unsafe { detached_dealloc(ptr, size, flags, usable) };
    }
    let owner = owner_of(ptr);
    forget(ptr);
    if t.is_home(owner) && size | align <= FAST_MAX && t.register() {
        // A home free counted by jemalloc, as on the home path, checked as in `alloc_slow`.
        // SAFETY: `sdallocx` needs
        // 1. `ptr` from jemalloc, not yet freed: this function's contract;
        // 2. `size` within the block's `[requested, usable]`: the requested size;
        // 3. the alignment flags it was allocated with: `align_flags` of its layout; the
        //    cache flag is the default's or none.
        unsafe { jem::sdallocx(ptr.cast(), size, flags | free_cache(t, ptr, owner)) };
        t.check();
        return;
    }
    let began = t.begin_slow();
    // SAFETY: `free_owned` needs `ptr` live, from this allocator, with `size` and the
    // alignment `flags` encode (this function's contract and `align_flags`), owned by
    // `owner` (`owner_of` reads the owner from the address).
    unsafe { free_owned(t, ptr, owner, size, flags, usable) };
    t.end_slow(began);
}

/// An allocation off the fast path: for an engine over its limit (its overflow arena), or
/// for an engine other than home (a visit).
///
/// # Safety
/// `size > 0`; `flags` holds at most the alignment; `usable` is the block's usable size.
#[inline(never)]
unsafe fn slow_alloc(
    t: &ThreadState,
    size: usize,
    flags: c_int,
    usable: u64,
    zero: bool,
) -> *mut u8 {
    let engine = t.current();
    let mut fell_back = false;
    if wants_overflow(engine, usable)
        && let Some(overflow) = overflow_arena(engine)
    {
        ACTIVE.store(true, Ordering::Relaxed);
        // SAFETY: `overflow_alloc` needs
        // 1. `size > 0`: this function's contract;
        // 2. `overflow` the engine's overflow arena: `overflow_arena(engine)` returned it;
        // 3. `flags` holding only an alignment: this function's contract.
        let p = unsafe { overflow_alloc(t, engine, overflow, size, flags, zero) };
        if !p.is_null() {
            // SAFETY: `account` needs
            // 1. `p` live, from this allocator, with `size` and `flags`, not yet charged:
            //    just allocated so;
            // 2. `keep <= size`: `keep` is 0.
            return unsafe { account(t, p, owner_of(p), size, flags, usable, zero, 0) };
        }
        match overflow_policy() {
            OverflowPolicy::FailAllocation => {
                count_refusal(engine, usable);
                return p;
            }
            OverflowPolicy::FallBack => {
                count_breach(engine, usable);
                fell_back = true;
            }
        }
    }
    if t.is_home(engine) {
        if !fell_back {
            // SAFETY: `place_due` needs `size > 0`, alignment-only `flags` and the usable
            // size: this function's contract.
            let p = unsafe { place_due(t, engine, size, flags, usable, zero) };
            if !p.is_null() {
                // SAFETY: `account` needs `p` live with `size` and `flags`, not yet charged,
                // and `keep <= size`: just allocated so, and `keep` is 0.
                return unsafe { account(t, p, owner_of(p), size, flags, usable, zero, 0) };
            }
        }
        // SAFETY: `fast_alloc` needs
        // 1. `size > 0`: this function's contract;
        // 2. flags holding at most a power-of-two alignment: this function's contract.
        let p = unsafe { fast_alloc(size, flags, zero) }.cast::<u8>();
        // SAFETY: `placed` needs `p` null, or live with `size` and `flags` and not yet
        // charged: just allocated so; `size > 0` and alignment-only `flags` for its
        // fallback: this function's contract.
        return unsafe { placed(t, p, size, flags, usable, zero, fell_back) };
    }
    // SAFETY: `visit_alloc` needs `size > 0`, alignment-only `flags` and `usable` the block's
    // usable size: this function's contract.
    unsafe { visit_alloc(t, size, flags, usable, zero, fell_back) }
}

/// An engine arena returned null for `engine`: its range is full (or the request is
/// impossible). Serve the block from the engine's fallback arena, or this thread's automatic
/// arena, instead, charged by address, rather than fail an infallible allocation; null only
/// if that fails too. Charged as any new block of its owner (moved to overflow past the
/// limit), unless overflow has already failed to take it (`fell_back`).
///
/// # Safety
/// `size > 0`; `flags` holds only an alignment.
#[cold]
#[inline(never)]
pub(super) unsafe fn failed(
    t: &ThreadState,
    engine: Slot,
    size: usize,
    flags: c_int,
    usable: u64,
    zero: bool,
    fell_back: bool,
) -> *mut u8 {
    if !engine.has_arena() {
        return std::ptr::null_mut();
    }
    // SAFETY: `range_fallback` needs
    // 1. `size > 0` and alignment-only `flags`: this function's contract;
    // 2. an automatic arena: `auto_arena` is the arena jemalloc chose for this thread (or
    //    arena 0), never one of ours.
    let p = unsafe { range_fallback(engine, t.auto_arena(), size, flags, usable, zero) };
    if p.is_null() {
        return p;
    }
    if fell_back {
        charge_where_it_is(t, owner_of(p), usable);
        return p;
    }
    // SAFETY: `account` needs `p` live with `size` and `flags`, not yet charged, and
    // `keep <= size`: just allocated so, and `keep` is 0.
    unsafe { account(t, p, owner_of(p), size, flags, usable, zero, 0) }
}

/// Charges a block just placed in an engine arena off the fast path. After overflow has
/// already failed to take it (`fell_back`, a breach counted), it is charged where it is
/// even past the limit; otherwise as [`account`] decides.
///
/// # Safety
/// `size > 0`; `flags` holds only an alignment; `p` is null, or as for [`account`] with
/// `keep = 0`.
#[inline(always)]
unsafe fn placed(
    t: &ThreadState,
    p: *mut u8,
    size: usize,
    flags: c_int,
    usable: u64,
    zero: bool,
    fell_back: bool,
) -> *mut u8 {
    if p.is_null() {
        // SAFETY: `failed` needs `size > 0` and alignment-only `flags`: this function's
        // contract.
        return unsafe { failed(t, t.current(), size, flags, usable, zero, fell_back) };
    }
    let owner = owner_of(p);
    if fell_back {
        charge_where_it_is(t, owner, usable);
        return p;
    }
    // SAFETY: `account` needs `p` live with `size` and `flags`, not yet charged, and
    // `keep <= size`: this function's contract, and `keep` is 0.
    unsafe { account(t, p, owner, size, flags, usable, zero, 0) }
}

/// An allocation for an engine other than home: that engine's arena (on this thread's
/// node), through this thread's explicit cache for it.
///
/// # Safety
/// `size > 0`; `flags` holds only an alignment; `usable` is the block's usable size.
#[inline(never)]
unsafe fn visit_alloc(
    t: &ThreadState,
    size: usize,
    flags: c_int,
    usable: u64,
    zero: bool,
    fell_back: bool,
) -> *mut u8 {
    count_detached(t);
    let engine = t.current();
    ACTIVE.store(true, Ordering::Relaxed);
    t.note_visit(engine);
    let p = match t.visit_arena(engine) {
        Some(arena) => {
            let zero = if zero { jem::MALLOCX_ZERO } else { 0 };
            let flags = flags | zero | t.cache_flag(engine) | arena.flag();
            // SAFETY: `mallocx` needs
            // 1. `size > 0`: this function's contract;
            // 2. an existing arena in the flags: `visit_arena` returns only arenas created;
            // 3. a cache this thread created, or none: `cache_flag` gives this thread's
            //    explicit cache for the engine, or `MALLOCX_TCACHE_NONE`;
            // 4. a power-of-two alignment: `flags` from `align_flags`.
            unsafe { jem::mallocx(size, flags) }
        }
        None => {
            // The engine arenas could not be created: serve it like home (the block lies
            // outside every range, so it is charged to Unattributed by address).
            UNROUTED.fetch_add(1, Ordering::Relaxed);
            // SAFETY: `fast_alloc` needs `size > 0` and at most an alignment in `flags`:
            // this function's contract.
            unsafe { fast_alloc(size, flags, zero) }
        }
    }
    .cast::<u8>();
    // SAFETY: `placed` needs `size > 0` and alignment-only `flags` (this function's
    // contract), and `p` null or live with them and not yet charged (just allocated so).
    unsafe { placed(t, p, size, flags, usable, zero, fell_back) }
}
