//! Loom models of scoped admission and of waiting requests, through the public API.
//!
//! Run (see docs/testing.md):
//! `RUSTFLAGS="--cfg nodedb_mem_loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p nodedb-mem-loom-tests --release --test scopes`
#![cfg(nodedb_mem_loom)]

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use loom::thread;
use nodedb_mem::{EngineId, MemError, Reservation, Reserving};
use nodedb_mem_loom_tests::{MIB, governor as gov, model};

const LONG: Duration = Duration::from_secs(3600);

fn poll(f: &mut Reserving) -> Poll<Result<Reservation, MemError>> {
    Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
}

#[test]
fn reservations_in_two_tenants_never_pass_their_parent() {
    model(|| {
        let gov = gov();
        let db = gov.create_scope("db", None, 4 * MIB).unwrap();
        let a = gov.create_scope("a", Some(&db), 4 * MIB).unwrap();
        let b = gov.create_scope("b", Some(&db), 4 * MIB).unwrap();
        let g = gov.clone();
        let t = thread::spawn(move || g.reserve_in(EngineId::Vector, &b, 3 * MIB).ok());
        let here = gov.reserve_in(EngineId::Query, &a, 3 * MIB).ok();
        let there = t.join().unwrap();
        // 3 + 3 > 4 at the database: exactly one wins, and the database never passed its limit.
        assert!(here.is_some() != there.is_some());
        assert_eq!(db.usage(), 3 * MIB);
        assert!(db.peak() <= 4 * MIB);
        assert_eq!(db.rejections(), 1);
        drop((here, there));
        assert_eq!((db.usage(), gov.global_usage()), (0, 0));
        gov.check_consistency().unwrap();
    });
}

#[test]
fn a_refused_reservation_leaves_nothing_charged_at_any_level() {
    model(|| {
        let gov = gov();
        // The ceiling has 4 MiB left; each tenant has room for 3.
        gov.charge(EngineId::Crdt, 8 * MIB);
        gov.charge(EngineId::Sparse, 4 * MIB);
        let db = gov.create_scope("db", None, 8 * MIB).unwrap();
        let a = gov.create_scope("a", Some(&db), 3 * MIB).unwrap();
        let b = gov.create_scope("b", Some(&db), 3 * MIB).unwrap();
        let (g, b2) = (gov.clone(), b.clone());
        // One of the two is refused by the ceiling after its scopes admitted it; a third is
        // refused by its tenant before the database is touched.
        let t = thread::spawn(move || g.reserve_in(EngineId::Vector, &b2, 3 * MIB).ok());
        let deep = gov.reserve_in(EngineId::Query, &a, 4 * MIB);
        let here = gov.reserve_in(EngineId::Query, &a, 3 * MIB).ok();
        let there = t.join().unwrap();
        assert!(matches!(deep, Err(MemError::ScopeExceeded { ref scope, .. }) if scope == "db/a"));
        let won = u64::from(here.is_some()) + u64::from(there.is_some());
        assert_eq!(won, 1);
        assert_eq!(a.usage(), if here.is_some() { 3 * MIB } else { 0 });
        assert_eq!(b.usage(), if there.is_some() { 3 * MIB } else { 0 });
        assert_eq!(db.usage(), won * 3 * MIB);
        assert_eq!(gov.usage(EngineId::Query), a.usage());
        assert_eq!(gov.usage(EngineId::Vector), b.usage());
        assert!(db.peak() <= 6 * MIB);
        drop((here, there));
        assert_eq!((a.usage(), b.usage(), db.usage()), (0, 0, 0));
        assert_eq!(gov.global_usage(), 12 * MIB);
        gov.check_consistency().unwrap();
    });
}

#[test]
fn a_waiter_woken_by_a_release_gets_the_memory() {
    model(|| {
        let gov = gov();
        let held = gov.reserve(EngineId::Query, 3 * MIB).unwrap();
        let t = thread::spawn(move || drop(held));
        // 3 + 2 > 4 unless the release came first; either way the request is not lost.
        let mut f = gov.reserve_async(EngineId::Query, None, 2 * MIB, LONG);
        t.join().unwrap();
        let Poll::Ready(Ok(r)) = poll(&mut f) else {
            panic!("the release did not reach the waiting request");
        };
        assert_eq!((r.size(), gov.usage(EngineId::Query)), (2 * MIB, 2 * MIB));
        assert_eq!(gov.snapshot().engine(EngineId::Query).waiters, 0);
        drop(r);
        gov.check_consistency().unwrap();
    });
}

#[test]
fn a_waiter_cancelled_while_a_release_grants_it_loses_nothing() {
    model(|| {
        let gov = gov();
        let held = gov.reserve(EngineId::Query, 3 * MIB).unwrap();
        let mut f = gov.reserve_async(EngineId::Query, None, 2 * MIB, LONG);
        let t = thread::spawn(move || drop(held));
        // The owner gives up while the release may be granting it.
        let early = poll(&mut f);
        drop(f);
        t.join().unwrap();
        if let Poll::Ready(outcome) = early {
            drop(outcome.unwrap());
        }
        // Either way, the memory is back and nothing waits.
        assert_eq!(gov.usage(EngineId::Query), 0);
        assert_eq!(gov.snapshot().engine(EngineId::Query).waiters, 0);
        gov.check_consistency().unwrap();
    });
}

#[test]
fn a_later_request_never_takes_memory_an_earlier_one_waits_for() {
    model(|| {
        let gov = gov();
        let held = gov.reserve(EngineId::Query, 3 * MIB).unwrap();
        // 3 + 2 > 4: this waits at Query's limit.
        let mut first = gov.reserve_async(EngineId::Query, None, 2 * MIB, LONG);
        let t = thread::spawn(move || drop(held));
        // A later request of one attempt: 1 MiB fits beside the 3 held, but the earlier
        // request waits for that memory. Granted only if the earlier one was granted first.
        let later = poll(&mut gov.reserve_async(EngineId::Query, None, MIB, Duration::ZERO));
        let first_then = poll(&mut first);
        match later {
            Poll::Ready(Ok(r)) => {
                // The earlier request was granted before it.
                assert!(matches!(first_then, Poll::Ready(Ok(_))), "{first_then:?}");
                drop(r);
            }
            Poll::Ready(Err(MemError::WaitTimedOut { refusal, .. })) => {
                assert!(matches!(*refusal, MemError::QueuedBehind { ahead: 1, .. }));
            }
            other => panic!("{other:?}"),
        }
        t.join().unwrap();
        let first = match first_then {
            Poll::Ready(outcome) => outcome.unwrap(),
            Poll::Pending => match poll(&mut first) {
                Poll::Ready(outcome) => outcome.unwrap(),
                Poll::Pending => panic!("the release did not reach the waiting request"),
            },
        };
        assert_eq!(first.size(), 2 * MIB);
        assert!(gov.budget(EngineId::Query).peak() <= 4 * MIB);
        drop(first);
        gov.check_consistency().unwrap();
    });
}

#[test]
fn a_request_held_back_by_its_own_scope_never_holds_back_another_scope() {
    model(|| {
        let gov = gov();
        let a = gov.create_scope("a", None, 2 * MIB).unwrap();
        let b = gov.create_scope("b", None, 2 * MIB).unwrap();
        let held = gov.reserve_in(EngineId::Query, &a, 2 * MIB).unwrap();
        // Waits at scope a's limit.
        let mut first = gov.reserve_async(EngineId::Query, Some(&a), MIB, LONG);
        let t = thread::spawn(move || drop(held));
        // Scope b has room, and Query 1 MiB beside a's at most 2: whatever the release does,
        // the request in b is granted at its one attempt.
        let later = poll(&mut gov.reserve_async(EngineId::Query, Some(&b), MIB, Duration::ZERO));
        t.join().unwrap();
        let Poll::Ready(Ok(later)) = later else {
            panic!("a request in another scope was held back: {later:?}");
        };
        let Poll::Ready(Ok(first)) = poll(&mut first) else {
            panic!("the release did not reach the waiting request");
        };
        assert_eq!((a.usage(), b.usage()), (MIB, MIB));
        drop((first, later));
        gov.check_consistency().unwrap();
    });
}
