//! `realloc` off the home path: the block keeps its owner, moves to the owner's overflow
//! region when it grows past the limit, and leaves a full range as a new block would.

use std::ffi::c_int;

use tikv_jemalloc_sys as jem;

use super::counters::range_fallback;
use super::flags::{align_flags, usable};
use super::place::{charge_where_it_is, count_detached, free_owned, overflow_alloc};
use super::relocate::account;
use super::sample::{after, keep_flags, recorded_due};
use crate::accounting::bound::DIRECT_THRESHOLD;
use crate::accounting::ledger;
use crate::accounting::limits::is_over;
use crate::overflow::{
    OverflowPolicy, count_breach, count_refusal, overflow_arena, overflow_policy, pushout,
};
use crate::profile;
use crate::space::reservation::owner_of;
use crate::thread::ThreadState;

/// Every `realloc` the home path did not take.
///
/// # Safety
/// As for [`GlobalAlloc::realloc`], with `layout`'s size and alignment as `old_size` and
/// `align`.
#[inline(never)]
pub(super) unsafe fn realloc_slow(
    t: &ThreadState,
    ptr: *mut u8,
    old_size: usize,
    align: usize,
    new_size: usize,
) -> *mut u8 {
    let old_usable = usable(old_size, align).unwrap_or(0);
    let Some(new_usable) = usable(new_size, align) else {
        return std::ptr::null_mut();
    };
    let flags = align_flags(new_size, align);
    let old = (old_size, align_flags(old_size, align));
    let began = t.begin_slow();
    // A sampled block keeps its sample through a resize by a draw of its own (see
    // `ThreadState::resample`), or as it was when the size class does not change; a block
    // that keeps it is resized within its owner's fallback arena, one that loses it is placed
    // as any block (out of the fallback range, so its frees take the home path again). If
    // the old block stays (a failed `realloc`), so does its sample.
    let sampled = profile::forget(ptr);
    let kept = sampled.and_then(|s| {
        if new_usable == s.usable {
            Some((s, None))
        } else {
            let was = (u64::from(s.mean), u64::from(s.interval));
            t.resample(new_usable, was).map(|basis| (s, Some(basis)))
        }
    });
    // An unsampled block whose resize the clock is about to choose is resized into its
    // owner's fallback arena at once (see `place_due`), not moved there after.
    let owner = owner_of(ptr);
    let due = if sampled.is_none() && t.is_home(owner) {
        t.sample_due(new_usable)
    } else {
        None
    };
    let keep = match (kept, due) {
        (Some((s, _)), _) => keep_flags(s.owner),
        (None, Some(_)) => keep_flags(owner).filter(|_| owner.has_arena()),
        (None, None) => None,
    };
    // SAFETY: `realloc` needs
    // 1. `ptr` live, from this allocator, with size `old.0` and alignment flags `old.1`:
    //    this function's contract, and `align_flags` is what it was allocated with;
    // 2. `new_size > 0`: this function's contract;
    // 3. `flags` the new size's alignment flags and the usable sizes of both layouts:
    //    computed just above.
    let q = unsafe { realloc(t, ptr, old, new_size, flags, keep, old_usable, new_usable) };
    t.end_slow(began);
    if let Some(s) = sampled {
        // The draw stood for this resize: a gate the clock opened during it is closed.
        t.take_sample();
        if q.is_null() {
            profile::moved(s, s.owner, ptr, s.usable, None);
        } else if let Some((s, basis)) = kept
            && profile::is_sampled_place(q)
        {
            profile::moved(s, owner_of(q), q, new_usable, basis);
        }
    } else if let Some(basis) = due
        && !q.is_null()
        && profile::is_sampled_place(q)
    {
        recorded_due(t, q, new_usable, basis);
    }
    // SAFETY: `after` needs `q` null or live with `new_size` and `flags`, of `new_usable`
    // bytes, its first `new_size` bytes kept: the block `realloc` returned.
    unsafe { after(t, q, new_size, flags, new_usable, false, new_size) }
}

/// Resizes a block. `old` is its size and alignment flags, `new_size`/`flags` the new
/// size and its alignment flags; `keep`, the arena and cache flags to resize it with when it
/// must stay where it is (a sampled block in its owner's fallback arena).
///
/// # Safety
/// `ptr` is a live block of this allocator allocated with size `old.0` and alignment flags
/// `old.1`; `new_size > 0`; `flags` holds only the new size's alignment; `keep` names an
/// existing arena and no cache, if anything; `old_usable` and `new_usable` are the usable
/// sizes of the old and new layouts.
#[inline(never)]
#[expect(clippy::too_many_arguments, reason = "the block's whole description")]
unsafe fn realloc(
    t: &ThreadState,
    ptr: *mut u8,
    old: (usize, c_int),
    new_size: usize,
    flags: c_int,
    keep: Option<c_int>,
    old_usable: u64,
    new_usable: u64,
) -> *mut u8 {
    count_detached(t);
    let owner = owner_of(ptr);
    let mut fell_back = false;
    // A large block growing past its engine's limit moves to the engine's overflow region,
    // as a new block of that size would go there.
    if new_usable > old_usable
        && new_usable >= DIRECT_THRESHOLD
        && owner.has_arena()
        && (is_over(owner) || ledger::would_cross(owner, new_usable - old_usable))
        && let Some(overflow) = overflow_arena(owner)
    {
        // SAFETY: `overflow_alloc` needs
        // 1. `new_size > 0`: this function's contract;
        // 2. `overflow` the owner's overflow arena: `overflow_arena(owner)` returned it;
        // 3. `flags` holding only an alignment: this function's contract.
        let q = unsafe { overflow_alloc(t, owner, overflow, new_size, flags, false) };
        if !q.is_null() {
            // SAFETY: `ptr` is live for `old.0` bytes (GlobalAlloc contract), `q` is a
            // fresh block of `new_size > old_usable >= old.0` bytes: both ranges are
            // valid and cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(ptr, q, old.0) };
            // SAFETY: `free_owned` needs `ptr` live with size `old.0` and alignment flags
            // `old.1`, of `old_usable` bytes (this function's contract), owned by `owner`
            // (`owner_of` of its address).
            unsafe { free_owned(t, ptr, owner, old.0, old.1, old_usable) };
            // SAFETY: `account` needs `q` live, not yet charged, and `keep <= size`: `q`
            // was just allocated with `new_size` and alignment flags `flags`,
            // and holds `old.0` bytes of data.
            return unsafe {
                account(t, q, owner_of(q), new_size, flags, new_usable, false, old.0)
            };
        }
        match overflow_policy() {
            OverflowPolicy::FailAllocation => {
                count_refusal(owner, new_usable);
                // The old block stays valid, as a failed realloc requires.
                return std::ptr::null_mut();
            }
            OverflowPolicy::FallBack => {
                count_breach(owner, new_usable);
                fell_back = true;
            }
        }
    }
    // The new block keeps the owner: away from home, name the owner's arena explicitly.
    let align = flags;
    let flags = if let Some(keep) = keep {
        flags | keep
    } else if t.is_home(owner) {
        flags
    } else {
        match t.visit_arena(owner) {
            Some(arena) => flags | t.cache_flag(owner) | arena.flag(),
            None => flags | jem::MALLOCX_TCACHE_NONE,
        }
    };
    // SAFETY: `rallocx` needs
    // 1. `ptr` from jemalloc, not yet freed: this function's contract;
    // 2. `new_size > 0`: the same;
    // 3. an existing arena and a cache this thread created, if any: `keep` (this
    //    function's contract), `visit_arena` and `cache_flag` give only those; the alignment
    //    is the new layout's (`align`).
    let q = unsafe { jem::rallocx(ptr.cast(), new_size, flags) }.cast::<u8>();
    if q.is_null() {
        if !owner.has_arena() {
            return q;
        }
        // The owner's range is full: move the block out of it, as a new block would go.
        // SAFETY: `range_fallback` needs `new_size > 0` and alignment-only flags (this
        // function's contract: `align` is the caller's `flags`) and an automatic arena
        // (`auto_arena`: the one jemalloc chose for this thread, or arena 0).
        let q =
            unsafe { range_fallback(owner, t.auto_arena(), new_size, align, new_usable, false) };
        if q.is_null() {
            return q;
        }
        // SAFETY: `copy_nonoverlapping` needs both ranges valid and disjoint: `ptr` is live
        // for `old.0` bytes, `q` a fresh block of `new_size`, and the copy takes the smaller.
        unsafe { std::ptr::copy_nonoverlapping(ptr, q, old.0.min(new_size)) };
        // SAFETY: `free_owned` needs `ptr` live with size `old.0`, alignment flags `old.1`
        // and `old_usable` bytes (this function's contract), owned by `owner` (`owner_of`).
        unsafe { free_owned(t, ptr, owner, old.0, old.1, old_usable) };
        // SAFETY: `charge_resized` needs `q` live with `new_size` and alignment flags
        // `align`, not yet charged, holding `min(old, new)` bytes of data: just allocated so.
        return unsafe { charge_resized(t, q, new_size, align, new_usable, old.0, fell_back) };
    }
    t.on_free(owner, old_usable);
    if owner.is_overflow() && new_usable > old_usable {
        pushout::note(owner.engine().index(), new_usable - old_usable, q);
    }
    // SAFETY: `charge_resized` needs `q` live with `new_size` and alignment flags `align`,
    // not yet charged (the ledger credited the old block's and charged nothing for `q`),
    // holding `min(old, new)` bytes of data: `rallocx` kept them.
    unsafe { charge_resized(t, q, new_size, align, new_usable, old.0, fell_back) }
}

/// Charges the resized block `q`: where it is after overflow already failed to take it
/// (`fell_back`, a breach counted), else as [`account`] decides, keeping its first
/// `min(old_size, new_size)` bytes if it must move.
///
/// # Safety
/// `q` is live with `new_size` bytes asked and alignment flags `align`, of `new_usable`
/// bytes, not yet charged, its first `min(old_size, new_size)` bytes data.
unsafe fn charge_resized(
    t: &ThreadState,
    q: *mut u8,
    new_size: usize,
    align: c_int,
    new_usable: u64,
    old_size: usize,
    fell_back: bool,
) -> *mut u8 {
    if fell_back {
        charge_where_it_is(t, owner_of(q), new_usable);
        return q;
    }
    // SAFETY: `account` needs `q` live with `new_size` and `align`, not yet charged, and
    // `keep <= new_size`: this function's contract, `keep` the smaller size.
    unsafe {
        account(
            t,
            q,
            owner_of(q),
            new_size,
            align,
            new_usable,
            false,
            old_size.min(new_size),
        )
    }
}
