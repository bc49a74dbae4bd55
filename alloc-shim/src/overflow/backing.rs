//! What overflow is made of: whether it is on, each engine's region, and the backing the
//! overflow arenas' extent hooks dispatch to (extents bumped off the region, file blocks
//! allocated as they grow, freed on decommit and allocated again on commit).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};

use super::region::OverflowRegion;
use crate::id::{ARENA_ENGINES, Arena, Node, Slot};
use crate::space::hooks::Backing;

const OFF: u8 = 0;
const ON: u8 = 1;
static STATE: AtomicU8 = AtomicU8::new(OFF);

/// Each engine's region (set once, by `enable_overflow`).
pub(super) static REGIONS: [OnceLock<OverflowRegion>; ARENA_ENGINES] =
    [const { OnceLock::new() }; ARENA_ENGINES];
/// Bump offset of each region.
static NEXT: [AtomicUsize; ARENA_ENGINES] = [const { AtomicUsize::new(0) }; ARENA_ENGINES];
/// Extents the backing could not provide (region full or file growth failed).
static EXTENT_FAILURES: AtomicU64 = AtomicU64::new(0);
/// Whether this process is a child of `fork` of a process that had overflow enabled.
static FORKED: AtomicBool = AtomicBool::new(false);

/// Whether overflow is on (enabled, and not in a child of `fork`).
#[inline]
pub(crate) fn is_on() -> bool {
    STATE.load(Ordering::Acquire) == ON
}

/// Turns overflow on (the regions and arenas exist) or off (a child of `fork`).
pub(super) fn set_on(on: bool) {
    STATE.store(if on { ON } else { OFF }, Ordering::Release);
}

/// Records that this process is a child of `fork`.
pub(super) fn set_forked() {
    FORKED.store(true, Ordering::Relaxed);
}

/// Whether this process is a child of `fork` of a process that had overflow enabled.
pub(crate) fn is_forked() -> bool {
    FORKED.load(Ordering::Relaxed)
}

/// The region of engine index `e` while overflow is on.
pub(crate) fn region_of(e: usize) -> Option<&'static OverflowRegion> {
    if !is_on() {
        return None;
    }
    REGIONS.get(e).and_then(OnceLock::get)
}

/// Extents the backing could not provide.
pub(super) fn extent_failures() -> u64 {
    EXTENT_FAILURES.load(Ordering::Relaxed)
}

/// The backing of every overflow slot.
pub(super) static OVERFLOW_BACKING: Backing = Backing {
    alloc: extent,
    commit,
    decommit,
    // `MADV_FREE` is for private anonymous memory: opt out for the shared file mapping.
    purge_lazy: |_, _, _| false,
    // Opt out: only a punched hole reads back as zeros on a shared file mapping, and a hole in
    // a committed extent would need a block at its next write, which a full disk refuses with
    // a `SIGBUS`. Decommitting (which punches, and has the extent backed again at its next
    // commit) is what jemalloc tries first; the extent stays as it is if that failed.
    purge_forced: |_, _, _| false,
};

/// The region behind overflow slot `slot` (not in a child of `fork`, which has no mapping).
fn region(slot: Slot) -> Option<&'static OverflowRegion> {
    if !slot.is_overflow() || is_forked() {
        return None;
    }
    REGIONS.get(slot.engine().index()).and_then(OnceLock::get)
}

/// A fresh extent bumped off the region, its file grown to back it.
fn extent(slot: Slot, _node: Node, _arena: Arena, size: usize, alignment: usize) -> Option<usize> {
    // The child has no overflow mapping (and must not grow the parent's file).
    let region = region(slot)?;
    let next = NEXT.get(slot.engine().index())?;
    let base = region.base() as usize;
    let mut cur = next.load(Ordering::Relaxed);
    loop {
        let start = (base + cur).next_multiple_of(alignment) - base;
        let end = start.saturating_add(size);
        if end > region.capacity() {
            EXTENT_FAILURES.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match next.compare_exchange_weak(cur, end, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                if region.grow_to(end).is_err() {
                    // The range stays unused (the bump pointer never goes back); the file
                    // could not back it.
                    EXTENT_FAILURES.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                // Fresh file blocks read as zeros and the mapping is readable and writable.
                return Some(base + start);
            }
            Err(seen) => cur = seen,
        }
    }
}

/// The region holding `[at, at + length)` and the span's file offset.
fn span(slot: Slot, at: usize) -> Option<(&'static OverflowRegion, usize)> {
    let region = region(slot)?;
    region
        .contains(at as *const u8)
        .then(|| (region, at - region.base() as usize))
}

/// An extent that was decommitted (its file blocks freed) gets blocks again, or the commit
/// fails (a full disk), so jemalloc never hands out file pages whose first write would need a
/// block the disk no longer has (a `SIGBUS`): it falls back to a new extent, whose growth
/// fails in turn, and the overflow policy decides.
fn commit(slot: Slot, at: usize, length: usize) -> bool {
    span(slot, at).is_some_and(|(region, offset)| region.back(offset, length).is_ok())
}

/// Frees the extent's file blocks (a punched hole reads back as zeros and takes no disk);
/// [`commit`] backs them again before jemalloc reuses them: a purge followed by a full disk
/// gives the overflow policy's answer, never a fault on a hole.
fn decommit(slot: Slot, at: usize, length: usize) -> bool {
    span(slot, at).is_some_and(|(region, offset)| region.punch_hole(offset, length).is_ok())
}
