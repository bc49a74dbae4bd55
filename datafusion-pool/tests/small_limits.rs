//! Sorts under the small limits DataFusion's own memory-limit tests use for spilling
//! (`datafusion/core/tests/memory_limit`: a 128 KiB pool, 64 KiB reserved for the merge, no
//! in-place sort, 64-row batches, one partition), run under `GovernorPool` at the same limit
//! and under `FairSpillPool`: every sort `FairSpillPool` finishes by spilling finishes under the
//! governor too, with the same rows, and spills. With a flat 1 MiB spared to small spillable
//! consumers, the sorter was granted up to 8x the limit before it spilled and its merge was
//! then refused (`ResourcesExhausted` on `ExternalSorterMerge`).

use std::sync::Arc;

use datafusion::arrow::array::{Array, Int64Array};
use datafusion::execution::memory_pool::{FairSpillPool, MemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::{ExecutionPlan, collect};
use datafusion::prelude::{SessionConfig, SessionContext};
use nodedb_mem::{EngineId, MemoryGovernor};
use nodedb_mem_datafusion::GovernorPool;

/// The settings of DataFusion's disk-spill cases, with `pool`.
fn context(pool: Arc<dyn MemoryPool>) -> SessionContext {
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .build_arc()
        .unwrap();
    let config = SessionConfig::new()
        .with_sort_spill_reservation_bytes(64 * 1024)
        .with_sort_in_place_threshold_bytes(0)
        .with_batch_size(64)
        .with_target_partitions(1);
    SessionContext::new_with_config_rt(config, runtime)
}

/// Runs `select * from generate_series(1, rows) order by v1 desc` under `pool`; returns the
/// values in order and how often the plan spilled, or the error.
fn sort(pool: Arc<dyn MemoryPool>, rows: i64) -> Result<(Vec<i64>, usize), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let ctx = context(pool);
        let df = ctx
            .sql(&format!(
                "select * from generate_series(1, {rows}) as t1(v1) order by v1 desc"
            ))
            .await
            .map_err(|e| e.to_string())?;
        let plan = df.create_physical_plan().await.map_err(|e| e.to_string())?;
        let batches = collect(Arc::clone(&plan), ctx.task_ctx())
            .await
            .map_err(|e| e.to_string())?;
        let values: Vec<i64> = batches
            .iter()
            .flat_map(|b| {
                let col = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                (0..col.len()).map(|i| col.value(i)).collect::<Vec<_>>()
            })
            .collect();
        Ok((values, spills(plan.as_ref())))
    })
}

/// Spills counted by `plan` and every plan under it.
fn spills(plan: &dyn ExecutionPlan) -> usize {
    let own = plan.metrics().and_then(|m| m.spill_count()).unwrap_or(0);
    own + plan
        .children()
        .into_iter()
        .map(|c| spills(c.as_ref()))
        .sum::<usize>()
}

fn governor_pool(limit: u64) -> (MemoryGovernor, Arc<GovernorPool>) {
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .budget(EngineId::Query, limit)
        .cap(EngineId::Query, limit)
        .build()
        .unwrap();
    let pool = Arc::new(GovernorPool::new(gov.clone(), EngineId::Query));
    (gov, pool)
}

fn sorts_like_fair_spill(rows: i64, limit: u64) {
    let fair = sort(Arc::new(FairSpillPool::new(limit as usize)), rows)
        .unwrap_or_else(|e| panic!("FairSpillPool at {limit} B, {rows} rows: {e}"));
    assert!(fair.1 > 0, "FairSpillPool did not spill");
    let (gov, pool) = governor_pool(limit);
    let governed = sort(pool.clone() as Arc<dyn MemoryPool>, rows)
        .unwrap_or_else(|e| panic!("GovernorPool at {limit} B, {rows} rows: {e}"));
    let expected: Vec<i64> = (1..=rows).rev().collect();
    assert_eq!(fair.0, expected);
    assert_eq!(governed.0, expected);
    assert!(governed.1 > 0, "GovernorPool did not spill");
    // Nothing stays granted, and nothing stayed in the governor.
    assert_eq!(pool.reserved(), 0);
    assert_eq!(gov.usage(EngineId::Query), 0);
}

#[test]
fn ten_thousand_rows_sorted_under_128_kib() {
    sorts_like_fair_spill(10_000, 128 * 1024);
}

#[test]
fn a_hundred_thousand_rows_sorted_under_128_kib() {
    sorts_like_fair_spill(100_000, 128 * 1024);
}
