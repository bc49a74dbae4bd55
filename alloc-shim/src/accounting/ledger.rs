//! The allocator's own ledger: bytes charged to each engine by the global allocator.
//!
//! # Exact by construction
//!
//! jemalloc counts every thread's allocated and deallocated bytes itself. A thread's
//! allocations and frees of its *home* engine's small blocks go straight to jemalloc and are
//! settled into the ledger later, as the net change of those counters (less what the thread's
//! slower paths charged or credited directly), at least every [`Bound::interval`] bytes in
//! either direction. The thread holds *headroom*: bytes charged to its home engine ahead of its
//! allocations (bought against the engine's limit), which its next allocations draw on before
//! anyone counts them. A settlement leaves the ledger alone while the headroom left stays within
//! `headroom_min..=headroom_max`, and otherwise brings it back to `headroom` in one atomic
//! operation, so a thread whose allocations and frees balance never touches the shared
//! counter. Everything else (other engines' blocks, blocks above [`FAST_MAX`](super::bound::FAST_MAX)) is charged and
//! credited when it happens. So for every engine, at every instant,
//!
//! ```text
//! charged = live bytes + Σ threads' (headroom − net home bytes not yet settled)
//!           0 <= headroom − unsettled < headroom_max + interval = batch
//! ```
//!
//! Unsettled home allocations stay below `interval + FAST_MAX + 1 = headroom_min` (jemalloc
//! calls the hook inside the allocation that crosses an interval, and the home path takes
//! nothing larger than [`FAST_MAX`](super::bound::FAST_MAX)), and unsettled frees below `interval`. So the ledger
//! never understates an engine, not even inside an allocation, and since headroom is bought
//! only within the limit, a settlement never takes the ledger past the limit either. A thread
//! only gives back bytes that were charged — its own headroom, or blocks freed — so `charged`
//! can never go below zero or wrap. When every thread has flushed (thread exit or
//! [`flush_thread`](crate::flush_thread)), `charged` equals the live bytes exactly; while
//! threads run it overstates them by less than the bound (`batch`) per thread. The bound is the
//! process's, fixed before any thread holds headroom ([`inflight_bound`]: 64 KiB unless
//! [`INFLIGHT_BOUND_ENV`] says otherwise, up to 4 MiB); every threshold derives from it
//! ([`Bound`]).

use std::sync::atomic::{AtomicU64, Ordering};

use super::bound::inflight_bound;
use super::limits::{self, limit_of, update_over};
use super::sync::Word;
use super::wake;
use crate::id::{ARENA_ENGINES, EngineId, SLOTS, Slot};

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
fn ledger(slot: Slot) -> &'static EngineLedger {
    // A `Slot` is always below `SLOTS`; fall back to the unattributed bucket rather than panic
    // if that were ever broken.
    match LEDGER.get(slot.index()) {
        Some(l) => l,
        None => &LEDGER[Slot::UNATTRIBUTED.index()],
    }
}

#[inline(always)]
pub(crate) fn charge(engine: Slot, bytes: u64) {
    let l = ledger(engine);
    let now = add(&l.charged, bytes);
    charged_to(l, engine, now);
}

/// Adds `bytes` to `w` unconditionally; the new value.
#[inline(always)]
pub(crate) fn add<W: Word>(w: &W, bytes: u64) -> u64 {
    // Sequentially consistent, as every read-modify-write that raises a charge: the wake marks
    // rely on one total order with the background thread's arming (`wake::arm`). It costs what
    // `AcqRel` does on x86 (a locked instruction either way) and on ARMv8.1 (`ldaddal`).
    w.fetch_add(bytes, Ordering::SeqCst).wrapping_add(bytes)
}

/// Takes `bytes` the caller holds (charged before) from `w`; the new value.
#[inline(always)]
pub(crate) fn sub<W: Word>(w: &W, bytes: u64) -> u64 {
    w.fetch_sub(bytes, Ordering::AcqRel).wrapping_sub(bytes)
}

/// Charges `bytes` unless that would take `engine`'s ledger past `limit`, and says whether it
/// did. The check and the charge are one compare-and-swap, so concurrent charges cannot
/// together pass the limit: a ledger charged only through here never exceeds it.
#[inline]
pub(crate) fn try_charge(engine: Slot, bytes: u64, limit: u64) -> bool {
    if limit == u64::MAX {
        charge(engine, bytes);
        return true;
    }
    let l = ledger(engine);
    match add_within(&l.charged, bytes, limit) {
        Some(now) => {
            charged_to(l, engine, now);
            true
        }
        None => {
            if engine.has_arena() {
                update_over(engine, limit);
            }
            false
        }
    }
}

/// Adds `bytes` to `w` unless the sum would pass `limit`: the new value, or `None` (nothing
/// added). One compare-and-swap loop, so concurrent callers cannot together pass the limit.
#[inline]
pub(crate) fn add_within<W: Word>(w: &W, bytes: u64, limit: u64) -> Option<u64> {
    let mut cur = w.load(Ordering::Relaxed);
    loop {
        let now = cur.checked_add(bytes).filter(|&n| n <= limit)?;
        // Sequentially consistent on success: see `add`.
        match w.compare_exchange_weak(cur, now, Ordering::SeqCst, Ordering::Relaxed) {
            Ok(_) => return Some(now),
            Err(actual) => cur = actual,
        }
    }
}

/// What a settlement does, decided from the thread's own figures alone: `held` the headroom it
/// held at the last settlement, `added` and `freed` its home bytes since then, `buy` whether it
/// wants headroom for what follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// The headroom left is within the band: keep it, leave the ledger alone.
    Keep(u64),
    /// Tell the ledger: add `add`, remove `sub`, and charge `want` more as headroom if the
    /// limit allows (see [`settle_within`]).
    Settle { add: u64, sub: u64, want: u64 },
}

/// The settlement rule (see the module docs): keep headroom within
/// `headroom_min..=headroom_max` of the process's [`Bound`] untouched, else settle back to
/// `headroom` (or to nothing, without `buy`).
#[inline]
pub(crate) fn plan(held: u64, added: u64, freed: u64, buy: bool) -> Plan {
    let b = inflight_bound();
    match held.saturating_add(freed).checked_sub(added) {
        Some(left) if buy && (b.headroom_min..=b.headroom_max).contains(&left) => Plan::Keep(left),
        _ => Plan::Settle {
            add: added,
            sub: freed.saturating_add(held),
            want: if buy { b.headroom } else { 0 },
        },
    }
}

/// Applies a [`Plan::Settle`] to `w`: adds `add`, removes `sub`, and adds `want` more if the
/// result stays within `limit`. Returns the new value and whether `want` was added. The
/// settled part goes in even past the limit: those bytes are already allocated, and the
/// headroom held covered them (see the module docs).
#[inline]
pub(crate) fn settle_within<W: Word>(
    w: &W,
    add: u64,
    sub: u64,
    want: u64,
    limit: u64,
) -> (u64, bool) {
    let mut cur = w.load(Ordering::Relaxed);
    loop {
        // `sub` was charged (as headroom, or as blocks now freed): it cannot exceed `cur` plus
        // what is being added; saturate rather than wrap if that were ever broken.
        let settled = cur.saturating_add(add).saturating_sub(sub);
        let (now, bought) = match settled.checked_add(want) {
            Some(n) if n <= limit => (n, true),
            _ => (settled, false),
        };
        // Sequentially consistent on success: see `add`.
        match w.compare_exchange_weak(cur, now, Ordering::SeqCst, Ordering::Relaxed) {
            Ok(_) => return (now, bought),
            Err(actual) => cur = actual,
        }
    }
}

/// A thread's settlement against `w`: decides with [`plan`], applies with [`settle_within`].
/// Returns the headroom the thread holds afterwards, and the ledger's new value if it was
/// touched.
#[inline]
pub(crate) fn settle_home<W: Word>(
    w: &W,
    held: u64,
    added: u64,
    freed: u64,
    buy: bool,
    limit: u64,
) -> (u64, Option<u64>) {
    match plan(held, added, freed, buy) {
        Plan::Keep(left) => (left, None),
        Plan::Settle { add, sub, want } => {
            if add == 0 && sub == 0 && want == 0 {
                return (0, None);
            }
            let (now, bought) = settle_within(w, add, sub, want, limit);
            (if bought { want } else { 0 }, Some(now))
        }
    }
}

/// [`settle_home`] on `engine`'s ledger; returns the headroom the thread holds afterwards.
#[inline]
pub(crate) fn settle(engine: Slot, held: u64, added: u64, freed: u64, buy: bool) -> u64 {
    let l = ledger(engine);
    let limit = limit_of(engine);
    let (headroom, now) = settle_home(&l.charged, held, added, freed, buy, limit);
    if let Some(now) = now {
        charged_to(l, engine, now);
    }
    headroom
}

/// After a charge brought `l` to `now`: the peaks and the over-limit flag.
#[inline(always)]
fn charged_to(l: &EngineLedger, engine: Slot, now: u64) {
    wake::check(engine, now);
    if l.peak.load(Ordering::Relaxed) < now {
        l.peak.fetch_max(now, Ordering::AcqRel);
    }
    if l.window_peak.load(Ordering::Relaxed) < now {
        l.window_peak.fetch_max(now, Ordering::AcqRel);
    }
    if engine.has_arena() {
        update_over(engine, now);
    }
}

/// Gives back `bytes`; the caller holds them (as live bytes of an object being freed, or as
/// its own headroom), so the counter cannot go below zero.
#[inline(always)]
pub(crate) fn credit(engine: Slot, bytes: u64) {
    let now = sub(&ledger(engine).charged, bytes);
    if engine.has_arena() {
        update_over(engine, now);
    }
}

/// Bytes charged to `engine` by the global allocator: its live heap bytes plus, for threads
/// that have not flushed, their headroom less their unsettled home bytes (less than the
/// in-flight bound per thread; see the module docs).
pub fn charged(engine: EngineId) -> u64 {
    ledger(Slot::of(engine)).charged.load(Ordering::Acquire)
}

/// [`charged`] by slot, read in the total order of the charges that raise it (see `add`).
pub(crate) fn charged_seq_cst(slot: Slot) -> u64 {
    ledger(slot).charged.load(Ordering::SeqCst)
}

/// [`charged`] by slot index, for the allocator's limit checks.
#[inline]
pub(crate) fn charged_at(slot: Slot) -> u64 {
    ledger(slot).charged.load(Ordering::Relaxed)
}

/// Bytes of `engine`'s live blocks in its overflow region, exact at every instant (no thread's
/// home is an overflow region, so they are charged and credited as they happen). Zero for
/// `Unattributed`, which never overflows.
pub fn overflow_charged(engine: EngineId) -> u64 {
    match Slot::of(engine).overflow() {
        Some(slot) => ledger(slot).charged.load(Ordering::Acquire),
        None => 0,
    }
}

/// The highest value [`charged`] has reached for `engine`.
pub fn charged_peak(engine: EngineId) -> u64 {
    ledger(Slot::of(engine)).peak.load(Ordering::Acquire)
}

/// The highest value of [`charged`] since the last [`take_window_peak`], without restarting
/// the window.
pub fn window_peak(engine: EngineId) -> u64 {
    let l = ledger(Slot::of(engine));
    let now = l.charged.load(Ordering::Acquire);
    l.window_peak.load(Ordering::Acquire).max(now)
}

/// The highest value of [`charged`] since the previous call, restarting the window at the
/// current value. For rebalancing: "how busy was this engine lately".
pub fn take_window_peak(engine: EngineId) -> u64 {
    let l = ledger(Slot::of(engine));
    let now = l.charged.load(Ordering::Acquire);
    l.window_peak.swap(now, Ordering::AcqRel).max(now)
}

/// Whether charging `bytes` more would take `engine` past its published limit. Only asked for
/// large blocks (at least [`DIRECT_THRESHOLD`](super::bound::DIRECT_THRESHOLD)), before they are placed, so that one
/// block cannot carry an engine far past its limit before the over flag is set; small blocks
/// overshoot by at most a thread's batch.
#[inline]
pub(crate) fn would_cross(engine: Slot, bytes: u64) -> bool {
    let limit = limit_of(engine);
    limit != u64::MAX && charged_at(engine).saturating_add(bytes) > limit
}

/// Sets the limit above which `engine`'s new allocations go to its overflow region (`None`:
/// no limit). The governor publishes each engine's limit here.
pub fn set_overflow_limit(engine: EngineId, limit: Option<u64>) {
    if engine.index() < ARENA_ENGINES {
        limits::publish(Slot::of(engine), limit.unwrap_or(u64::MAX));
        update_over(Slot::of(engine), charged(engine));
    }
}
