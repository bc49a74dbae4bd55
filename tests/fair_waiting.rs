//! Waiting admission across tenants and engines: a request held back by a limit holds back
//! exactly the later requests that compete for that limit's memory, and no others; over a long
//! mixed run, no later request of a tenant overtakes an earlier one and tenants are served
//! alike.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use nodedb_mem::{EngineId, Limit, MemError, MemoryGovernor, Reservation, Reserving, Scope};

#[path = "common/fixed_query.rs"]
mod fixed;
use fixed::fixed_query;

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(30);

fn poll_once(f: &mut Reserving) -> Poll<Result<Reservation, MemError>> {
    Pin::new(f).poll(&mut Context::from_waker(Waker::noop()))
}

/// Polls `f` until it is ready (the governor's serving thread settles it).
fn wait_for(mut f: Reserving) -> Result<Reservation, MemError> {
    loop {
        if let Poll::Ready(v) = poll_once(&mut f) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The refusal inside a timed-out wait.
fn queued_behind(e: MemError) -> (Limit, u64, u64) {
    match e {
        MemError::WaitTimedOut { refusal, .. } => match *refusal {
            MemError::QueuedBehind {
                limit,
                ahead,
                ahead_bytes,
                ..
            } => (limit, ahead, ahead_bytes),
            other => panic!("{other}"),
        },
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_tenant_held_back_by_its_own_limit_never_holds_back_another() {
    let gov = fixed_query();
    let db = gov.create_scope("db", None, 8 * MIB).unwrap();
    let a = gov.create_scope("a", Some(&db), 2 * MIB).unwrap();
    let b = gov.create_scope("b", Some(&db), 4 * MIB).unwrap();
    let held_a = gov.reserve_in(EngineId::Query, &a, 2 * MIB).unwrap();
    // Tenant a waits for 1 MiB its own limit has not got.
    let first = gov.reserve_async(EngineId::Query, Some(&a), MIB, LONG);
    // Tenant b's requests come later and have room: each is granted at once, by a blocking
    // call with a short deadline, a future, and a call that does not wait (before, all three
    // waited behind tenant a's request and timed out with `QueuedBehind`).
    let started = Instant::now();
    let r1 = gov
        .reserve_blocking(
            EngineId::Query,
            Some(&b),
            2 * MIB,
            Duration::from_millis(50),
        )
        .unwrap();
    let r2 = wait_for(gov.reserve_async(EngineId::Query, Some(&b), MIB, LONG)).unwrap();
    let r3 = gov
        .reserve_blocking(EngineId::Query, Some(&b), MIB, Duration::ZERO)
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(50));
    assert_eq!((b.usage(), a.usage()), (4 * MIB, 2 * MIB));
    // Another request of tenant a is behind the first, and competes for the same memory.
    let err = gov
        .reserve_blocking(EngineId::Query, Some(&a), MIB, Duration::ZERO)
        .unwrap_err();
    assert_eq!(queued_behind(err), (Limit::Scope("db/a".into()), 1, MIB));
    assert_eq!(gov.snapshot().waits_timed_out, 1);
    // Tenant a's release serves its request.
    drop(held_a);
    assert_eq!(wait_for(first).unwrap().size(), MIB);
    drop((r1, r2, r3));
    gov.check_consistency().unwrap();
}

#[test]
fn a_request_held_back_by_the_engine_holds_back_every_tenant_of_that_engine() {
    let gov = fixed_query();
    let db = gov.create_scope("db", None, 16 * MIB).unwrap();
    let a = gov.create_scope("a", Some(&db), 8 * MIB).unwrap();
    let b = gov.create_scope("b", Some(&db), 8 * MIB).unwrap();
    let held = gov.reserve(EngineId::Query, 7 * MIB).unwrap();
    // Tenant a's 6 MiB fits its tenant but not the engine: it waits at the engine's limit.
    let first = gov.reserve_async(EngineId::Query, Some(&a), 6 * MIB, LONG);
    // Tenant b's 1 MiB would fit the engine now, but takes memory the earlier request waits
    // for: it waits, and times out untried, naming the engine's limit.
    let err = gov
        .reserve_blocking(EngineId::Query, Some(&b), MIB, Duration::from_millis(5))
        .unwrap_err();
    assert_eq!(
        queued_behind(err),
        (Limit::Budget(EngineId::Query), 1, 6 * MIB)
    );
    // Another engine has a budget of its own: not held back.
    let other = gov.reserve_blocking(EngineId::Vector, Some(&b), MIB, Duration::ZERO);
    assert_eq!(other.unwrap().size(), MIB);
    drop(held);
    assert_eq!(wait_for(first).unwrap().size(), 6 * MIB);
}

#[test]
fn a_request_held_back_by_a_scope_holds_back_that_scopes_other_engines() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(64 * MIB)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, 16 * MIB)
        .budget(EngineId::Vector, 16 * MIB)
        .build()
        .unwrap();
    let s = gov.create_scope("shared", None, 4 * MIB).unwrap();
    let held = gov.reserve_in(EngineId::Vector, &s, 3 * MIB).unwrap();
    // Vector waits for 2 MiB of the scope's 4 (3 held).
    let first = gov.reserve_async(EngineId::Vector, Some(&s), 2 * MIB, LONG);
    // Query's 1 MiB in the same scope comes later and competes for that scope's memory: it
    // waits behind, though Query's own queue was empty (before, it was granted at once).
    let err = gov
        .reserve_blocking(EngineId::Query, Some(&s), MIB, Duration::ZERO)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "waited 0 ms for memory: 1 earlier request(s), waiting for 2 MiB at scope shared's \
         limit, were ahead of this one for engine query"
    );
    assert_eq!(
        queued_behind(err),
        (Limit::Scope("shared".into()), 1, 2 * MIB)
    );
    // Outside the scope, Query is not held back.
    assert!(
        gov.reserve_blocking(EngineId::Query, None, MIB, Duration::ZERO)
            .is_ok()
    );
    drop(held);
    assert_eq!(wait_for(first).unwrap().size(), 2 * MIB);
}

#[test]
fn a_request_held_back_by_the_ceiling_holds_back_every_engine() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(20 * MIB)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, 8 * MIB)
        .budget(EngineId::Vector, 4 * MIB)
        .budget(EngineId::Sparse, 4 * MIB)
        .build()
        .unwrap();
    // 16 MiB charged to Vector unconditionally (as the allocator would): 4 MiB left under the
    // ceiling.
    gov.charge(EngineId::Vector, 16 * MIB);
    let first = gov.reserve_async(EngineId::Query, None, 7 * MIB, LONG);
    // Sparse has room in its budget, and 1 MiB is left under the ceiling, but the earlier
    // request waits for that memory (before, another engine's request was granted at once).
    let err = gov
        .reserve_blocking(EngineId::Sparse, None, MIB, Duration::ZERO)
        .unwrap_err();
    assert_eq!(queued_behind(err), (Limit::Ceiling, 1, 7 * MIB));
    gov.credit(EngineId::Vector, 16 * MIB).unwrap();
    assert_eq!(wait_for(first).unwrap().size(), 7 * MIB);
    assert_eq!(
        gov.reserve_blocking(EngineId::Sparse, None, MIB, Duration::ZERO)
            .unwrap()
            .size(),
        MIB
    );
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Pending {
    seq: u64,
    /// The tenant's index, `None` for a request outside every tenant.
    tenant: Option<usize>,
    bytes: u64,
    made: Instant,
    future: Reserving,
}

#[test]
fn tenants_are_served_in_order_and_alike_over_a_long_mixed_run() {
    const TENANTS: usize = 8;
    const RUN: Duration = Duration::from_secs(4);
    let gov = MemoryGovernor::builder()
        .global_ceiling(64 * MIB)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, 16 * MIB)
        .cap(EngineId::Query, 16 * MIB)
        .build()
        .unwrap();
    let db = gov.create_scope("db", None, 14 * MIB).unwrap();
    let tenants: Vec<Scope> = (0..TENANTS)
        .map(|t| {
            gov.create_scope(&format!("t{t}"), Some(&db), 4 * MIB)
                .unwrap()
        })
        .collect();
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let deadlines = [2, 20, 200, 2_000].map(Duration::from_millis);
    let mut pending: Vec<Pending> = Vec::new();
    let mut held: Vec<(Instant, Reservation)> = Vec::new();
    let (mut seq, mut overtakes, mut limit_moves) = (0u64, 0u64, 0u64);
    let mut largest_wait = Duration::ZERO;
    let mut asked = [0u64; TENANTS];
    let mut granted = [0u64; TENANTS];
    let mut outcomes = [0u64; 3]; // granted, timed out, larger than its tenant's limit
    let start = Instant::now();
    let mut next_move = start;
    while start.elapsed() < RUN {
        let now = Instant::now();
        // Arrivals: a few requests, mostly in tenants, some outside every tenant.
        for _ in 0..rng.below(4) {
            let tenant = (rng.below(8) != 0).then(|| rng.below(TENANTS as u64) as usize);
            let bytes = (1 + rng.below(48)) * MIB / 16; // 64 KiB to 3 MiB
            let timeout = deadlines[rng.below(4) as usize];
            let scope = tenant.map(|t| &tenants[t]);
            let future = gov.reserve_async(EngineId::Query, scope, bytes, timeout);
            if let Some(t) = tenant {
                asked[t] += bytes;
            }
            pending.push(Pending {
                seq,
                tenant,
                bytes,
                made: Instant::now(),
                future,
            });
            seq += 1;
        }
        // Latest first: a request found granted, and an earlier one of the same tenant (or
        // one outside every tenant, which competes with all) found still waiting after it,
        // was granted while that one waited: an overtake.
        let mut still_waiting: Vec<(u64, Option<usize>)> = Vec::new();
        let mut granted_now: Vec<(u64, Option<usize>)> = Vec::new();
        let mut i = pending.len();
        while i > 0 {
            i -= 1;
            let p = &mut pending[i];
            match poll_once(&mut p.future) {
                Poll::Pending => {
                    still_waiting.push((p.seq, p.tenant));
                    continue;
                }
                Poll::Ready(Ok(r)) => {
                    assert_eq!(r.size(), p.bytes);
                    largest_wait = largest_wait.max(p.made.elapsed());
                    if let Some(t) = p.tenant {
                        granted[t] += p.bytes;
                    }
                    granted_now.push((p.seq, p.tenant));
                    outcomes[0] += 1;
                    let hold = Duration::from_micros(rng.below(3_000));
                    held.push((now + hold, r));
                }
                Poll::Ready(Err(e)) => match e {
                    MemError::WaitTimedOut { .. } => outcomes[1] += 1,
                    // Larger than its tenant's limit (refused when made, or when the limit
                    // was lowered under it while it waited).
                    MemError::NeverFits {
                        limit: Limit::Scope(_),
                        ..
                    } => outcomes[2] += 1,
                    other => panic!("{other:?}"),
                },
            }
            pending.swap_remove(i);
        }
        for &(g, gt) in &granted_now {
            overtakes += still_waiting
                .iter()
                .filter(|&&(w, wt)| w < g && (wt.is_none() || wt == gt))
                .count() as u64;
        }
        // Releases when their time comes.
        held.retain(|(until, _)| *until > now);
        // Limits move: a tenant's limit between 1 and 6 MiB, every 50 ms.
        if now >= next_move {
            let t = rng.below(TENANTS as u64) as usize;
            gov.set_scope_limit(&tenants[t], (1 + rng.below(6)) * MIB)
                .unwrap();
            limit_moves += 1;
            next_move = now + Duration::from_millis(50);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    drop(held);
    for p in pending.drain(..) {
        match wait_for(p.future) {
            Ok(_) => outcomes[0] += 1,
            Err(_) => outcomes[1] += 1,
        }
    }
    // Jain's fairness index of the tenants' served fractions (1 = all alike, 1/n = one
    // tenant served alone).
    let shares: Vec<f64> = (0..TENANTS)
        .map(|t| granted[t] as f64 / asked[t].max(1) as f64)
        .collect();
    let sum: f64 = shares.iter().sum();
    let squares: f64 = shares.iter().map(|x| x * x).sum();
    let fairness = sum * sum / (TENANTS as f64 * squares);
    eprintln!(
        "{seq} requests in {RUN:?}: {} granted, {} timed out, {} larger than their tenant's \
         limit; {limit_moves} limit moves; largest wait {largest_wait:?}; \
         overtakes {overtakes}; fairness index {fairness:.3}; served fractions {shares:.2?}",
        outcomes[0], outcomes[1], outcomes[2]
    );
    assert_eq!(overtakes, 0);
    assert!(outcomes[0] > 1_000, "{outcomes:?}");
    assert!(shares.iter().all(|&s| s > 0.0), "{shares:?}");
    assert!(fairness > 0.9, "{fairness}");
    // No request waits past its deadline by more than the serving thread's retry and a
    // round of this loop.
    assert!(
        largest_wait < Duration::from_millis(2_500),
        "{largest_wait:?}"
    );
    assert_eq!(gov.global_usage(), 0);
    gov.check_consistency().unwrap();
}
