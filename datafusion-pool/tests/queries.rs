//! Spillable queries under tight budgets, as a DataFusion user runs them: the same SQL under
//! `GovernorPool` and under DataFusion's own `FairSpillPool` at the same limit, on in-memory
//! tables, with `GovernedAlloc` counting every byte the query's threads allocate.

use std::sync::Arc;

use datafusion::arrow::array::{Array, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::datasource::MemTable;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{FairSpillPool, MemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::collect;
use datafusion::prelude::{SessionConfig, SessionContext};
use nodedb_mem::{EngineGuard, EngineId, GovernedAlloc, MemoryGovernor};
use nodedb_mem_datafusion::GovernorPool;

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const MIB: u64 = 1 << 20;
/// 2 M rows, as the failing report had them; 1 M in debug builds (DataFusion unoptimised takes
/// ~40 s a pass at 2 M), where the row_number query failed the same way before the fix.
const ROWS: i64 = if cfg!(debug_assertions) {
    1_000_000
} else {
    2_000_000
};
const BATCH: i64 = 8192;

/// Installs the governor with `limit` as the Query engine's fixed budget (one per test
/// process: nextest runs each test in its own).
fn governor(limit: u64) -> &'static MemoryGovernor {
    MemoryGovernor::builder()
        .global_ceiling(4u64 << 30)
        .budget(EngineId::Query, limit)
        .cap(EngineId::Query, limit)
        .background(None)
        .install()
        .expect("installs")
}

/// `t(k, v)`: `ROWS` rows, `k` in 0..ROWS/4, `v` a scrambled permutation; `u(k, w)`: one row
/// per key. Built outside any engine's guard (the host's data, not the query's).
fn tables() -> (Arc<MemTable>, Arc<MemTable>) {
    let t_schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
    ]));
    let u_schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("w", DataType::Int64, false),
    ]));
    let batch = |schema: &Arc<Schema>, a: Vec<i64>, b: Vec<i64>| {
        RecordBatch::try_new(
            Arc::clone(schema),
            vec![Arc::new(Int64Array::from(a)), Arc::new(Int64Array::from(b))],
        )
        .unwrap()
    };
    let scramble = |i: i64| (i * 7_919) % ROWS;
    // Two partitions, so both workers scan.
    let mut t_parts = vec![Vec::new(), Vec::new()];
    for (n, start) in (0..ROWS).step_by(BATCH as usize).enumerate() {
        let end = (start + BATCH).min(ROWS);
        let ks = (start..end).map(|i| scramble(i) % (ROWS / 4)).collect();
        let vs = (start..end).map(scramble).collect();
        t_parts[n % 2].push(batch(&t_schema, ks, vs));
    }
    let keys = ROWS / 4;
    let u_parts = vec![
        (0..keys)
            .step_by(BATCH as usize)
            .map(|s| {
                let e = (s + BATCH).min(keys);
                batch(
                    &u_schema,
                    (s..e).collect(),
                    (s..e).map(|k| k % 97).collect(),
                )
            })
            .collect(),
    ];
    (
        Arc::new(MemTable::try_new(t_schema, t_parts).unwrap()),
        Arc::new(MemTable::try_new(u_schema, u_parts).unwrap()),
    )
}

const QUERIES: [(&str, &str); 5] = [
    (
        "sort feeding a window",
        "SELECT count(*), sum(w) FROM (SELECT sum(v) OVER (ORDER BY v ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS w FROM t)",
    ),
    (
        "row_number per partition",
        "SELECT count(*), max(rn), sum(rn) FROM (SELECT row_number() OVER (PARTITION BY k ORDER BY v) AS rn FROM t)",
    ),
    (
        "aggregate",
        "SELECT count(*), sum(c), sum(s) FROM (SELECT k, count(*) AS c, sum(v) AS s FROM t GROUP BY k)",
    ),
    (
        "distinct",
        "SELECT count(*), sum(v) FROM (SELECT DISTINCT v FROM t)",
    ),
    (
        "hash join",
        "SELECT count(*), sum(t.v + u.w) FROM t JOIN u ON t.k = u.k",
    ),
];

/// Runs `sql` on a two-worker runtime whose threads are the Query engine's, with `pool`;
/// returns the one result row, or DataFusion's error.
fn run(
    sql: &str,
    pool: Arc<dyn MemoryPool>,
    t: &Arc<MemTable>,
    u: &Arc<MemTable>,
) -> Result<Vec<i64>, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(|| std::mem::forget(EngineGuard::enter(EngineId::Query)))
        .build()
        .unwrap();
    let spill = tempfile_dir();
    let out = rt.block_on(async {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(pool)
            .with_disk_manager_builder(
                DiskManagerBuilder::default()
                    .with_mode(DiskManagerMode::Directories(vec![spill.clone().into()])),
            )
            .build_arc()
            .map_err(|e| e.to_string())?;
        let ctx = SessionContext::new_with_config_rt(
            SessionConfig::new().with_target_partitions(2),
            runtime,
        );
        ctx.register_table("t", Arc::clone(t) as _)
            .map_err(|e| e.to_string())?;
        ctx.register_table("u", Arc::clone(u) as _)
            .map_err(|e| e.to_string())?;
        let plan = ctx
            .sql(sql)
            .await
            .map_err(|e| e.to_string())?
            .create_physical_plan()
            .await
            .map_err(|e| e.to_string())?;
        let batches = collect(plan, ctx.task_ctx())
            .await
            .map_err(|e| e.to_string())?;
        let b = batches.iter().find(|b| b.num_rows() > 0).ok_or("no row")?;
        Ok::<_, String>(
            (0..b.num_columns())
                .map(|i| {
                    let c = b.column(i);
                    c.as_any()
                        .downcast_ref::<Int64Array>()
                        .map(|a| a.value(0))
                        .or_else(|| {
                            c.as_any()
                                .downcast_ref::<datafusion::arrow::array::UInt64Array>()
                                .map(|a| a.value(0) as i64)
                        })
                        .unwrap_or(i64::MIN)
                })
                .collect(),
        )
    });
    drop(rt);
    let _ = std::fs::remove_dir_all(&spill);
    out
}

fn tempfile_dir() -> String {
    let d = std::env::temp_dir().join(format!("nodedb-mem-queries-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.to_string_lossy().into_owned()
}

/// Runs every query under both pools; returns the governed pools' refusals and their grants to
/// unspillable consumers past the budget.
fn compare(limit: u64) -> (u64, u64) {
    let gov = governor(limit);
    let (t, u) = tables();
    let mut failed = Vec::new();
    let (mut refusals, mut overdrafts) = (0, 0);
    for (name, sql) in QUERIES {
        let fair = run(sql, Arc::new(FairSpillPool::new(limit as usize)), &t, &u);
        let pool = Arc::new(GovernorPool::new(gov.clone(), EngineId::Query));
        let governed = run(sql, Arc::clone(&pool) as _, &t, &u);
        eprintln!(
            "{name} at {} MiB: fair {:?}, governed {:?} ({} refusals, query peak {} MiB, overflow {} MiB)",
            limit / MIB,
            fair,
            governed,
            pool.refusals(),
            gov.budget(EngineId::Query).peak() / MIB,
            gov.budget(EngineId::Query).overflow_bytes() / MIB,
        );
        if let Ok(f) = &fair
            && governed.as_ref() != Ok(f)
        {
            failed.push(format!("{name}: fair {fair:?}, governed {governed:?}"));
        }
        refusals += pool.refusals();
        overdrafts += pool.overdrafts();
        // The allocator never let the engine's ledger pass its limit, whatever was granted.
        assert!(gov.budget(EngineId::Query).peak() <= limit, "{name}");
    }
    assert!(failed.is_empty(), "{failed:#?}");
    eprintln!("{refusals} refusals, {overdrafts} grants to unspillable consumers past the budget");
    (refusals, overdrafts)
}

#[test]
fn spillable_queries_finish_at_32_mib_wherever_fair_spill_does() {
    // The budget is tight: the governor refused memory and operators spilled. The row_number
    // query's sort merges what it spilled through an unspillable consumer, which the budget
    // alone refused (the query failed with `ResourcesExhausted` before the pool granted such
    // consumers what `FairSpillPool` would). Whether a given run needs such a grant depends
    // on how the two partitions interleave (2–8 grants alone, none on a loaded machine), so
    // only the outcome is asserted; `tests/pool.rs` pins the rule itself.
    let (refusals, _) = compare(32 * MIB);
    assert!(refusals > 0, "{refusals} refusals");
}

#[test]
fn spillable_queries_finish_at_64_mib_wherever_fair_spill_does() {
    let _ = compare(64 * MIB);
}
