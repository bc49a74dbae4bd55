//! Loom models of the ledger, reservations, pressure and rebalancing, through the public API.
//!
//! Run (see docs/testing.md):
//! `RUSTFLAGS="--cfg nodedb_mem_loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p nodedb-mem-loom-tests --release`
#![cfg(nodedb_mem_loom)]

use loom::thread;
use nodedb_mem::{EngineId, MemoryGovernor, PressureLevel};
use nodedb_mem_loom_tests::{MIB, governor as gov, model};

#[test]
fn racing_reservations_never_exceed_the_limit() {
    model(|| {
        let gov = gov();
        let spawn = |g: &MemoryGovernor| {
            let g = g.clone();
            thread::spawn(move || g.reserve(EngineId::Query, 3 * MIB).ok())
        };
        let (a, b) = (spawn(&gov), spawn(&gov));
        let (a, b) = (a.join().unwrap(), b.join().unwrap());
        // 3 + 3 > 4: exactly one wins, and usage never passed the limit.
        assert!(a.is_some() != b.is_some());
        assert_eq!(gov.usage(EngineId::Query), 3 * MIB);
        assert!(gov.budget(EngineId::Query).peak() <= 4 * MIB);
        assert_eq!(gov.budget(EngineId::Query).rejections(), 1);
        drop((a, b));
        assert_eq!(gov.usage(EngineId::Query), 0);
        gov.check_consistency().unwrap();
    });
}

#[test]
fn growth_and_allocator_charges_lose_no_update() {
    model(|| {
        let gov = gov();
        let mut r = gov.reserve(EngineId::Query, MIB).unwrap();
        let g = gov.clone();
        let t = thread::spawn(move || {
            g.charge(EngineId::Query, 2 * MIB);
            g.credit(EngineId::Query, MIB).unwrap();
        });
        // 1 MiB reserved + up to 2 MiB charged: growing by 1 MiB fits only if it came first
        // or after the credit.
        let grown = r.try_grow(MIB).is_ok();
        t.join().unwrap();
        let b = gov.budget(EngineId::Query);
        assert_eq!(b.used(), MIB);
        assert_eq!(b.reserved(), if grown { 2 * MIB } else { MIB });
        assert!(b.peak() <= 4 * MIB);
        drop(r);
        gov.credit(EngineId::Query, MIB).unwrap();
        assert_eq!(gov.global_usage(), 0);
        gov.check_consistency().unwrap();
    });
}

#[test]
fn dropping_on_several_threads_returns_exactly_what_was_taken() {
    model(|| {
        let gov = gov();
        let mut r = gov.reserve(EngineId::Timeseries, 3000).unwrap();
        let a = r.split(1000).unwrap();
        let b = r.split(700).unwrap();
        let ta = thread::spawn(move || drop(a));
        let tb = thread::spawn(move || drop(b));
        r.shrink(300).unwrap();
        assert!(gov.usage(EngineId::Timeseries) <= 2700);
        ta.join().unwrap();
        tb.join().unwrap();
        assert_eq!(gov.usage(EngineId::Timeseries), 1000);
        drop(r);
        assert_eq!(gov.usage(EngineId::Timeseries), 0);
        assert_eq!(gov.global_usage(), 0);
        gov.check_consistency().unwrap();
    });
}

#[test]
fn rebalancing_against_a_racing_reservation_keeps_every_limit() {
    model(|| {
        let gov = gov();
        // Query busy (90 %), Vector idle: the rebalancer wants to lend Vector's headroom.
        let busy = gov.reserve(EngineId::Query, 4 * MIB * 9 / 10).unwrap();
        let g = gov.clone();
        let t = thread::spawn(move || g.reserve(EngineId::Vector, 3 * MIB).ok());
        gov.rebalance();
        let held = t.join().unwrap();
        let v = gov.budget(EngineId::Vector);
        // Whatever the order, the lender's limit still covers what it admitted.
        assert!(
            v.usage() <= v.limit(),
            "usage {} limit {}",
            v.usage(),
            v.limit()
        );
        assert!(v.limit() >= v.floor());
        let total: u64 = EngineId::ALL.iter().map(|&e| gov.limit(e)).sum();
        assert!(total <= gov.ceiling());
        gov.check_consistency().unwrap();
        drop((held, busy));
        assert_eq!(gov.global_usage(), 0);
    });
}

#[test]
fn concurrent_polls_agree_on_one_transition() {
    model(|| {
        let gov = gov();
        gov.charge(EngineId::Crdt, gov.limit(EngineId::Crdt));
        let g = gov.clone();
        let t = thread::spawn(move || g.pressure(EngineId::Crdt));
        let here = gov.pressure(EngineId::Crdt);
        let there = t.join().unwrap();
        assert_eq!(
            (here, there),
            (PressureLevel::Emergency, PressureLevel::Emergency)
        );
        assert_eq!(gov.budget(EngineId::Crdt).pressure_transitions(), 1);
    });
}
