//! The allocator's shared ledger on loom's atomics, for the models in
//! `loom-tests/tests/allocator.rs`. Built only with `RUSTFLAGS="--cfg nodedb_mem_loom"`.
//!
//! [`Ledger`] is one engine's counter with its limit; [`Home`] is one thread's home-path
//! bookkeeping, with jemalloc's two per-thread counters as plain fields. Both run the very
//! functions the allocator runs (`ledger::add_within`, `ledger::settle_home`, `ledger::sub`);
//! only the thread-local glue around them is restated here.

use loom::sync::atomic::{AtomicU64, Ordering};

use crate::accounting::ledger;

/// One engine's ledger.
#[derive(Debug)]
pub struct Ledger {
    charged: AtomicU64,
    peak: AtomicU64,
    limit: u64,
}

impl Ledger {
    /// An empty ledger with `limit`.
    pub fn new(limit: u64) -> Ledger {
        Ledger {
            charged: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            limit,
        }
    }

    /// The bytes charged now.
    pub fn charged(&self) -> u64 {
        self.charged.load(Ordering::Acquire)
    }

    /// The highest value any operation left the ledger at.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    fn saw(&self, now: u64) {
        self.peak.fetch_max(now, Ordering::AcqRel);
    }

    /// A slower path's charge of a block against the limit (`ledger::try_charge`).
    pub fn try_charge(&self, bytes: u64) -> bool {
        match ledger::add_within(&self.charged, bytes, self.limit) {
            Some(now) => {
                self.saw(now);
                true
            }
            None => false,
        }
    }

    /// A slower path's credit of a freed block (`ledger::credit`).
    pub fn credit(&self, bytes: u64) {
        self.saw(ledger::sub(&self.charged, bytes));
    }
}

/// One thread whose home engine keeps `ledger`: what `ThreadState` keeps for it.
#[derive(Debug)]
pub struct Home<'a> {
    ledger: &'a Ledger,
    /// jemalloc's counters of the thread's home bytes.
    allocated: u64,
    deallocated: u64,
    /// What of them is settled.
    settled: (u64, u64),
    headroom: u64,
}

impl<'a> Home<'a> {
    /// A thread that has not settled yet (its home path closed).
    pub fn new(ledger: &'a Ledger) -> Home<'a> {
        Home {
            ledger,
            allocated: 0,
            deallocated: 0,
            settled: (0, 0),
            headroom: 0,
        }
    }

    /// Whether the home path is open: the thread holds headroom.
    pub fn open(&self) -> bool {
        self.headroom > 0
    }

    /// The headroom the thread holds as of its last settlement.
    pub fn headroom(&self) -> u64 {
        self.headroom
    }

    /// A home-path allocation of `bytes` (open path only); jemalloc calls the hook inside the
    /// allocation that takes the thread the bound's interval past its last settlement.
    pub fn alloc(&mut self, bytes: u64) {
        assert!(self.open(), "the home path is closed");
        self.allocated += bytes;
        if self.allocated - self.settled.0 >= crate::accounting::bound::inflight_bound().interval {
            self.settle(true);
        }
    }

    /// A home-path free of `bytes` (of a home block allocated by any thread).
    pub fn free(&mut self, bytes: u64) {
        self.deallocated += bytes;
        if self.deallocated - self.settled.1 >= crate::accounting::bound::inflight_bound().interval
        {
            self.settle(true);
        }
    }

    /// `ThreadState::settle`: the delta since the last settlement, then headroom if `buy`.
    pub fn settle(&mut self, buy: bool) {
        let added = self.allocated - self.settled.0;
        let freed = self.deallocated - self.settled.1;
        self.settled = (self.allocated, self.deallocated);
        let (headroom, now) = ledger::settle_home(
            &self.ledger.charged,
            self.headroom,
            added,
            freed,
            buy,
            self.ledger.limit,
        );
        self.headroom = headroom;
        if let Some(now) = now {
            self.ledger.saw(now);
        }
    }

    /// `flush_thread` / thread exit: settle and give the headroom back.
    pub fn flush(&mut self) {
        self.settle(false);
    }
}
