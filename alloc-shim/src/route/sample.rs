//! Taking a block the sampling clock chose (`thread/sampling.rs`): it moves into its owner's
//! fallback arena, where every free and `realloc` of it, on any thread, takes the slow path
//! (the address is outside every home range and inside the reservation), and is recorded
//! with the calling thread's stack (`profile`). The move keeps the owner (the fallback
//! range's chunks are the owner's) and the usable size (the same size class), so the ledger
//! does not move: the move's two blocks are left out of the thread's home delta.

use std::ffi::c_int;

use tikv_jemalloc_sys as jem;

use crate::id::{Arena, Slot};
use crate::profile;
use crate::space::fallback;
use crate::space::reservation::owner_of;
use crate::thread::ThreadState;
use crate::thread::sampling::{GATE_OPEN, mean_interval};

/// The block at `p` (live, `size` bytes asked with alignment flags `flags`, `usable` bytes,
/// holding `data` bytes the caller wrote or asked to keep) was chosen: moves it into its
/// owner's fallback arena and records it, returning where it now lives; `p` itself (not
/// sampled) where the owner has no fallback arena or the move fails.
///
/// # Safety
/// `p` is a live block of this allocator, allocated with `size` and `flags`, of `usable`
/// bytes, not handed to the program yet unless `data > 0` (then its first `data <= size`
/// bytes are kept); `flags` holds only an alignment.
#[cold]
#[inline(never)]
pub(super) unsafe fn take(
    t: &ThreadState,
    p: *mut u8,
    size: usize,
    flags: c_int,
    usable: u64,
    zero: bool,
    data: usize,
) -> *mut u8 {
    let owner = owner_of(p);
    let mean = mean_interval();
    let interval = t.sample_gap();
    if mean == 0 {
        // Turned off since the gate opened.
        return p;
    }
    if profile::is_sampled_place(p) {
        // Already in the fallback range (a range fallback): sampled where it is.
        profile::record(owner, p, usable, (mean, interval), t.sample_tag());
        return p;
    }
    let Some(arena) = sampling_arena(owner) else {
        return p;
    };
    let before = t.allocated_now();
    // The move is the sampler's, not the program's: its two blocks are left out of the home
    // delta (a settlement between them would charge the new block before the old one is
    // credited, taking the owner past its limit by a block for a moment).
    let began = t.begin_slow();
    // SAFETY: `fallback_alloc` needs `size > 0` (`p` is a live block of `size` bytes),
    // `flags` holding only an alignment (this function's contract) and an existing arena
    // (`sampling_arena`'s, which `fallback::arena` gives only once created).
    let q = unsafe { fallback_alloc(arena, size, flags, zero) };
    if q.is_null() {
        t.end_slow(began);
        return p;
    }
    // SAFETY: `copy_nonoverlapping` needs both ranges valid and disjoint: `p` and `q` are
    // distinct live blocks of at least `size >= data` bytes.
    unsafe { std::ptr::copy_nonoverlapping(p, q, data) };
    // SAFETY: `sdallocx` needs `p` from jemalloc and not yet freed (this function's
    // contract), `size` within its `[requested, usable]` (the size asked), its alignment
    // flags (`flags`); bypassing the cache keeps every cache's blocks its owner's.
    unsafe { jem::sdallocx(p.cast(), size, flags | jem::MALLOCX_TCACHE_NONE) };
    t.end_slow(began);
    // The move's bytes are the sampler's own, not the program's: the clock skips them (else
    // each sample would shorten the wait for the next by its size), and a hook that fired
    // inside them opened no sample.
    t.skip_sampling(before);
    profile::record(owner, q, usable, (mean, interval), t.sample_tag());
    q
}

/// Places a block of `size` bytes (alignment flags `flags`, `usable` bytes) for `engine`,
/// whose allocation the clock is about to choose (see `ThreadState::sample_due`), in the
/// engine's fallback arena at once and records it: moved there after, as smaller blocks
/// are, a large block cost a second block of its size and its pages touched twice (3 % of
/// the query engine's CPU at 4 MiB, most of it the kernel's page faults). Null when no
/// sample is due for it, the engine has no fallback arena, or that arena cannot serve it.
///
/// # Safety
/// `size > 0`; `flags` holds only an alignment; `usable` is the block's usable size.
pub(super) unsafe fn place_due(
    t: &ThreadState,
    engine: Slot,
    size: usize,
    flags: c_int,
    usable: u64,
    zero: bool,
) -> *mut u8 {
    let Some(basis) = t.sample_due(usable) else {
        return std::ptr::null_mut();
    };
    let Some(arena) = sampling_arena(engine) else {
        return std::ptr::null_mut();
    };
    // SAFETY: `fallback_alloc` needs `size > 0` and `flags` holding only an alignment (this
    // function's contract) and an existing arena (`sampling_arena`'s, which
    // `fallback::arena` gives only once created).
    let p = unsafe { fallback_alloc(arena, size, flags, zero) };
    if p.is_null() {
        return p;
    }
    recorded_due(t, p, usable, basis);
    p
}

/// Records the block at `p` (`usable` bytes, just placed in its owner's fallback arena) as
/// the sample the clock chose, by the intervals `basis`; the gate the hook opened inside its
/// allocation is closed, so the block is not taken a second time.
pub(super) fn recorded_due(t: &ThreadState, p: *mut u8, usable: u64, basis: (u64, u64)) {
    t.take_sample();
    profile::record(owner_of(p), p, usable, basis, t.sample_tag());
}

/// The arena samples of `owner` live in: its fallback arena, for an engine with arenas.
fn sampling_arena(owner: Slot) -> Option<Arena> {
    fallback::arena(owner).filter(|_| owner.has_arena())
}

/// A block of `size` bytes (alignment flags `flags`, zeroed if `zero`) from `arena`, a
/// sampling arena, bypassing every cache (so every cache's blocks stay its owner's).
///
/// # Safety
/// `size > 0`; `flags` holds only an alignment; `arena` exists (as every arena
/// `sampling_arena` gives does).
unsafe fn fallback_alloc(arena: Arena, size: usize, flags: c_int, zero: bool) -> *mut u8 {
    let z = if zero { jem::MALLOCX_ZERO } else { 0 };
    // SAFETY: `mallocx` needs
    // 1. `size > 0`: this function's contract;
    // 2. an existing arena: this function's contract;
    // 3. otherwise only an alignment (this function's contract), `MALLOCX_ZERO` and
    //    `MALLOCX_TCACHE_NONE`.
    unsafe { jem::mallocx(size, flags | z | jem::MALLOCX_TCACHE_NONE | arena.flag()) }.cast()
}

/// After an allocation served `p` (`size` bytes asked with alignment flags `flags`, `usable`
/// bytes, `data` of them to keep): where the sampling clock opened this thread's gate during
/// it, takes `p` as the sample and closes the gate.
///
/// # Safety
/// `p` is null, or as for [`take`].
#[inline(always)]
pub(super) unsafe fn after(
    t: &ThreadState,
    p: *mut u8,
    size: usize,
    flags: c_int,
    usable: u64,
    zero: bool,
    data: usize,
) -> *mut u8 {
    if p.is_null() || t.sample_gate() != GATE_OPEN || !t.take_sample() {
        return p;
    }
    // SAFETY: `take` has this function's contract for a non-null `p`.
    unsafe { take(t, p, size, flags, usable, zero, data) }
}

/// Forgets the sample of the block at `ptr`, if it is one, as it is freed.
#[inline(always)]
pub(super) fn forget(ptr: *const u8) {
    let _ = profile::forget(ptr);
}

/// The owner-preserving arena flags that keep a sampled block sampled across a `realloc`:
/// its owner's fallback arena, uncached (`None` without one).
pub(super) fn keep_flags(owner: Slot) -> Option<c_int> {
    fallback::arena(owner).map(|a| a.flag() | jem::MALLOCX_TCACHE_NONE)
}
