//! Settling: how a thread's home bytes, counted by jemalloc, reach the ledger, and when the
//! home path is open (see `accounting/ledger.rs` for the rule and its bounds).

use super::{Phase, ThreadState, events, exit_flush_alive};
use crate::accounting::bound::inflight_bound;
use crate::accounting::ledger::{self, Plan};
use crate::accounting::limits::limit_of;
use crate::id::Slot;
use crate::space::arenas::settle_layout;
use crate::space::reservation::{Ranges, slot_range};

/// The addresses of `home`'s blocks as `(start, length)` for a wrapping range test: its range,
/// or for `Unattributed` everything outside the ranges (all memory when there are none).
/// Empty (the home path closed for frees) while the layout may still change.
fn home_addresses(home: Slot) -> (usize, usize) {
    if home == Slot::UNATTRIBUTED {
        match slot_range(None) {
            // `p - end < 2^64 - len` (wrapping) holds exactly for `p` outside `[start, end)`.
            Ranges::At(start, len) => (start.wrapping_add(len), len.wrapping_neg()),
            Ranges::None => (0, usize::MAX),
            Ranges::NotYet => (0, 0),
        }
    } else {
        match slot_range(Some(home)) {
            Ranges::At(start, len) => (start, len),
            Ranges::None | Ranges::NotYet => (0, 0),
        }
    }
}

impl ThreadState {
    /// Charges `bytes` of a block owned by `owner`, placed by a slower path (whose jemalloc
    /// bytes are excluded from the home delta), at once. Returns false, charging nothing, when
    /// the charge would take the owner past the limit published for it (see
    /// [`set_overflow_limit`](crate::ctl::ledger::set_overflow_limit)): the caller then moves
    /// the block to overflow.
    #[inline]
    #[must_use]
    pub(crate) fn on_alloc(&self, owner: Slot, bytes: u64) -> bool {
        ledger::try_charge(owner, bytes, limit_of(owner))
    }

    /// Credits `bytes` of a block owned by `owner`, freed by a slower path, at once.
    #[inline]
    pub(crate) fn on_free(&self, owner: Slot, bytes: u64) {
        ledger::credit(owner, bytes);
    }

    /// Makes the thread able to hold unsettled bytes: registers its exit flush, learns where
    /// jemalloc counts its bytes, and registers the process's thread-event hook. Returns false
    /// when the thread is tearing down (it is then detached) or jemalloc cannot count for it:
    /// every operation then charges and credits at once.
    #[cold]
    pub(crate) fn register(&self) -> bool {
        match self.phase.get() {
            Phase::Counting { .. } => return true,
            Phase::Detached => return false,
            Phase::Unregistered => {}
        }
        if !self.exit_flush_registered() {
            return false;
        }
        let Some((a, d)) = events::thread_counters() else {
            return false;
        };
        // Fix the layout before the home path tests addresses against it.
        settle_layout();
        events::ensure_hook();
        self.allocatedp.set(a);
        self.deallocatedp.set(d);
        // Everything jemalloc counted on this thread so far went through slower paths (the
        // home path stays closed until now) and was charged or credited directly.
        let (ra, rd) = self.counters();
        self.excluded[0].set(ra);
        self.excluded[1].set(rd);
        self.settled[0].set(0);
        self.settled[1].set(0);
        self.phase.set(Phase::Counting {
            alloc_armed: false,
            free_armed: false,
        });
        true
    }

    /// Registers the thread's exit flush (before the thread may hold headroom, unsettled bytes
    /// or caches) and says whether that worked; if it has already run, the thread is tearing
    /// down: detach it.
    pub(super) fn exit_flush_registered(&self) -> bool {
        if exit_flush_alive() {
            return true;
        }
        self.detach();
        false
    }

    /// jemalloc's counters for this thread now (zero before registration).
    #[inline(always)]
    pub(super) fn counters(&self) -> (u64, u64) {
        let (a, d) = (self.allocatedp.get(), self.deallocatedp.get());
        if a.is_null() || d.is_null() {
            return (0, 0);
        }
        // SAFETY: both point at this thread's counters in jemalloc's thread-specific data,
        // valid for the thread's whole life (`thread.allocatedp`), written only by jemalloc on
        // this thread, so no other thread races these reads.
        unsafe { (a.read(), d.read()) }
    }

    /// The counters as the home delta sees them: during a slow operation, as they were when it
    /// began (its own bytes are excluded when it ends).
    #[inline]
    fn home_counters(&self) -> (u64, u64) {
        let (a, d) = if self.in_slow.get() {
            (self.slow_start[0].get(), self.slow_start[1].get())
        } else {
            self.counters()
        };
        (
            a.wrapping_sub(self.excluded[0].get()),
            d.wrapping_sub(self.excluded[1].get()),
        )
    }

    /// Begins an operation that charges and credits everything it does directly: its bytes
    /// in jemalloc's counters will be excluded from the home delta. Returns whether it began
    /// one (false inside another, or unregistered, when nothing needs excluding).
    #[inline]
    pub(crate) fn begin_slow(&self) -> bool {
        if self.in_slow.get() || !self.is_registered() {
            return false;
        }
        let (a, d) = self.counters();
        self.slow_start[0].set(a);
        self.slow_start[1].set(d);
        self.in_slow.set(true);
        true
    }

    /// Ends the slow operation begun by [`ThreadState::begin_slow`] (if `began`).
    #[inline]
    pub(crate) fn end_slow(&self, began: bool) {
        if !began {
            return;
        }
        let (a, d) = self.counters();
        let e = &self.excluded;
        e[0].set(
            e[0].get()
                .wrapping_add(a.wrapping_sub(self.slow_start[0].get())),
        );
        e[1].set(
            e[1].get()
                .wrapping_add(d.wrapping_sub(self.slow_start[1].get())),
        );
        self.in_slow.set(false);
    }

    /// Settles the home delta into the ledger and gives back the headroom; with `buy`, charges
    /// fresh headroom if the home engine's limit allows. Then reopens or closes the home path.
    pub(super) fn settle(&self, buy: bool) {
        if !self.is_registered() {
            return;
        }
        let (now, added, freed) = self.unsettled();
        self.mark_settled(now);
        let home = self.home.get();
        let held = self.headroom.replace(0);
        self.headroom
            .set(ledger::settle(home, held, added, freed, buy));
        self.settlements.set(self.settlements.get().wrapping_add(1));
        self.reroute();
    }

    /// Opens each home path whose conditions hold, closes the others.
    #[inline]
    pub(super) fn reroute(&self) {
        let (alloc_armed, free_armed) = match self.phase.get() {
            Phase::Counting {
                alloc_armed,
                free_armed,
            } => (alloc_armed, free_armed),
            Phase::Unregistered | Phase::Detached => (false, false),
        };
        self.fast_open.set(alloc_armed && self.headroom.get() > 0);
        self.update_alloc_limit();
        let (start, len) = if free_armed {
            home_addresses(self.home.get())
        } else {
            (0, 0)
        };
        self.free_start.set(start);
        self.free_len.set(len);
    }

    /// The thread-event hook fired on this thread (see `events.rs`). Most calls find the
    /// headroom left within the band and touch nothing but this thread's state.
    pub(super) fn on_event(&self, is_alloc: bool) {
        let Phase::Counting {
            alloc_armed,
            free_armed,
        } = self.phase.get()
        else {
            return;
        };
        self.events.set(self.events.get().wrapping_add(1));
        let armed = if is_alloc { alloc_armed } else { free_armed };
        if armed && self.headroom.get() > 0 {
            let (now, added, freed) = self.unsettled();
            if let Plan::Keep(left) = ledger::plan(self.headroom.get(), added, freed, true) {
                self.mark_settled(now);
                self.headroom.set(left);
                self.settlements.set(self.settlements.get().wrapping_add(1));
                return;
            }
        }
        self.phase.set(Phase::Counting {
            alloc_armed: alloc_armed || is_alloc,
            free_armed: free_armed || !is_alloc,
        });
        self.settle(true);
    }

    /// The home path's bookkeeping where jemalloc does not (yet) call the hook for this thread:
    /// settles once either counter has moved by the bound's interval since the last
    /// settlement, as the hook would have.
    #[inline]
    pub(crate) fn check(&self) {
        let (_, added, freed) = self.unsettled();
        let interval = inflight_bound().interval;
        if added >= interval || freed >= interval {
            self.settle(true);
        }
    }

    /// The home counters now, and the bytes allocated and freed on the home path since the
    /// last settlement.
    #[inline]
    fn unsettled(&self) -> ((u64, u64), u64, u64) {
        let (a, d) = self.home_counters();
        let added = a.wrapping_sub(self.settled[0].get());
        let freed = d.wrapping_sub(self.settled[1].get());
        ((a, d), added, freed)
    }

    /// Records `now` (from [`ThreadState::unsettled`]) as settled.
    #[inline]
    fn mark_settled(&self, (a, d): (u64, u64)) {
        self.settled[0].set(a);
        self.settled[1].set(d);
    }

    /// Before a home allocation off the fast path: registers the thread if need be and buys
    /// headroom if it has none. Returns whether the allocation may go to jemalloc as a home
    /// allocation (counted, settled later); false when the home engine is at its limit (or the
    /// thread cannot count), so the allocation must be charged directly.
    #[inline]
    pub(crate) fn home_ready(&self) -> bool {
        if !self.register() {
            return false;
        }
        if self.headroom.get() == 0 {
            self.settle(true);
        }
        self.headroom.get() > 0
    }

    /// Settles the home delta and gives the headroom back: afterwards the ledger holds nothing
    /// of this thread's beyond its live blocks.
    pub(crate) fn flush(&self) {
        self.settle(false);
    }
}
