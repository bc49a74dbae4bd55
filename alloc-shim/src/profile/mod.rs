//! Heap-profile samples: which live blocks were sampled, by whom (owner by address) and from
//! which call stack. The thread layer's clock decides *when* (`thread/sampling.rs`); routing
//! hands the chosen block here after moving it into its owner's fallback arena, so its free
//! and its `realloc`, on whatever thread, take the slow path, which forgets (or carries) the
//! sample. Nothing here allocates; the tables are fixed (see `table.rs`, `stacks.rs`).
//!
//! A block of `s` usable bytes is sampled with probability about `P(s) = (min(s, I) / I) ·
//! (1 − exp(−max(s, I) / R))` for a mean interval `R` and the thread-event hook's interval `I`
//! (the hook fires on the allocation crossing each `I` bytes; the clock picks one such
//! crossing after an exponential wait of mean `R`): about `s / R` for small blocks, as
//! jemalloc's own sampling. Each sample stands for `s / P(s)` bytes.

mod lock;
pub(crate) mod stacks;
pub(crate) mod table;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::id::Slot;
use crate::space::chunks;
use table::Sample;

static TAKEN: AtomicU64 = AtomicU64::new(0);
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The calling thread's stack now, innermost first, at most [`stacks::DEPTH`] frames.
#[inline(never)]
fn capture(out: &mut [usize; stacks::DEPTH]) -> usize {
    let mut n = 0;
    // SAFETY: `trace_unsynchronized` requires that no other trace runs unsynchronised on
    // platforms whose unwinder is not thread-safe; on Linux it uses `_Unwind_Backtrace`,
    // which is. The closure only stores addresses into `out` (no allocation, no panic).
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            if let Some(slot) = out.get_mut(n) {
                *slot = frame.ip() as usize;
                n += 1;
            }
            n < stacks::DEPTH
        });
    }
    n
}

fn saturate(x: u64) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

/// Records the block at `ptr` (owned by `owner`, `usable` bytes), sampled now at mean
/// interval `mean` with hook interval `interval`, with the calling thread's stack.
pub(crate) fn record(
    owner: Slot,
    ptr: *const u8,
    usable: u64,
    (mean, interval): (u64, u64),
    tag: u64,
) {
    let mut frames = [0usize; stacks::DEPTH];
    let n = capture(&mut frames);
    let stack = stacks::intern(&frames[..n]);
    keep(Sample {
        ptr: ptr as usize,
        usable,
        mean: saturate(mean),
        interval: saturate(interval),
        stack,
        owner,
        tag,
    });
}

fn keep(sample: Sample) {
    if table::insert(sample) {
        TAKEN.fetch_add(1, Ordering::Relaxed);
    } else {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether a block at `ptr` is where samples live (the fallback range).
#[inline]
pub(crate) fn is_sampled_place(ptr: *const u8) -> bool {
    chunks::contains(ptr)
}

/// Forgets the sample of the block at `ptr` if it is one (it is being freed or moved);
/// the sample. Only blocks in the fallback range can be samples.
#[inline]
pub(crate) fn forget(ptr: *const u8) -> Option<Sample> {
    if !chunks::contains(ptr) {
        return None;
    }
    table::remove(ptr as usize)
}

/// A sampled block moved to `ptr` with `usable` bytes (a `realloc`): the same stack and
/// tag, the new place and size, and the mean and hook intervals it was kept by (`None`: as
/// before).
pub(crate) fn moved(
    old: Sample,
    owner: Slot,
    ptr: *const u8,
    usable: u64,
    basis: Option<(u64, u64)>,
) {
    let (mean, interval) = match basis {
        Some((mean, interval)) => (saturate(mean), saturate(interval)),
        None => (old.mean, old.interval),
    };
    keep(Sample {
        ptr: ptr as usize,
        usable,
        owner,
        mean,
        interval,
        ..old
    });
}

/// Samples taken and dropped (the table was full) since the process started.
pub(crate) fn counts() -> (u64, u64) {
    (
        TAKEN.load(Ordering::Relaxed),
        DROPPED.load(Ordering::Relaxed),
    )
}

/// Registers, once, `fork` handlers that hold the sampler's locks across the call: a child
/// must not inherit a lock another thread of the parent held (that thread does not exist
/// there, so its first free of a sampled block would spin for ever). The threads that hold
/// one never allocate or fork while holding it, and each holds one at a time, so taking them
/// all, in order, cannot deadlock.
pub(crate) fn fork_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: the three handlers are `extern "C" fn()`s that live as long as the process.
        unsafe { libc::pthread_atfork(Some(before_fork), Some(after_fork), Some(after_fork)) };
    });
}

/// # Safety
/// Called by the C library only, in the thread calling `fork`, before it forks.
unsafe extern "C" fn before_fork() {
    stacks::lock();
    table::lock_all();
}

/// # Safety
/// Called by the C library only, after `fork`, in the parent and in the child, each time
/// after [`before_fork`] took the locks.
unsafe extern "C" fn after_fork() {
    table::unlock_all();
    stacks::unlock();
}

/// Holds every lock for `hold` (see `ctl::profile::hold_sampler_locks`).
#[cfg(feature = "testing")]
pub(crate) fn hold_locks(hold: std::time::Duration) {
    stacks::lock();
    table::lock_all();
    std::thread::sleep(hold);
    table::unlock_all();
    stacks::unlock();
}
