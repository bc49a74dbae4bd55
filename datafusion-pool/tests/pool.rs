//! The pool's admission follows the governor's budget, including what the allocator charged,
//! and nothing stays reserved in the governor.

use std::sync::Arc;

use datafusion_common::DataFusionError;
use datafusion_execution::memory_pool::{MemoryConsumer, MemoryLimit, MemoryPool};
use nodedb_mem::{EngineId, MemoryGovernor};
use nodedb_mem_datafusion::GovernorPool;

const MIB: usize = 1 << 20;

fn pool() -> (MemoryGovernor, Arc<dyn MemoryPool>) {
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .budget(EngineId::Query, (64 * MIB) as u64)
        .build()
        .unwrap();
    // No margin: these tests follow one rule at a time (the margin has tests of its own).
    let pool = GovernorPool::new(gov.clone(), EngineId::Query)
        .with_margin_percent(0)
        .unwrap();
    (gov, Arc::new(pool) as Arc<dyn MemoryPool>)
}

#[test]
fn grants_within_the_budget_and_refuses_past_it() {
    let (gov, pool) = pool();
    let a = MemoryConsumer::new("agg")
        .with_can_spill(true)
        .register(&pool);
    a.try_grow(40 * MIB).unwrap();
    assert_eq!(pool.reserved(), 40 * MIB);
    // Admission only: nothing stays reserved in the governor.
    assert_eq!(gov.usage(EngineId::Query), 0);
    assert_eq!(gov.budget(EngineId::Query).reserved(), 0);

    // The operator allocates what it reserved; the allocator (here: `charge`) counts it.
    gov.charge(EngineId::Query, (40 * MIB) as u64);
    let b = MemoryConsumer::new("sort")
        .with_can_spill(true)
        .register(&pool);
    let err = b.try_grow(30 * MIB).unwrap_err();
    assert!(
        matches!(err, DataFusionError::ResourcesExhausted(_)),
        "{err}"
    );
    assert!(
        err.to_string().contains(
            "cannot reserve 30 MiB for engine query: 40 MiB already used of its 64 MiB limit, 24 MiB available (consumer sort, holding 0 bytes)"
        ),
        "{err}"
    );
    b.try_grow(20 * MIB).unwrap();
    let p = pool.downcast_ref::<GovernorPool>().unwrap();
    assert_eq!(p.refusals(), 1);
    assert_eq!(pool.reserved(), 60 * MIB);

    drop((a, b));
    assert_eq!(pool.reserved(), 0);
    gov.credit(EngineId::Query, (40 * MIB) as u64).unwrap();
    assert!(matches!(pool.memory_limit(), MemoryLimit::Finite(l) if l == 64 * MIB));
}

#[test]
fn infallible_growth_is_recorded_and_shrinks_back() {
    let (_gov, pool) = pool();
    let r = MemoryConsumer::new("scan").register(&pool);
    r.grow(100 * MIB); // past the budget: DataFusion's infallible path is recorded, not refused
    assert_eq!(pool.reserved(), 100 * MIB);
    r.shrink(60 * MIB);
    assert_eq!(pool.reserved(), 40 * MIB);
    r.free();
    assert_eq!(pool.reserved(), 0);
    assert_eq!(
        pool.to_string(),
        "nodedb-mem governor pool (query engine budget)"
    );
    assert_eq!(pool.name(), "nodedb-mem governor pool");
}

#[test]
fn grants_not_yet_allocated_are_a_margin_for_the_next_request() {
    let (gov, pool) = pool();
    let p = pool.downcast_ref::<GovernorPool>().unwrap();
    let a = MemoryConsumer::new("partition 0").register(&pool);
    let b = MemoryConsumer::new("partition 1").register(&pool);
    a.try_grow(40 * MIB).unwrap();
    assert_eq!(p.outstanding(), (40 * MIB) as u64);
    // Nothing is held in the governor for it: the margin lives in the pool.
    assert_eq!(gov.usage(EngineId::Query), 0);
    // Partition 1 asks before partition 0 allocated: 40 + 30 MiB would not fit in 64 MiB.
    let err = b.try_grow(30 * MIB).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Resources exhausted: cannot admit 30 MiB for engine query: it fits the engine's budget \
         alone, but not beside 40 MiB granted and not allocated yet \
         (consumer partition 1, holding 0 bytes)"
    );
    // Partition 0 allocates what it was granted (the allocator charges it): the margin retires
    // and nothing is counted twice; the refusal now comes from real usage.
    gov.charge(EngineId::Query, (40 * MIB) as u64);
    let err = b.try_grow(30 * MIB).unwrap_err();
    assert!(
        err.to_string()
            .contains("40 MiB already used of its 64 MiB limit, 24 MiB available"),
        "{err}"
    );
    assert_eq!(p.outstanding(), 0);
    b.try_grow(20 * MIB).unwrap();
    // Giving back what was granted and never allocated shrinks the margin.
    b.shrink(20 * MIB);
    assert_eq!(p.outstanding(), 0);
    drop((a, b));
    gov.credit(EngineId::Query, (40 * MIB) as u64).unwrap();
}

#[test]
fn two_consumers_asking_at_once_cannot_both_take_the_same_headroom() {
    for _ in 0..50 {
        let (_gov, pool) = pool();
        let barrier = std::sync::Barrier::new(2);
        let granted: usize = std::thread::scope(|s| {
            let ask = |name: &'static str| {
                let pool = Arc::clone(&pool);
                let barrier = &barrier;
                s.spawn(move || {
                    let r = MemoryConsumer::new(name).register(&pool);
                    barrier.wait();
                    let ok = r.try_grow(40 * MIB).is_ok();
                    std::mem::forget(r); // keep the grant while the other asks
                    usize::from(ok)
                })
            };
            let (x, y) = (ask("left"), ask("right"));
            x.join().unwrap() + y.join().unwrap()
        });
        assert_eq!(granted, 1, "both partitions were admitted against 64 MiB");
    }
}

#[test]
fn asking_leaves_no_trace_in_the_engines_usage_or_peak() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .budget(EngineId::Query, 64 << 20)
        .build()
        .unwrap();
    let pool: Arc<dyn MemoryPool> = Arc::new(GovernorPool::new(gov.clone(), EngineId::Query));
    let r = MemoryConsumer::new("asker").register(&pool);
    r.try_grow(48 << 20).unwrap();
    // Granted: DataFusion's view holds it, the governor holds nothing and never did.
    assert_eq!(pool.reserved(), 48 << 20);
    assert_eq!(gov.usage(EngineId::Query), 0);
    assert_eq!(gov.budget(EngineId::Query).peak(), 0);
    assert_eq!(gov.budget(EngineId::Query).reserved(), 0);
    // A refusal is still the governor's, with its reason: asked beside the 48 MiB granted and
    // not yet allocated, then alone, both refused and counted.
    let err = r.try_grow(128 << 20).unwrap_err().to_string();
    assert!(err.contains("for engine query"), "{err}");
    assert_eq!(gov.budget(EngineId::Query).rejections(), 2);
    assert_eq!(gov.budget(EngineId::Query).peak(), 0);
}

#[test]
fn consumers_that_cannot_spill_are_granted_up_to_the_limit_beside_real_usage() {
    let (gov, pool) = pool();
    let p = pool.downcast_ref::<GovernorPool>().unwrap();
    // Spillable consumers took the budget and allocated it.
    let agg = MemoryConsumer::new("agg")
        .with_can_spill(true)
        .register(&pool);
    agg.try_grow(60 * MIB).unwrap();
    gov.charge(EngineId::Query, (60 * MIB) as u64);
    // A spillable consumer is refused: it spills.
    let sort = MemoryConsumer::new("ExternalSorter")
        .with_can_spill(true)
        .register(&pool);
    assert!(sort.try_grow(8 * MIB).is_err());
    // A merge cannot spill: refusing it would fail the query. It is granted while what
    // unspillable consumers hold stays within the engine's 64 MiB limit (its bytes past the
    // limit go to the engine's overflow region when allocated).
    let merge = MemoryConsumer::new("ExternalSorterMerge").register(&pool);
    merge.try_grow(8 * MIB).unwrap();
    merge.try_grow(40 * MIB).unwrap();
    assert_eq!(p.overdrafts(), 2);
    let err = merge.try_grow(17 * MIB).unwrap_err();
    assert!(
        err.to_string()
            .contains("consumer ExternalSorterMerge, holding 50331648 bytes"),
        "{err}"
    );
    merge.try_grow(16 * MIB).unwrap();
    assert_eq!(p.overdrafts(), 3);
    // Given back, the room is there again for unspillable consumers.
    merge.shrink(32 * MIB);
    merge.try_grow(32 * MIB).unwrap();
    assert_eq!(p.refusals(), 2);
    drop((agg, sort, merge));
    assert_eq!(pool.reserved(), 0);
    // Nothing the pool granted was ever reserved in the governor.
    assert_eq!(gov.budget(EngineId::Query).reserved(), 0);
    gov.credit(EngineId::Query, (60 * MIB) as u64).unwrap();
}

fn default_pool() -> (MemoryGovernor, Arc<dyn MemoryPool>) {
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .budget(EngineId::Query, (64 * MIB) as u64)
        .build()
        .unwrap();
    let pool: Arc<dyn MemoryPool> = Arc::new(GovernorPool::new(gov.clone(), EngineId::Query));
    (gov, pool)
}

#[test]
fn spillable_consumers_leave_a_quarter_of_the_limit_free_by_default() {
    let (gov, pool) = default_pool();
    let p = pool.downcast_ref::<GovernorPool>().unwrap();
    assert_eq!(p.margin(), (16 * MIB) as u64);
    let agg = MemoryConsumer::new("agg")
        .with_can_spill(true)
        .register(&pool);
    agg.try_grow(48 * MIB).unwrap();
    gov.charge(EngineId::Query, (48 * MIB) as u64);
    let err = agg.try_grow(MIB).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Resources exhausted: cannot admit 1 MiB for engine query: it fits the engine's budget \
         alone, but not beside 16 MiB of margin for growth operators make before they ask \
         (consumer agg, holding 50331648 bytes)"
    );
    // The margin is not reserved: the allocator's charges use it (here: the operator's own
    // growth before it asks), and a consumer that cannot spill is granted without it.
    gov.charge(EngineId::Query, (8 * MIB) as u64);
    let merge = MemoryConsumer::new("merge").register(&pool);
    merge.try_grow(8 * MIB).unwrap();
    assert_eq!(p.overdrafts(), 0, "8 MiB fit the limit: no overdraft");
    assert_eq!(gov.budget(EngineId::Query).reserved(), 0);
    drop((agg, merge));
    gov.credit(EngineId::Query, (56 * MIB) as u64).unwrap();
}

#[test]
fn the_margin_grows_to_the_largest_excess_seen_and_no_further_than_half_the_limit() {
    let (gov, pool) = default_pool();
    let p = pool.downcast_ref::<GovernorPool>().unwrap();
    let agg = MemoryConsumer::new("agg")
        .with_can_spill(true)
        .register(&pool);
    agg.try_grow(8 * MIB).unwrap();
    // The engine goes 24 MiB past its limit (an operator grew before it asked).
    gov.charge(EngineId::Query, (88 * MIB) as u64);
    assert!(agg.try_grow(MIB).is_err());
    assert_eq!(p.margin(), (24 * MIB) as u64);
    // Freed again, the margin stays learned: beside it and the 8 MiB agg holds by DataFusion's
    // count (nothing charged), 32 MiB fit and 33 do not.
    gov.credit(EngineId::Query, (88 * MIB) as u64).unwrap();
    let err = agg.try_grow(33 * MIB).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Resources exhausted: cannot admit 33 MiB for engine query: it fits the engine's budget \
         alone, but not beside 8 MiB granted and not allocated yet and 24 MiB of margin for \
         growth operators make before they ask (consumer agg, holding 8388608 bytes)"
    );
    agg.try_grow(32 * MIB).unwrap();
    agg.free();
    // A larger excess raises it, to half the limit at most.
    gov.charge(EngineId::Query, (104 * MIB) as u64);
    assert!(agg.try_grow(4 * MIB).is_err());
    assert_eq!(p.margin(), (32 * MIB) as u64);
    gov.credit(EngineId::Query, (104 * MIB) as u64).unwrap();
}

#[test]
fn a_spillable_consumer_holding_little_is_spared_the_margin() {
    let (gov, pool) = default_pool();
    gov.charge(EngineId::Query, (56 * MIB) as u64);
    let holder = MemoryConsumer::new("holder")
        .with_can_spill(true)
        .register(&pool);
    holder.grow(2 * MIB);
    // Holding a thirty-second of the limit (2 MiB of 64), it can spill to make room: held to
    // the 16 MiB margin.
    assert!(holder.try_grow(2 * MIB).is_err());
    // Holding less (an aggregation just after its spill), a refusal would fail its query: it
    // gets what fits the budget.
    let small = MemoryConsumer::new("small")
        .with_can_spill(true)
        .register(&pool);
    small.grow(MIB);
    small.try_grow(2 * MIB).unwrap();
    let fresh = MemoryConsumer::new("fresh")
        .with_can_spill(true)
        .register(&pool);
    fresh.try_grow(2 * MIB).unwrap();
    let p = pool.downcast_ref::<GovernorPool>().unwrap();
    assert_eq!((p.refusals(), p.overdrafts()), (1, 0));
    drop((holder, small, fresh));
    gov.credit(EngineId::Query, (56 * MIB) as u64).unwrap();
}

#[test]
fn what_datafusion_holds_beyond_the_charged_bytes_counts_as_granted() {
    let (gov, pool) = pool();
    let other = MemoryConsumer::new("other")
        .with_can_spill(true)
        .register(&pool);
    other.try_grow(2 * MIB).unwrap();
    // Another consumer holds 30 MiB by DataFusion's accounting (its infallible `grow`, or
    // headroom an aggregation reserves for a later sort) that nothing has allocated yet.
    let agg = MemoryConsumer::new("agg")
        .with_can_spill(true)
        .register(&pool);
    agg.grow(30 * MIB);
    let err = other.try_grow(33 * MIB).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Resources exhausted: cannot admit 33 MiB for engine query: it fits the engine's budget \
         alone, but not beside 32 MiB granted and not allocated yet (consumer other, holding \
         2097152 bytes)"
    );
    other.try_grow(32 * MIB).unwrap();
    // Allocated, the bytes are counted once: charged, no longer pending.
    gov.charge(EngineId::Query, (64 * MIB) as u64);
    assert!(other.try_grow(MIB).unwrap_err().to_string().contains(
        "cannot reserve 1 MiB for engine query: 64 MiB already used of its 64 MiB limit"
    ));
    drop((agg, other));
    gov.credit(EngineId::Query, (64 * MIB) as u64).unwrap();
}

#[test]
fn the_margin_share_is_checked() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .build()
        .unwrap();
    let pool = GovernorPool::new(gov.clone(), EngineId::Query)
        .with_margin_percent(50)
        .unwrap();
    assert_eq!(pool.margin(), gov.limit(EngineId::Query) / 2);
    let err = GovernorPool::new(gov, EngineId::Query)
        .with_margin_percent(51)
        .unwrap_err();
    assert!(
        matches!(&err, nodedb_mem::MemError::InvalidConfig { field, .. } if field == "margin_percent"),
        "{err}"
    );
}

#[test]
fn repartition_is_granted_like_a_consumer_that_cannot_spill() {
    let (gov, pool) = default_pool();
    let p = pool.downcast_ref::<GovernorPool>().unwrap();
    gov.charge(EngineId::Query, (60 * MIB) as u64);
    // Registered as spillable, as DataFusion does; refusing it would send it down the spill
    // path that can hang the query. Granted within the limit despite the real usage.
    let rep = MemoryConsumer::new("RepartitionExec[0]")
        .with_can_spill(true)
        .register(&pool);
    rep.try_grow(8 * MIB).unwrap();
    rep.try_grow(8 * MIB).unwrap();
    assert_eq!(p.overdrafts(), 2);
    assert!(rep.try_grow(60 * MIB).is_err());
    // An aggregation holding memory is still held to the margin.
    let agg = MemoryConsumer::new("GroupedHashAggregateStream[0]")
        .with_can_spill(true)
        .register(&pool);
    agg.grow(MIB);
    assert!(agg.try_grow(MIB).is_err());
    drop((rep, agg));
    gov.credit(EngineId::Query, (60 * MIB) as u64).unwrap();
}

#[test]
fn a_spillable_consumer_holding_little_is_granted_even_at_the_limit() {
    let (gov, pool) = default_pool();
    let p = pool.downcast_ref::<GovernorPool>().unwrap();
    // The engine is at its limit by real usage (a take-back lowered it, say).
    gov.charge(EngineId::Query, (64 * MIB) as u64);
    // An aggregation that has just spilled re-reserves its small state: refusing it would
    // fail the query, spilling again would free nothing. Granted while it holds under a
    // thirty-second of the limit (2 MiB of 64).
    let agg = MemoryConsumer::new("FinalHashAggregateStream[1]")
        .with_can_spill(true)
        .register(&pool);
    agg.try_grow(256 << 10).unwrap();
    agg.try_grow(1 << 20).unwrap();
    assert_eq!(p.overdrafts(), 2);
    // Past that share it holds enough to spill: refused.
    let err = agg.try_grow(1 << 20).unwrap_err();
    assert!(
        err.to_string()
            .contains("64 MiB already used of its 64 MiB limit"),
        "{err}"
    );
    assert_eq!(p.refusals(), 1);
    drop(agg);
    gov.credit(EngineId::Query, (64 * MIB) as u64).unwrap();
}

#[test]
fn the_share_a_small_consumer_is_spared_is_bounded_by_the_limit() {
    // A 128 KiB limit, as DataFusion's own memory-limit tests use for sorts.
    let limit = 128u64 << 10;
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .budget(EngineId::Query, limit)
        .cap(EngineId::Query, limit)
        .build()
        .unwrap();
    let pool: Arc<dyn MemoryPool> = Arc::new(GovernorPool::new(gov.clone(), EngineId::Query));
    gov.charge(EngineId::Query, limit);
    // A sorter that grows by 1 KiB per batch, spillable: spared while it holds under an
    // eighth of the limit, then refused (so it spills), never granted past that.
    let sorter = MemoryConsumer::new("ExternalSorter[0]")
        .with_can_spill(true)
        .register(&pool);
    let mut granted = 0u64;
    while sorter.try_grow(1024).is_ok() {
        granted += 1024;
        assert!(
            granted <= limit,
            "granted {granted} B beside a {limit} B limit"
        );
    }
    // Granted while what it would hold stays under an eighth (16 KiB): 15 KiB. It was
    // 1,047,552 B (8x the limit) with a flat 1 MiB share.
    assert_eq!(sorter.size() as u64, limit / 8 - 1024);
    drop(sorter);
    gov.credit(EngineId::Query, limit).unwrap();
}
