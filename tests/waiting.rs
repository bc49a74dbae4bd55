//! Waiting admission: blocking with a deadline and as a future, in arrival order where requests
//! compete, woken by releases, credits, raised limits and rebalancing, cancelled without loss.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Barrier};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use nodedb_mem::{EngineId, Limit, MemError, MemoryGovernor, Reservation, Reserving, Scope};

mod common;
#[path = "common/fixed_query.rs"]
mod fixed;
use common::{MIB, two_big_engines};
use fixed::fixed_query;

const LONG: Duration = Duration::from_secs(30);

/// 64 MiB ceiling, Query 8 MiB (cap 16 MiB), Vector 40 MiB and idle.
fn gov() -> MemoryGovernor {
    MemoryGovernor::builder()
        .global_ceiling(64 * MIB)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, 8 * MIB)
        .cap(EngineId::Query, 16 * MIB)
        .budget(EngineId::Vector, 40 * MIB)
        .rebalance(nodedb_mem::RebalanceConfig {
            min_move: 1,
            ..Default::default()
        })
        .build()
        .unwrap()
}

/// A waker that counts its wake-ups and unparks the thread that made it.
struct Counter {
    woken: std::sync::atomic::AtomicU64,
    thread: thread::Thread,
}

impl Wake for Counter {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.thread.unpark();
    }
}

fn counter() -> (Arc<Counter>, Waker) {
    let c = Arc::new(Counter {
        woken: Default::default(),
        thread: thread::current(),
    });
    (Arc::clone(&c), Waker::from(c))
}

fn poll(f: &mut Reserving, waker: &Waker) -> Poll<Result<Reservation, MemError>> {
    Pin::new(f).poll(&mut Context::from_waker(waker))
}

/// Polls `f` to completion, parking between polls until its waker is called (no busy loop: a
/// future that is never woken hangs here, and the test times out).
fn block_on(mut f: Reserving) -> Result<Reservation, MemError> {
    let (_, waker) = counter();
    loop {
        if let Poll::Ready(v) = poll(&mut f, &waker) {
            return v;
        }
        thread::park();
    }
}

#[test]
fn a_blocked_request_gets_the_memory_another_thread_releases() {
    let gov = gov();
    let held = gov.reserve(EngineId::Query, 6 * MIB).unwrap();
    let g = gov.clone();
    let waiter = thread::spawn(move || g.reserve_blocking(EngineId::Query, None, 4 * MIB, LONG));
    while gov.snapshot().engine(EngineId::Query).waiters == 0 {
        thread::sleep(Duration::from_millis(1));
    }
    let q = gov.snapshot();
    assert_eq!(
        (
            q.engine(EngineId::Query).waiters,
            q.engine(EngineId::Query).waiting_bytes
        ),
        (1, 4 * MIB)
    );
    drop(held);
    let r = waiter.join().unwrap().unwrap();
    assert_eq!((r.engine(), r.size()), (EngineId::Query, 4 * MIB));
    assert_eq!(gov.usage(EngineId::Query), 4 * MIB);
    let s = gov.snapshot();
    assert_eq!(
        (
            s.engine(EngineId::Query).waiters,
            s.waits_granted,
            s.waits_timed_out
        ),
        (0, 1, 0)
    );
    drop(r);
    gov.check_consistency().unwrap();
}

#[test]
fn a_request_that_times_out_says_how_long_it_waited_and_why() {
    let gov = gov();
    let _held = gov.reserve(EngineId::Query, 6 * MIB).unwrap();
    let started = Instant::now();
    let err = gov
        .reserve_blocking(EngineId::Query, None, 4 * MIB, Duration::from_millis(80))
        .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(80));
    let MemError::WaitTimedOut { waited, refusal } = &err else {
        panic!("{err:?}");
    };
    assert!(*waited >= Duration::from_millis(80), "{waited:?}");
    assert!(
        matches!(**refusal, MemError::BudgetExceeded { engine: EngineId::Query, requested, .. } if requested == 4 * MIB)
    );
    assert!(err.is_over_budget());
    assert_eq!(
        err.to_string(),
        format!(
            "waited {} ms for memory: cannot reserve 4 MiB for engine query: 6 MiB already used \
             of its 8 MiB limit, 2 MiB available",
            waited.as_millis()
        )
    );
    let s = gov.snapshot();
    assert_eq!(
        (s.engine(EngineId::Query).waiters, s.waits_timed_out),
        (0, 1)
    );
    // The refusal at the deadline is counted like any other.
    assert_eq!(gov.budget(EngineId::Query).rejections(), 1);
    assert_eq!(gov.usage(EngineId::Query), 6 * MIB);
}

#[test]
fn a_future_times_out_without_a_runtime() {
    let gov = gov();
    let _held = gov.reserve(EngineId::Query, 6 * MIB).unwrap();
    let err =
        block_on(gov.reserve_async(EngineId::Query, None, 4 * MIB, Duration::from_millis(50)))
            .unwrap_err();
    assert!(
        matches!(err, MemError::WaitTimedOut { waited, .. } if waited >= Duration::from_millis(50))
    );
    assert_eq!(gov.snapshot().engine(EngineId::Query).waiters, 0);
}

#[test]
fn a_large_request_is_not_passed_by_smaller_ones_behind_it() {
    let gov = gov();
    let held = gov.reserve(EngineId::Query, 4 * MIB).unwrap();
    let (woken, waker) = counter();
    // 4 + 6 > 8: the large request waits.
    let mut large = gov.reserve_async(EngineId::Query, None, 6 * MIB, LONG);
    assert!(poll(&mut large, &waker).is_pending());
    // 4 + 2 fits, but the large request came first.
    let mut small = gov.reserve_async(EngineId::Query, None, 2 * MIB, LONG);
    assert!(poll(&mut small, &waker).is_pending());
    thread::sleep(Duration::from_millis(30));
    assert!(poll(&mut small, &waker).is_pending());
    assert_eq!(gov.usage(EngineId::Query), 4 * MIB);
    // Plain reservations do not queue.
    drop(gov.reserve(EngineId::Query, 2 * MIB).unwrap());
    assert_eq!(gov.snapshot().engine(EngineId::Query).waiters, 2);

    drop(held);
    // The release served both, in order, and woke them.
    let Poll::Ready(Ok(l)) = poll(&mut large, &waker) else {
        panic!("the large request was not granted");
    };
    let Poll::Ready(Ok(s)) = poll(&mut small, &waker) else {
        panic!("the small request was not granted");
    };
    assert_eq!((l.size(), s.size()), (6 * MIB, 2 * MIB));
    assert_eq!(gov.usage(EngineId::Query), 8 * MIB);
    assert!(woken.woken.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    // A finished future polled again answers with an error, not a panic.
    assert!(matches!(
        poll(&mut large, &waker),
        Poll::Ready(Err(MemError::InvalidConfig { .. }))
    ));
}

#[test]
fn a_cancelled_request_leaves_the_queue_and_a_grant_it_missed_is_released() {
    let gov = gov();
    let held = gov.reserve(EngineId::Query, 8 * MIB).unwrap();
    let (_, waker) = counter();
    let mut a = gov.reserve_async(EngineId::Query, None, 4 * MIB, LONG);
    assert!(poll(&mut a, &waker).is_pending());
    drop(a);
    let s = gov.snapshot();
    assert_eq!(
        (s.engine(EngineId::Query).waiters, s.waits_cancelled),
        (0, 1)
    );

    // Granted by the release, then dropped before it was polled: the memory comes back.
    let b = gov.reserve_async(EngineId::Query, None, 2 * MIB, LONG);
    let mut c = gov.reserve_async(EngineId::Query, None, 2 * MIB, LONG);
    assert_eq!(gov.snapshot().engine(EngineId::Query).waiters, 2);
    drop(held);
    assert_eq!(gov.usage(EngineId::Query), 4 * MIB); // both granted
    drop(b);
    assert_eq!(gov.usage(EngineId::Query), 2 * MIB);
    let Poll::Ready(Ok(c_res)) = poll(&mut c, &waker) else {
        panic!("c was not granted");
    };
    drop(c_res);
    assert_eq!(gov.usage(EngineId::Query), 0);
    assert_eq!(gov.snapshot().waits_cancelled, 1);
    gov.check_consistency().unwrap();
}

#[test]
fn a_credit_a_raised_scope_limit_and_a_removed_scope_wake_waiters() {
    let gov = gov();
    // Credit.
    gov.charge(EngineId::Query, 7 * MIB);
    let (_, waker) = counter();
    let mut a = gov.reserve_async(EngineId::Query, None, 2 * MIB, LONG);
    assert!(poll(&mut a, &waker).is_pending());
    gov.credit(EngineId::Query, 7 * MIB).unwrap();
    let Poll::Ready(Ok(a)) = poll(&mut a, &waker) else {
        panic!("not woken by the credit");
    };
    drop(a);

    // A scope's limit raised (the request fits the limit, not beside what is held; one
    // larger than the limit itself is refused at once).
    let db = gov.create_scope("db", None, 2 * MIB).unwrap();
    let held = gov.reserve_in(EngineId::Vector, &db, MIB).unwrap();
    let mut b = gov.reserve_async(EngineId::Vector, Some(&db), 2 * MIB, LONG);
    assert!(poll(&mut b, &waker).is_pending());
    gov.set_scope_limit(&db, 3 * MIB).unwrap();
    let Poll::Ready(Ok(b)) = poll(&mut b, &waker) else {
        panic!("not woken by the raised limit");
    };
    assert_eq!(
        (b.scope().map(Scope::path), db.usage()),
        (Some("db"), 3 * MIB)
    );

    // Another engine's release in the same scope.
    let mut c = gov.reserve_async(EngineId::Query, Some(&db), MIB, LONG);
    assert!(poll(&mut c, &waker).is_pending());
    drop(b);
    let Poll::Ready(Ok(c)) = poll(&mut c, &waker) else {
        panic!("not woken by the other engine's release");
    };
    drop((c, held));

    // A scope removed under a waiter (waiting for its engine's memory): the request fails at
    // its next attempt.
    let t = gov.create_scope("t", None, MIB).unwrap();
    gov.charge(EngineId::Query, 8 * MIB);
    let mut d = gov.reserve_async(EngineId::Query, Some(&t), MIB, LONG);
    assert!(poll(&mut d, &waker).is_pending());
    gov.remove_scope(&t).unwrap();
    gov.credit(EngineId::Query, 8 * MIB).unwrap(); // any release serves the queues
    assert!(matches!(
        poll(&mut d, &waker),
        Poll::Ready(Err(MemError::ScopeRemoved { .. }))
    ));
    assert_eq!(gov.snapshot().engine(EngineId::Query).waiters, 0);
    gov.check_consistency().unwrap();
}

#[test]
fn rebalancing_lends_to_a_waiting_engine_and_serves_it() {
    let gov = gov();
    let _held = gov.reserve(EngineId::Query, 2 * MIB).unwrap();
    let (_, waker) = counter();
    // 2 + 10 > 8, but within Query's cap of 16 MiB: Vector is idle and can lend.
    let mut w = gov.reserve_async(EngineId::Query, None, 10 * MIB, LONG);
    assert!(poll(&mut w, &waker).is_pending());
    let report = gov.rebalance();
    assert!(
        report.moves.iter().any(|m| m.to == EngineId::Query),
        "{report:?}"
    );
    let Poll::Ready(Ok(r)) = poll(&mut w, &waker) else {
        panic!("not served after the rebalancing step: {report:?}");
    };
    assert_eq!(r.size(), 10 * MIB);
    assert!(gov.limit(EngineId::Query) >= 12 * MIB);
    gov.check_consistency().unwrap();
}

#[test]
fn hopeless_and_zero_timeout_requests_are_answered_at_once() {
    let gov = gov();
    let started = Instant::now();
    // Above Query's cap: no rebalancing can make room.
    let err = gov
        .reserve_blocking(EngineId::Query, None, 17 * MIB, LONG)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "17 MiB for engine query can never be reserved while engine query's cap is 16 MiB"
    );
    assert!(err.is_over_budget());
    // Above the ceiling (Vector's cap is the ceiling).
    let err = block_on(gov.reserve_async(EngineId::Vector, None, 65 * MIB, LONG)).unwrap_err();
    assert!(
        matches!(
            err,
            MemError::NeverFits { engine: EngineId::Vector, requested, limit: Limit::Cap(EngineId::Vector) | Limit::Ceiling, max }
                if requested == 65 * MIB && max == 64 * MIB
        ),
        "{err:?}"
    );
    let _held = gov.reserve(EngineId::Query, 8 * MIB).unwrap();
    let err = gov
        .reserve_blocking(EngineId::Query, None, MIB, Duration::ZERO)
        .unwrap_err();
    assert!(matches!(err, MemError::BudgetExceeded { .. }), "{err:?}");
    assert!(started.elapsed() < LONG);
    let s = gov.snapshot();
    assert_eq!(
        (s.waits_timed_out, s.waits_granted, s.waits_cancelled),
        (0, 0, 0)
    );
    // A foreign scope is refused before anything waits.
    let other = two_big_engines();
    let theirs = other.create_scope("theirs", None, MIB).unwrap();
    assert!(matches!(
        gov.reserve_blocking(EngineId::Query, Some(&theirs), 1, LONG),
        Err(MemError::InvalidConfig { .. })
    ));
}

#[test]
fn many_waiting_threads_all_get_memory_and_no_level_passes_its_limit() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 200;
    let gov = gov();
    let db = gov.create_scope("db", None, 6 * MIB).unwrap();
    let start = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let (gov, db, start) = (gov.clone(), db.clone(), Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                for round in 0..ROUNDS {
                    let bytes = ((i * 31 + round * 17) % 3 + 1) as u64 * MIB;
                    let scope = (round % 2 == 0).then_some(&db);
                    let r = if round % 3 == 0 {
                        block_on(gov.reserve_async(EngineId::Query, scope, bytes, LONG))
                    } else {
                        gov.reserve_blocking(EngineId::Query, scope, bytes, LONG)
                    };
                    let r = r.unwrap();
                    assert_eq!(r.size(), bytes);
                    thread::yield_now();
                    drop(r);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert!(gov.budget(EngineId::Query).peak() <= 8 * MIB);
    assert!(db.peak() <= 6 * MIB);
    let s = gov.snapshot();
    assert_eq!(
        (s.engine(EngineId::Query).waiters, s.waits_timed_out),
        (0, 0)
    );
    assert_eq!(gov.global_usage(), 0);
    gov.check_consistency().unwrap();
}

#[test]
fn requests_and_scopes_can_move_between_threads_and_tasks() {
    fn sendable<T: Send + Sync + 'static>() {}
    sendable::<Reserving>();
    sendable::<nodedb_mem::Scope>();
    sendable::<Reservation>();
    // A timeout no `Instant` can hold waits (and is cancelled here by the drop).
    let gov = gov();
    let _held = gov.reserve(EngineId::Query, 8 * MIB).unwrap();
    let (_, waker) = counter();
    let mut f = gov.reserve_async(EngineId::Query, None, MIB, Duration::MAX);
    assert!(poll(&mut f, &waker).is_pending());
    drop(f);
    assert_eq!(gov.snapshot().waits_cancelled, 1);
}

#[test]
fn a_deadline_never_takes_memory_an_earlier_request_waits_for() {
    let gov = fixed_query();
    let held = gov.reserve(EngineId::Query, 7 * MIB).unwrap();
    // A 6 MiB request waits first (it joins its queue when made).
    let big = gov.reserve_async(EngineId::Query, None, 6 * MIB, LONG);
    // 1 MiB requests behind it with 5 ms deadlines: 1 MiB is free, but the earlier request
    // waits for it. Each times out untried (all 50 were granted, by their last attempts,
    // before).
    for _ in 0..50 {
        let small = gov.reserve_blocking(EngineId::Query, None, MIB, Duration::from_millis(5));
        match small {
            Err(MemError::WaitTimedOut { refusal, .. }) => match *refusal {
                MemError::QueuedBehind {
                    engine,
                    limit,
                    ahead,
                    ahead_bytes,
                } => assert_eq!(
                    (engine, limit, ahead, ahead_bytes),
                    (EngineId::Query, Limit::Budget(EngineId::Query), 1, 6 * MIB)
                ),
                other => panic!("{other}"),
            },
            other => panic!("{other:?}"),
        }
    }
    // So does one that does not wait at all.
    let now = gov
        .reserve_blocking(EngineId::Query, None, MIB, Duration::ZERO)
        .unwrap_err();
    assert_eq!(
        now.to_string(),
        "waited 0 ms for memory: 1 earlier request(s), waiting for 6 MiB at engine query's \
         limit, were ahead of this one for engine query"
    );
    assert!(now.is_over_budget());
    assert_eq!(gov.usage(EngineId::Query), 7 * MIB);
    drop(held);
    let big = block_on(big).unwrap();
    assert_eq!(big.size(), 6 * MIB);
    assert_eq!(gov.snapshot().waits_timed_out, 51);
}

#[test]
fn a_large_request_is_served_before_every_later_one_under_load() {
    let gov = fixed_query();
    // 6.5 MiB: while it waits, the engine's waiting bytes end in half a MiB (the small
    // requests' are whole MiB), which tells a grant made while it waited.
    let big_bytes = 6 * MIB + MIB / 2;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let queued = std::sync::OnceLock::<Instant>::new();
    let overtakes = std::sync::atomic::AtomicU64::new(0);
    let later_grants = std::sync::atomic::AtomicU64::new(0);
    let waited = thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let joined = Instant::now();
                    let Ok(r) =
                        gov.reserve_blocking(EngineId::Query, None, MIB, Duration::from_millis(5))
                    else {
                        continue;
                    };
                    // Came after the large request was queued, and granted while it still
                    // waited (its half MiB is in the queue after this grant): an overtake.
                    if queued.get().is_some_and(|&q| joined > q) {
                        later_grants.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let e = gov.snapshot().engines[EngineId::Query.index()];
                        if e.waiting_bytes % MIB == MIB / 2 {
                            overtakes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    thread::sleep(Duration::from_micros(200));
                    drop(r);
                }
            });
        }
        thread::sleep(Duration::from_millis(50));
        // Queued when this returns (a future joins its queue when it is made).
        let big = gov.reserve_async(EngineId::Query, None, big_bytes, Duration::from_secs(5));
        let since = Instant::now();
        queued.set(since).unwrap();
        let big = block_on(big).expect("the large request is served before its deadline");
        let waited = since.elapsed();
        assert_eq!(big.size(), big_bytes);
        thread::sleep(Duration::from_millis(20));
        drop(big);
        thread::sleep(Duration::from_millis(20));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        waited
    });
    assert_eq!(overtakes.into_inner(), 0);
    // The later requests were served, after it.
    assert!(later_grants.into_inner() > 0);
    assert!(waited < Duration::from_secs(1), "waited {waited:?}");
}

#[test]
fn a_request_no_release_can_admit_is_refused_and_never_holds_back_others() {
    let gov = fixed_query();
    let db = gov.create_scope("db", None, 8 * MIB).unwrap();
    let small = gov.create_scope("small", Some(&db), 4 * MIB).unwrap();
    let other = gov.create_scope("other", Some(&db), 4 * MIB).unwrap();
    // Larger than its tenant's whole limit: refused at once, naming that limit (it was
    // queued, and at the head blocked the engine's queue until its deadline).
    let started = Instant::now();
    let err = gov
        .reserve_blocking(EngineId::Query, Some(&small), 5 * MIB, LONG)
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        err.to_string(),
        "5 MiB for engine query can never be reserved while scope db/small's limit is 4 MiB"
    );
    assert_eq!(small.rejections(), 1);
    // A request that fits its limit waits, held back by that limit; another tenant's request
    // behind it is served as soon as its own tenant has room (it was held back by the first
    // until its deadline); the first one's limit is then lowered under it: refused then.
    let held = gov.reserve_in(EngineId::Query, &small, 2 * MIB).unwrap();
    let held_other = gov.reserve_in(EngineId::Query, &other, 4 * MIB).unwrap();
    let head = gov.reserve_async(EngineId::Query, Some(&small), 3 * MIB, LONG);
    let behind = gov.reserve_async(EngineId::Query, Some(&other), MIB, LONG);
    assert_eq!(gov.snapshot().engines[EngineId::Query.index()].waiters, 2);
    drop(held_other);
    assert_eq!(gov.snapshot().engines[EngineId::Query.index()].waiters, 1);
    gov.set_scope_limit(&small, 2 * MIB).unwrap();
    match block_on(head) {
        Err(MemError::NeverFits { limit, max, .. }) => {
            assert_eq!((limit, max), (Limit::Scope("db/small".into()), 2 * MIB));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(small.rejections(), 2);
    let behind = block_on(behind).unwrap();
    assert_eq!(behind.size(), MIB);
    drop((held, behind));
}
