//! The per-engine ledger: lock-free counters that the allocator writes and the governor limits.
//!
//! # Invariants (checked by the loom models and the property test)
//!
//! * `headroom == limit - used - reserved` whenever no operation is in flight (a
//!   [`Headroom`]). Admission is a single compare-and-swap on it that refuses to take it below
//!   the allocator's bytes, so a reservation can never push an engine past its limit, whatever
//!   runs concurrently — including the rebalancer, which changes a limit through the same word.
//! * `usage >= used + reserved` at every instant: increments reach `usage` first and decrements
//!   reach it last, so `usage` never goes below zero and never wraps.
//! * `used` and `reserved` are only decreased by a checked compare-and-swap: releasing more than
//!   was charged is refused with [`MemError::OverRelease`] and changes nothing.
//!
//! The word is signed: implicit charges (allocations that cannot be refused) and a limit
//! shrunk by the rebalancer can take it below zero, which is what "over budget" means.

use crate::EngineId;
use crate::error::{MemError, Result};
use crate::headroom::Headroom;
pub(crate) use crate::headroom::Refused;
use crate::pressure::{PressureLevel, ThresholdsPpm};
use crate::sync::{AtomicU8, AtomicU64, Ordering};

/// One engine's ledger: its limit and what is charged against it.
///
/// Read it through [`MemoryGovernor::budget`](crate::MemoryGovernor::budget); it changes only
/// through the governor (reservations, allocator charges, rebalancing).
#[derive(Debug)]
pub struct Budget {
    engine: EngineId,
    /// The configured budget, the limit this engine returns to when rebalancing gives back
    /// (scaled when the ceiling moves).
    base: AtomicU64,
    /// The limit is never lent below this.
    floor: AtomicU64,
    /// The limit never grows above this.
    cap: AtomicU64,
    /// Current limit (written only under the governor's rebalance lock) and
    /// `limit - used - reserved`, the admission word.
    headroom: Headroom,
    /// Live bytes charged by allocators.
    used: AtomicU64,
    /// Bytes held by outstanding reservations.
    reserved: AtomicU64,
    /// `used + reserved`, raised before and lowered after its parts.
    usage: AtomicU64,
    /// Highest `usage` ever seen.
    peak: AtomicU64,
    /// Highest `usage` since the rebalancer last looked; the idle/busy signal.
    window_peak: AtomicU64,
    /// Highest allocator charge folded in from the windows taken since the engine's arenas'
    /// statistics were last read: what its dirty pages can have grown by since.
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models run standalone governors only")
    )]
    alloc_peak_since_stats: AtomicU64,
    /// Reservations refused by this engine's limit or by the ceiling.
    rejections: AtomicU64,
    /// Releases refused because they exceeded the charge (caller bugs).
    over_releases: AtomicU64,
    /// Last pressure level reported, the state the hysteresis needs.
    level: AtomicU8,
    /// Number of pressure level changes.
    transitions: AtomicU64,
    /// Bytes of limit lent to other engines, and borrowed from them, over the lifetime.
    lent_total: AtomicU64,
    borrowed_total: AtomicU64,
    /// Bytes of limit this engine took back after lending it, and gave back after borrowing
    /// it, over the lifetime.
    taken_back_total: AtomicU64,
    returned_total: AtomicU64,
    /// Rebalancing moves that changed this engine's limit.
    moves: AtomicU64,
    /// Whether the global allocator's ledger for this engine counts as usage (an installed
    /// governor) or not (a standalone one).
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models run standalone governors only")
    )]
    from_allocator: bool,
}

impl Budget {
    pub(crate) fn new(
        engine: EngineId,
        base: u64,
        floor: u64,
        cap: u64,
        from_allocator: bool,
    ) -> Budget {
        Budget {
            engine,
            base: AtomicU64::new(base),
            floor: AtomicU64::new(floor),
            cap: AtomicU64::new(cap),
            headroom: Headroom::new(base),
            used: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            usage: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            window_peak: AtomicU64::new(0),
            alloc_peak_since_stats: AtomicU64::new(0),
            rejections: AtomicU64::new(0),
            over_releases: AtomicU64::new(0),
            level: AtomicU8::new(PressureLevel::Normal as u8),
            transitions: AtomicU64::new(0),
            lent_total: AtomicU64::new(0),
            borrowed_total: AtomicU64::new(0),
            taken_back_total: AtomicU64::new(0),
            returned_total: AtomicU64::new(0),
            moves: AtomicU64::new(0),
            from_allocator,
        }
    }

    /// Bytes the global allocator has charged to this engine (zero for a standalone
    /// governor). Not part of the admission word: it is read at each admission, so an
    /// allocation racing a reservation behaves as if it came just after it — which is allowed,
    /// since allocations cannot be refused anyway.
    #[inline]
    pub(crate) fn allocator_bytes(&self) -> u64 {
        #[cfg(not(nodedb_mem_loom))]
        if self.from_allocator {
            return nodedb_mem_alloc::ctl::ledger::charged(self.engine);
        }
        0
    }

    /// Live bytes charged through [`MemoryGovernor::charge`](crate::MemoryGovernor::charge).
    pub(crate) fn own_used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// `own_used + reserved`.
    pub(crate) fn own_usage(&self) -> u64 {
        self.usage.load(Ordering::Acquire)
    }

    /// The engine this ledger belongs to.
    pub fn engine(&self) -> EngineId {
        self.engine
    }
    /// The configured budget.
    pub fn base(&self) -> u64 {
        self.base.load(Ordering::Acquire)
    }
    /// The guaranteed floor: rebalancing never lends the limit below it.
    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::Acquire)
    }
    /// The cap: rebalancing never raises the limit above it.
    pub fn cap(&self) -> u64 {
        self.cap.load(Ordering::Acquire)
    }
    /// The current limit (the budget, moved by rebalancing between floor and cap).
    pub fn limit(&self) -> u64 {
        self.headroom.limit()
    }
    /// Live bytes charged by allocators: the global allocator's ledger for this engine (when
    /// the governor is installed) plus what was charged with
    /// [`MemoryGovernor::charge`](crate::MemoryGovernor::charge).
    pub fn used(&self) -> u64 {
        self.own_used() + self.allocator_bytes()
    }
    /// Bytes held by outstanding reservations.
    pub fn reserved(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }
    /// Usage: live bytes plus outstanding reservations.
    pub fn usage(&self) -> u64 {
        self.own_usage() + self.allocator_bytes()
    }
    /// What admission would still accept: `limit - usage`, or zero when over the limit.
    pub fn available(&self) -> u64 {
        self.headroom.available(self.allocator_bytes())
    }
    /// The highest usage seen: at every reservation and pressure poll, and for the allocator's
    /// share at every ledger update of the allocator.
    pub fn peak(&self) -> u64 {
        let own = self.peak.load(Ordering::Acquire);
        #[cfg(not(nodedb_mem_loom))]
        if self.from_allocator {
            return own.max(nodedb_mem_alloc::ctl::ledger::charged_peak(self.engine));
        }
        own
    }
    /// Reservations refused, by this engine's limit or by the global ceiling.
    pub fn rejections(&self) -> u64 {
        self.rejections.load(Ordering::Relaxed)
    }
    /// Bytes of this engine currently held in its overflow region (installed governors only).
    pub fn overflow_bytes(&self) -> u64 {
        #[cfg(not(nodedb_mem_loom))]
        if self.from_allocator {
            return nodedb_mem_alloc::ctl::ledger::overflow_charged(self.engine);
        }
        0
    }
    /// Releases refused because they exceeded what was charged.
    pub fn over_releases(&self) -> u64 {
        self.over_releases.load(Ordering::Relaxed)
    }
    /// Number of pressure level changes so far.
    pub fn pressure_transitions(&self) -> u64 {
        self.transitions.load(Ordering::Relaxed)
    }
    /// Total bytes of limit this engine has lent to others.
    pub fn lent_total(&self) -> u64 {
        self.lent_total.load(Ordering::Relaxed)
    }
    /// Total bytes of limit this engine has borrowed from others.
    pub fn borrowed_total(&self) -> u64 {
        self.borrowed_total.load(Ordering::Relaxed)
    }
    /// Total bytes of limit this engine has taken back from borrowers after lending it (when
    /// it became busy again).
    pub fn taken_back_total(&self) -> u64 {
        self.taken_back_total.load(Ordering::Relaxed)
    }
    /// Total bytes of borrowed limit this engine has given back to lenders that took it back.
    pub fn returned_total(&self) -> u64 {
        self.returned_total.load(Ordering::Relaxed)
    }
    /// Rebalancing moves that changed this engine's limit (lending, borrowing, taking back and
    /// giving back each count one).
    pub fn moves(&self) -> u64 {
        self.moves.load(Ordering::Relaxed)
    }

    fn raise_usage(&self, bytes: u64) {
        let now = self.usage.fetch_add(bytes, Ordering::AcqRel) + bytes + self.allocator_bytes();
        raise_max(&self.peak, now);
        raise_max(&self.window_peak, now);
    }

    /// Admission: takes `bytes` of headroom if the limit allows, else reports what the refused
    /// compare-and-swap saw (the caller counts the rejection, unless it is a waiting request's
    /// retry). Follow with [`commit_reservation`](Self::commit_reservation) or
    /// [`cancel_admission`](Self::cancel_admission).
    pub(crate) fn try_admit(&self, bytes: u64) -> std::result::Result<(), Refused> {
        // The only admission decision: what is left must still cover the allocator's bytes.
        self.headroom.take(bytes, self.allocator_bytes())
    }

    /// Turns an admission into a held reservation.
    pub(crate) fn commit_reservation(&self, bytes: u64) {
        self.raise_usage(bytes);
        self.reserved.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Returns the headroom of an admission that will not be committed (the ceiling refused).
    pub(crate) fn cancel_admission(&self, bytes: u64) {
        self.headroom.give(bytes);
    }

    pub(crate) fn count_rejection(&self) {
        self.rejections.fetch_add(1, Ordering::Relaxed);
    }

    /// Gives back `bytes` of an admitted reservation.
    pub(crate) fn release(&self, bytes: u64) -> Result<()> {
        checked_sub(&self.reserved, bytes).map_err(|charged| self.over_release(bytes, charged))?;
        self.usage.fetch_sub(bytes, Ordering::AcqRel);
        self.headroom.give(bytes);
        Ok(())
    }

    /// Charges `bytes` of live memory, unconditionally (allocations cannot be refused here).
    pub(crate) fn charge(&self, bytes: u64) {
        self.headroom.force(bytes);
        self.raise_usage(bytes);
        self.used.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Credits `bytes` of freed memory; refuses, changing nothing, if more than is charged.
    pub(crate) fn credit(&self, bytes: u64) -> Result<()> {
        checked_sub(&self.used, bytes).map_err(|charged| self.over_release(bytes, charged))?;
        self.usage.fetch_sub(bytes, Ordering::AcqRel);
        self.headroom.give(bytes);
        Ok(())
    }

    fn over_release(&self, requested: u64, charged: u64) -> MemError {
        self.over_releases.fetch_add(1, Ordering::Relaxed);
        MemError::OverRelease {
            engine: self.engine,
            requested,
            charged,
        }
    }

    /// Lowers the limit by `bytes` if the engine has that much headroom and stays at or above
    /// its floor. Caller holds the governor's rebalance lock (the only writer of `limit`).
    pub(crate) fn lend(&self, bytes: u64) -> bool {
        let limit = self.limit();
        if limit.saturating_sub(bytes) < self.floor() || bytes > limit {
            return false;
        }
        if !self
            .headroom
            .lower_limit_if_free(bytes, self.allocator_bytes())
        {
            return false;
        }
        self.lent_total.fetch_add(bytes, Ordering::Relaxed);
        self.moves.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Raises the limit by `bytes`. Caller holds the rebalance lock and has checked the cap.
    pub(crate) fn borrow(&self, bytes: u64) {
        debug_assert!(self.limit() + bytes <= self.cap());
        self.raise_limit(bytes);
        self.borrowed_total.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Raises the limit by `bytes` that this engine lent earlier, up to at most its `base`.
    /// Caller holds the rebalance lock.
    pub(crate) fn take_back(&self, bytes: u64) {
        debug_assert!(self.limit() + bytes <= self.base());
        self.raise_limit(bytes);
        self.taken_back_total.fetch_add(bytes, Ordering::Relaxed);
    }

    fn raise_limit(&self, bytes: u64) {
        self.headroom.raise_limit(bytes);
        self.moves.fetch_add(1, Ordering::Relaxed);
    }

    /// Lowers the limit by `bytes` even below current usage (a lender is taking its headroom
    /// back). Caller holds the rebalance lock and keeps the limit at or above `base`.
    pub(crate) fn give_back(&self, bytes: u64) {
        debug_assert!(self.limit() >= self.base() + bytes);
        self.headroom.lower_limit(bytes);
        self.returned_total.fetch_add(bytes, Ordering::Relaxed);
        self.moves.fetch_add(1, Ordering::Relaxed);
    }

    /// Sets the budget, floor and cap for a moved ceiling, and the limit to the new budget
    /// (through the admission word, which goes below zero where usage is above it: the
    /// engine is then over its limit). Returns the old limit. Caller holds the rebalance lock
    /// (the only writer of `limit`); `floor <= base <= cap`.
    pub(crate) fn reset_for_ceiling(&self, base: u64, floor: u64, cap: u64) -> u64 {
        debug_assert!(floor <= base && base <= cap);
        self.base.store(base, Ordering::Release);
        self.floor.store(floor, Ordering::Release);
        self.cap.store(cap, Ordering::Release);
        let old = self.headroom.set_limit(base);
        if old != base {
            self.moves.fetch_add(1, Ordering::Relaxed);
        }
        old
    }

    /// Returns the highest usage since the last call and starts a new window at current usage.
    pub(crate) fn take_window_peak(&self) -> u64 {
        let usage = self.usage();
        let own = self.window_peak.swap(usage, Ordering::AcqRel).max(usage);
        #[cfg(not(nodedb_mem_loom))]
        if self.from_allocator {
            let alloc = nodedb_mem_alloc::ctl::ledger::take_window_peak(self.engine);
            raise_max(&self.alloc_peak_since_stats, alloc);
            return own.max(alloc + self.reserved());
        }
        own
    }

    /// The highest allocator charge since [`restart_stats_window`](Self::restart_stats_window),
    /// over the windows rebalancing took and the one still open.
    #[cfg(not(nodedb_mem_loom))]
    pub(crate) fn alloc_peak_since_stats(&self) -> u64 {
        self.alloc_peak_since_stats
            .load(Ordering::Acquire)
            .max(nodedb_mem_alloc::ctl::ledger::window_peak(self.engine))
    }

    /// Starts the window of [`alloc_peak_since_stats`](Self::alloc_peak_since_stats) at `now`.
    #[cfg(not(nodedb_mem_loom))]
    pub(crate) fn restart_stats_window(&self, now: u64) {
        self.alloc_peak_since_stats.store(now, Ordering::Release);
    }

    /// Re-evaluates the pressure level with hysteresis; returns `(old, new)` when it changed.
    pub(crate) fn update_pressure(
        &self,
        thresholds: &ThresholdsPpm,
    ) -> (PressureLevel, Option<PressureLevel>) {
        let usage = self.usage() + self.overflow_bytes();
        let limit = self.limit();
        update_level(&self.level, &self.transitions, thresholds, usage, limit)
    }

    /// `headroom` as stored, for consistency checks.
    pub(crate) fn raw_headroom(&self) -> i64 {
        self.headroom.raw()
    }
}

/// Moves `level` to what `usage`/`limit` says, with hysteresis, by compare-and-swap so
/// concurrent pollers agree on one transition. Returns the new level, and the old one when it
/// changed.
pub(crate) fn update_level(
    level: &AtomicU8,
    transitions: &AtomicU64,
    thresholds: &ThresholdsPpm,
    usage: u64,
    limit: u64,
) -> (PressureLevel, Option<PressureLevel>) {
    update_level_at_least(
        level,
        transitions,
        thresholds,
        usage,
        limit,
        PressureLevel::Normal,
    )
}

/// [`update_level`], never below `floor` (a level known from elsewhere: the kernel's).
pub(crate) fn update_level_at_least(
    level: &AtomicU8,
    transitions: &AtomicU64,
    thresholds: &ThresholdsPpm,
    usage: u64,
    limit: u64,
    floor: PressureLevel,
) -> (PressureLevel, Option<PressureLevel>) {
    let mut cur = level.load(Ordering::Acquire);
    loop {
        let next = thresholds
            .level(usage, limit, PressureLevel::from_u8(cur))
            .max(floor);
        if next as u8 == cur {
            return (next, None);
        }
        match level.compare_exchange_weak(cur, next as u8, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                transitions.fetch_add(1, Ordering::Relaxed);
                return (next, Some(PressureLevel::from_u8(cur)));
            }
            Err(seen) => cur = seen,
        }
    }
}

/// `max.fetch_max(value)`, skipping the read-modify-write (and the cache-line ownership it
/// takes) when a plain load already shows a value at least as high. Maxima only grow, so a
/// stale load can only make us do the RMW, never skip a needed one.
#[inline]
pub(crate) fn raise_max(max: &AtomicU64, value: u64) {
    if max.load(Ordering::Acquire) < value {
        max.fetch_max(value, Ordering::AcqRel);
    }
}

/// Subtracts `bytes` from `counter` unless that would go below zero; on refusal returns the
/// value seen and changes nothing.
pub(crate) fn checked_sub(counter: &AtomicU64, bytes: u64) -> std::result::Result<(), u64> {
    let mut cur = counter.load(Ordering::Acquire);
    loop {
        let Some(next) = cur.checked_sub(bytes) else {
            return Err(cur);
        };
        match counter.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(()),
            Err(seen) => cur = seen,
        }
    }
}

#[cfg(all(test, not(nodedb_mem_loom)))]
mod tests {
    use super::*;

    fn budget(limit: u64) -> Budget {
        Budget::new(EngineId::Query, limit, limit / 2, limit * 2, false)
    }

    impl Budget {
        fn try_reserve(&self, bytes: u64) -> std::result::Result<(), Refused> {
            self.try_admit(bytes)
                .inspect_err(|_| self.count_rejection())?;
            self.commit_reservation(bytes);
            Ok(())
        }
    }

    fn assert_consistent(b: &Budget) {
        assert_eq!(b.usage(), b.used() + b.reserved());
        assert_eq!(
            i128::from(b.raw_headroom()),
            i128::from(b.limit()) - i128::from(b.usage())
        );
    }

    #[test]
    fn reserve_admits_up_to_the_limit_exactly() {
        let b = budget(1000);
        assert!(b.try_reserve(600).is_ok());
        assert!(b.try_reserve(400).is_ok());
        let r = b.try_reserve(1).unwrap_err();
        assert_eq!((r.usage, r.limit), (1000, 1000));
        assert_eq!(b.rejections(), 1);
        assert_eq!(b.available(), 0);
        assert_eq!(b.peak(), 1000);
        b.release(1000).unwrap();
        assert_eq!(b.usage(), 0);
        assert_eq!(b.peak(), 1000);
        assert_consistent(&b);
    }

    #[test]
    fn over_release_is_refused_and_changes_nothing() {
        let b = budget(1000);
        b.try_reserve(10).unwrap();
        b.charge(20);
        let e = b.release(11).unwrap_err();
        assert!(matches!(
            e,
            MemError::OverRelease {
                engine: EngineId::Query,
                requested: 11,
                charged: 10
            }
        ));
        let e = b.credit(21).unwrap_err();
        assert!(matches!(
            e,
            MemError::OverRelease {
                requested: 21,
                charged: 20,
                ..
            }
        ));
        assert_eq!((b.used(), b.reserved(), b.usage()), (20, 10, 30));
        assert_eq!(b.over_releases(), 2);
        assert_consistent(&b);
    }

    #[test]
    fn charges_may_exceed_the_limit_and_then_block_reservations() {
        let b = budget(100);
        b.charge(150);
        assert_eq!(b.available(), 0);
        assert_eq!(b.raw_headroom(), -50);
        let r = b.try_reserve(1).unwrap_err();
        assert_eq!((r.usage, r.limit), (150, 100));
        b.credit(150).unwrap();
        assert!(b.try_reserve(100).is_ok());
        assert_consistent(&b);
    }

    #[test]
    fn lending_respects_headroom_and_floor() {
        let b = budget(1000); // floor 500
        b.try_reserve(300).unwrap();
        assert!(!b.lend(501), "would go below the floor");
        assert!(b.lend(500));
        assert_eq!(b.limit(), 500);
        assert!(!b.lend(1));
        b.borrow(500);
        assert_eq!(b.limit(), 1000);
        assert_consistent(&b);
        let b = budget(1000);
        b.try_reserve(900).unwrap();
        assert!(!b.lend(200), "only 100 of headroom");
        assert_eq!(b.limit(), 1000);
        assert_consistent(&b);
    }

    #[test]
    fn window_peak_restarts_at_current_usage() {
        let b = budget(1000);
        b.try_reserve(700).unwrap();
        b.release(600).unwrap();
        assert_eq!(b.take_window_peak(), 700);
        assert_eq!(b.take_window_peak(), 100);
    }
}
