//! Holding resident memory under a target where overflow grows, not where it is sampled.
//!
//! Overflow pages are file pages mapped `MAP_SHARED`: resident (and charged to a memory
//! cgroup) until something pushes them out. A sampler every 50–100 ms lets a thread that
//! allocates ~1 GiB/s add 50–100 MiB between two samples. So the thread that allocates in
//! overflow checks, every step of bytes it places there ([`resident_target`]), the process's
//! resident memory (`/proc/self/statm`, one `pread` on a descriptor opened once); when it is
//! within two such
//! steps of the target, it pushes overflow pages out itself ([`OverflowRegion::push_out`]:
//! unmapped, written back, dropped from the page cache) until resident memory is four steps
//! under the target. Pages are taken in address order from a clock hand per region that wraps
//! around, so what was pushed out longest ago is looked at last; the block being allocated is
//! never pushed out. Every allocating thread that finds resident memory near the target does
//! this work, so an engine filling overflow faster than pages can be written back is slowed to
//! the disk's pace instead of passing the ceiling. Other engines' regions are swept too if the allocating engine's own
//! region cannot free enough.
//!
//! Everything here is system calls and atomics: nothing allocates or locks (concurrent pushers
//! claim disjoint spans), so it can run on the allocation path.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::backing::region_of as overflow_region_of;
use crate::id::{ARENA_ENGINES, EngineId};
use crate::sys::resident;

/// The resident target in bytes (`u64::MAX`: none, no inline push-out).
static TARGET: AtomicU64 = AtomicU64::new(u64::MAX);
/// Bytes placed in overflow between two checks of resident memory.
static STEP: AtomicU64 = AtomicU64::new(8 << 20);
/// Bytes each engine placed in overflow since its last check.
static SINCE: [AtomicU64; ARENA_ENGINES] = [const { AtomicU64::new(0) }; ARENA_ENGINES];
/// Each region's clock hand: the offset its next push-out starts at.
static HAND: [AtomicUsize; ARENA_ENGINES] = [const { AtomicUsize::new(0) }; ARENA_ENGINES];

static CHECKS: AtomicU64 = AtomicU64::new(0);
static CALLS: [AtomicU64; ARENA_ENGINES] = [const { AtomicU64::new(0) }; ARENA_ENGINES];
static BYTES: [AtomicU64; ARENA_ENGINES] = [const { AtomicU64::new(0) }; ARENA_ENGINES];
static NANOS: [AtomicU64; ARENA_ENGINES] = [const { AtomicU64::new(0) }; ARENA_ENGINES];
static FAILURES: AtomicU64 = AtomicU64::new(0);

/// Sets the resident memory the allocator holds the process under by pushing overflow out
/// (`None`: no inline push-out), and the overflow bytes between two checks of resident memory.
/// The governor sets `ceiling - rss_margin` and a quarter of the margin (within 1–16 MiB).
pub fn set_resident_target(target: Option<u64>, step: u64) {
    STEP.store(step.clamp(1 << 20, 16 << 20), Ordering::Relaxed);
    TARGET.store(target.unwrap_or(u64::MAX), Ordering::Relaxed);
}

/// The resident target and step set by [`set_resident_target`].
pub fn resident_target() -> (Option<u64>, u64) {
    let t = TARGET.load(Ordering::Relaxed);
    ((t != u64::MAX).then_some(t), STEP.load(Ordering::Relaxed))
}

/// The push-out figures of one engine's overflow region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PushOutStats {
    /// Spans pushed out (each one `madvise` + `sync_file_range` + `posix_fadvise`).
    pub calls: u64,
    /// Bytes of the region swept (resident or not).
    pub bytes: u64,
    /// Time spent in those calls, in nanoseconds.
    pub nanos: u64,
}

/// The push-out figures of `engine`'s overflow region (zero for `Unattributed`).
pub fn push_out_stats(engine: EngineId) -> PushOutStats {
    let e = engine.index();
    if e >= ARENA_ENGINES {
        return PushOutStats::default();
    }
    PushOutStats {
        calls: CALLS[e].load(Ordering::Relaxed),
        bytes: BYTES[e].load(Ordering::Relaxed),
        nanos: NANOS[e].load(Ordering::Relaxed),
    }
}

/// Checks of resident memory made on the allocation path, and push-outs that failed.
pub fn push_out_checks() -> (u64, u64) {
    (
        CHECKS.load(Ordering::Relaxed),
        FAILURES.load(Ordering::Relaxed),
    )
}

/// Called after `engine` placed `bytes` in its overflow region at `[keep, keep + bytes)`.
#[inline]
pub(crate) fn note(engine: usize, bytes: u64, keep: *const u8) {
    let Some(since) = SINCE.get(engine) else {
        return;
    };
    if TARGET.load(Ordering::Relaxed) == u64::MAX {
        return;
    }
    let step = STEP.load(Ordering::Relaxed);
    let s = since.fetch_add(bytes, Ordering::Relaxed) + bytes;
    // The thread whose block takes the count past a step checks; the count restarts.
    if s >= step && since.swap(0, Ordering::Relaxed) >= step {
        check(engine, keep, bytes as usize);
    }
}

#[cold]
#[inline(never)]
fn check(engine: usize, keep: *const u8, keep_len: usize) {
    CHECKS.fetch_add(1, Ordering::Relaxed);
    let target = TARGET.load(Ordering::Relaxed);
    let step = STEP.load(Ordering::Relaxed);
    let Some(rss) = resident() else {
        return;
    };
    if rss.saturating_add(2 * step) < target {
        return;
    }
    // Every thread that finds resident memory near the target pushes out: each claims its own
    // spans, so two allocating threads push out twice as fast, and an engine allocating faster
    // than one thread can push out is slowed down by the work rather than let through.
    let goal = target.saturating_sub(4 * step);
    let keep = (keep as usize, keep_len);
    if sweep(engine, goal, keep) {
        return;
    }
    for other in (0..ARENA_ENGINES).filter(|&o| o != engine) {
        if sweep(other, goal, keep) {
            return;
        }
    }
}

/// Pushes out `engine`'s region, one step at a time from its hand, until resident memory is at
/// most `goal` or as much as the region holds was swept. Skips the pages of `keep` (address,
/// length). Concurrent callers claim disjoint spans (the hand advances by `fetch_add`).
fn sweep(engine: usize, goal: u64, keep: (usize, usize)) -> bool {
    let Some(region) = overflow_region_of(engine) else {
        return false;
    };
    let len = region.len();
    if len == 0 {
        return false;
    }
    let step = (STEP.load(Ordering::Relaxed) as usize).next_multiple_of(4096);
    let base = region.base() as usize;
    let (keep_lo, keep_hi) = (
        keep.0.saturating_sub(base) & !4095,
        keep.0
            .saturating_add(keep.1)
            .saturating_sub(base)
            .next_multiple_of(4096),
    );
    let mut swept = 0usize;
    while swept < len {
        // The hand only grows; its position in the region is taken modulo the region's length
        // (which only grows too), page-aligned: a clock over the region.
        let at = (HAND[engine].fetch_add(step, Ordering::Relaxed) % len) & !4095;
        let end = (at + step).min(len);
        let start_ns = now_ns();
        for (lo, hi) in without(at, end, keep_lo, keep_hi) {
            if region.push_out(lo, hi - lo).is_err() {
                FAILURES.fetch_add(1, Ordering::Relaxed);
            }
        }
        CALLS[engine].fetch_add(1, Ordering::Relaxed);
        BYTES[engine].fetch_add((end - at) as u64, Ordering::Relaxed);
        NANOS[engine].fetch_add(now_ns().saturating_sub(start_ns), Ordering::Relaxed);
        swept += end - at;
        if resident().is_none_or(|rss| rss <= goal) {
            return true;
        }
    }
    false
}

/// `[lo, hi)` minus `[cut_lo, cut_hi)`: up to two spans (empty ones have `lo == hi`).
fn without(
    lo: usize,
    hi: usize,
    cut_lo: usize,
    cut_hi: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let first = (lo, hi.min(cut_lo).max(lo));
    let second = (lo.max(cut_hi).min(hi), hi);
    [first, second].into_iter().filter(|(a, b)| a < b)
}

fn now_ns() -> u64 {
    // SAFETY: an all-zero timespec is valid for clock_gettime to fill.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock and a valid timespec to write (a vDSO call).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_without_a_cut() {
        let v = |lo, hi, a, b| without(lo, hi, a, b).collect::<Vec<_>>();
        assert_eq!(v(0, 100, 200, 300), vec![(0, 100)]);
        assert_eq!(v(0, 100, 40, 60), vec![(0, 40), (60, 100)]);
        assert_eq!(v(0, 100, 0, 100), vec![]);
        assert_eq!(v(0, 100, 50, 150), vec![(0, 50)]);
        assert_eq!(v(100, 200, 50, 150), vec![(150, 200)]);
        assert_eq!(v(100, 200, 0, 0), vec![(100, 200)]);
    }
}
