//! The allocator's own ledger: bytes charged to each engine by the global allocator.
//!
//! # Exact by construction
//!
//! Each thread keeps a *prepaid credit* for its home engine: it charges the ledger a chunk
//! ahead of its allocations and draws on it, and gives back what frees push above a bound.
//! Frees of blocks owned by another engine are credited late, in one *pending* batch per
//! thread. So for every engine, at every instant,
//!
//! ```text
//! charged = live bytes + Σ threads' prepaid credit + Σ threads' pending credits
//!           0 <= prepaid <= HOME_MAX,   0 <= pending <= FOREIGN_MAX,   sum <= BATCH
//! ```
//!
//! A thread only ever gives back credit it holds, and a pending credit is for bytes that were
//! charged and are already freed, so `charged` can never go below zero or wrap. When every
//! thread has flushed (thread exit or [`flush_thread`](crate::flush_thread)), `charged` equals
//! the live bytes exactly; while threads run, it overstates them by at most `BATCH` per thread
//! and never understates them.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::EngineId;
use crate::arena::{ARENA_ENGINES, OVERFLOW_SLOT, SLOTS, update_over};

/// The per-thread batch bound: a thread's prepaid credit for its home engine plus its pending
/// credit for other engines' blocks never exceed `BATCH`, so the ledger is never more than
/// `BATCH` bytes per thread above the live bytes, and never below them.
pub const BATCH: u64 = 64 * 1024;

/// Upper bound of a thread's prepaid credit for its home engine.
pub(crate) const HOME_MAX: u64 = 48 * 1024;

/// Upper bound of a thread's pending credit for blocks of other engines it freed.
pub(crate) const FOREIGN_MAX: u64 = BATCH - HOME_MAX;

/// Credit a thread keeps after topping up or giving back: the middle of the band, so a thread
/// oscillating around a boundary does not touch the shared counter on every operation.
pub(crate) const REFILL: u64 = HOME_MAX / 2;

/// Allocations and frees of at least this many bytes update the ledger immediately.
pub const DIRECT_THRESHOLD: u64 = 1 << 20;

#[repr(align(128))]
pub(crate) struct EngineLedger {
    charged: AtomicU64,
    peak: AtomicU64,
    window_peak: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: EngineLedger = EngineLedger {
    charged: AtomicU64::new(0),
    peak: AtomicU64::new(0),
    window_peak: AtomicU64::new(0),
};

/// One ledger per slot: the engines, Unattributed, and each engine's overflow.
static LEDGER: [EngineLedger; SLOTS] = [EMPTY; SLOTS];

#[inline(always)]
fn ledger(engine: usize) -> &'static EngineLedger {
    // `engine` always comes from an `EngineId` or `owner_of`, both `< COUNT`; fall back to the
    // unattributed bucket rather than panic if that were ever broken.
    match LEDGER.get(engine) {
        Some(l) => l,
        None => &LEDGER[EngineId::Unattributed as usize],
    }
}

#[inline(always)]
pub(crate) fn charge(engine: usize, bytes: u64) {
    let l = ledger(engine);
    let now = l
        .charged
        .fetch_add(bytes, Ordering::AcqRel)
        .wrapping_add(bytes);
    charged_to(l, engine, now);
}

/// Charges `bytes` unless that would take `engine`'s ledger past `limit`, and says whether it
/// did. The check and the charge are one compare-and-swap, so concurrent charges cannot
/// together pass the limit: a ledger charged only through here never exceeds it.
#[inline]
pub(crate) fn try_charge(engine: usize, bytes: u64, limit: u64) -> bool {
    if limit == u64::MAX {
        charge(engine, bytes);
        return true;
    }
    let l = ledger(engine);
    let mut cur = l.charged.load(Ordering::Relaxed);
    loop {
        let Some(now) = cur.checked_add(bytes).filter(|&n| n <= limit) else {
            if engine < ARENA_ENGINES {
                update_over(engine, limit);
            }
            return false;
        };
        match l
            .charged
            .compare_exchange_weak(cur, now, Ordering::AcqRel, Ordering::Relaxed)
        {
            Ok(_) => {
                charged_to(l, engine, now);
                return true;
            }
            Err(actual) => cur = actual,
        }
    }
}

/// After a charge brought `l` to `now`: the peaks and the over-limit flag.
#[inline(always)]
fn charged_to(l: &EngineLedger, engine: usize, now: u64) {
    if l.peak.load(Ordering::Relaxed) < now {
        l.peak.fetch_max(now, Ordering::AcqRel);
    }
    if l.window_peak.load(Ordering::Relaxed) < now {
        l.window_peak.fetch_max(now, Ordering::AcqRel);
    }
    if engine < ARENA_ENGINES {
        update_over(engine, now);
    }
}

/// Gives back `bytes`; the caller holds them (as live bytes of an object being freed, or as
/// its own prepaid credit), so the counter cannot go below zero.
#[inline(always)]
pub(crate) fn credit(engine: usize, bytes: u64) {
    let now = ledger(engine)
        .charged
        .fetch_sub(bytes, Ordering::AcqRel)
        .wrapping_sub(bytes);
    if engine < ARENA_ENGINES {
        update_over(engine, now);
    }
}

/// Bytes charged to `engine` by the global allocator: its live heap bytes plus the prepaid
/// credit of threads that have not flushed (at most [`BATCH`] per thread).
pub fn charged(engine: EngineId) -> u64 {
    ledger(engine.index()).charged.load(Ordering::Acquire)
}

/// [`charged`] by slot index, for the allocator's limit checks.
#[inline]
pub(crate) fn charged_at(slot: usize) -> u64 {
    ledger(slot).charged.load(Ordering::Relaxed)
}

/// Bytes of `engine`'s live blocks in its overflow region (plus pending credits of threads
/// that have not flushed, as for [`charged`]). Zero for `Unattributed`, which never overflows.
pub fn overflow_charged(engine: EngineId) -> u64 {
    if engine.index() >= ARENA_ENGINES {
        return 0;
    }
    ledger(OVERFLOW_SLOT + engine.index())
        .charged
        .load(Ordering::Acquire)
}

/// The highest value [`charged`] has reached for `engine`.
pub fn charged_peak(engine: EngineId) -> u64 {
    ledger(engine.index()).peak.load(Ordering::Acquire)
}

/// The highest value of [`charged`] since the previous call, restarting the window at the
/// current value. For rebalancing: "how busy was this engine lately".
pub fn take_window_peak(engine: EngineId) -> u64 {
    let l = ledger(engine.index());
    let now = l.charged.load(Ordering::Acquire);
    l.window_peak.swap(now, Ordering::AcqRel).max(now)
}
