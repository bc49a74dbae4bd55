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
    let pool: Arc<dyn MemoryPool> = Arc::new(GovernorPool::new(gov.clone(), EngineId::Query));
    (gov, pool)
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
         alone, but not beside 40 MiB granted to other consumers and not allocated yet \
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
