//! A block whose owner's limit refuses it: moved to the owner's overflow region, or kept past
//! the limit as a breach, or refused, as the overflow policy says.

use std::ffi::c_int;

use tikv_jemalloc_sys as jem;

use super::place::{free_cache, overflow_alloc};
use crate::accounting::ledger;
use crate::id::Slot;
use crate::overflow::{
    OverflowPolicy, count_breach, count_refusal, overflow_arena, overflow_policy,
};
use crate::space::reservation::owner_of;
use crate::thread::ThreadState;

/// Charges a block just placed at `p` (`size` bytes asked, `usable` bytes, alignment flags
/// `flags`, owned by `owner`, its first `keep` bytes data) and returns where it lives: `p`,
/// or, when the owner's limit refuses the charge, a block in the owner's overflow region.
///
/// # Safety
/// `p` is a live block of this allocator with exactly that size and alignment, not yet
/// charged, and `keep <= size`.
#[inline(always)]
#[expect(
    clippy::too_many_arguments,
    reason = "the block's whole description, on the hot path"
)]
pub(super) unsafe fn account(
    t: &ThreadState,
    p: *mut u8,
    owner: Slot,
    size: usize,
    flags: c_int,
    usable: u64,
    zero: bool,
    keep: usize,
) -> *mut u8 {
    if t.on_alloc(owner, usable) {
        return p;
    }
    // SAFETY: `relocate` has `account`'s contract: this function's, passed on.
    unsafe { relocate(t, p, owner, size, flags, usable, zero, keep) }
}

/// The owner's limit refused a block just placed in its arena: move it to the owner's
/// overflow region (or, where overflow cannot take it, keep it and count a breach; under
/// `FailAllocation`, free it and fail, unless it already holds data).
///
/// # Safety
/// As for [`account`].
#[cold]
#[inline(never)]
#[expect(clippy::too_many_arguments, reason = "as for `account`")]
unsafe fn relocate(
    t: &ThreadState,
    p: *mut u8,
    owner: Slot,
    size: usize,
    flags: c_int,
    usable: u64,
    zero: bool,
    keep: usize,
) -> *mut u8 {
    // The block was never charged: give it back without crediting anything.
    let release = |ptr: *mut u8| {
        let cache = free_cache(t, ptr, owner);
        // SAFETY: `sdallocx` needs
        // 1. `ptr` from jemalloc, not yet freed: `p` (this function's contract), freed once;
        // 2. `size` and its alignment flags: this function's contract;
        // 3. a cache this thread created, none, or the default (0, for home): `free_cache`.
        unsafe { jem::sdallocx(ptr.cast(), size, flags | cache) };
    };
    if owner.has_arena()
        && let Some(overflow) = overflow_arena(owner)
    {
        // SAFETY: `overflow_alloc` needs
        // 1. `size > 0`: `p` is a live block of `size` bytes (this function's contract);
        // 2. `overflow` the owner's overflow arena: `overflow_arena(owner)` returned it;
        // 3. `flags` holding only an alignment: this function's contract.
        let q = unsafe { overflow_alloc(t, owner, overflow, size, flags, zero) };
        if !q.is_null() {
            // SAFETY: `copy_nonoverlapping` needs both ranges valid and disjoint: `p` and
            // `q` are distinct live blocks of at least `size >= keep` bytes.
            unsafe { std::ptr::copy_nonoverlapping(p, q, keep) };
            release(p);
            // Overflow ledgers have no limit: this charge always succeeds.
            if !t.on_alloc(owner_of(q), usable) {
                ledger::charge(owner_of(q), usable);
            }
            return q;
        }
        if keep == 0 && overflow_policy() == OverflowPolicy::FailAllocation {
            count_refusal(owner, usable);
            release(p);
            return std::ptr::null_mut();
        }
    }
    count_breach(owner, usable);
    ledger::charge(owner, usable);
    p
}
