//! The query engine: Apache DataFusion runs a high-cardinality `GROUP BY` over a generated
//! table, with a [`GovernorPool`] as its memory pool, so that its hash aggregation spills to
//! disk when the governor refuses the Query engine more memory.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, Float64Array, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::streaming::StreamingTable;
use datafusion::execution::TaskContext;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{MemoryPool, UnboundedMemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::streaming::PartitionStream;
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream, collect};
use datafusion::prelude::{SessionConfig, SessionContext};
use nodedb_mem::{EngineGuard, EngineId, MemoryGovernor};
use nodedb_mem_datafusion::GovernorPool;

use crate::stats::EngineStats;

/// Rows per generated batch.
const BATCH_ROWS: u64 = 8192;
/// Row `i` belongs to group `i * STRIDE % groups`: a prime larger than any group count, so
/// the rows visit every group when there are at least as many rows as groups.
const STRIDE: u64 = 2_654_435_761;

/// The query every round runs: a `GROUP BY` with one group per distinct key, folded into one
/// row that can be checked exactly.
pub(crate) const SQL: &str = "SELECT count(*) AS groups, sum(c) AS rows, sum(s) AS total, \
     sum(hi - lo) AS spread \
     FROM (SELECT k, count(*) AS c, sum(v) AS s, min(v) AS lo, max(v) AS hi FROM t GROUP BY k) g";

/// What the engine is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct QueryConfig {
    /// Rows in the table.
    pub(crate) rows: u64,
    /// Distinct keys.
    pub(crate) groups: u64,
    /// DataFusion's target partitions (and the generator's).
    pub(crate) partitions: usize,
    /// Where DataFusion writes its spill files.
    pub(crate) spill_dir: std::path::PathBuf,
    /// Queries run until this instant (at least one).
    pub(crate) deadline: Instant,
    /// At most this many queries.
    pub(crate) max_queries: u64,
    /// Idle time between two queries (the engine's demand comes in waves).
    pub(crate) pause: Duration,
}

/// What the engine did.
#[derive(Debug, Clone, Default)]
pub(crate) struct QueryOutcome {
    pub(crate) queries: u64,
    pub(crate) rows: u64,
    pub(crate) elapsed: Duration,
    /// Spill files DataFusion wrote (its operators' `spill_count`).
    pub(crate) spills: u64,
    pub(crate) spilled_bytes: u64,
    /// `try_grow` calls the pool refused.
    pub(crate) refusals: u64,
    /// Queries whose result differed from the expected one (must be zero).
    pub(crate) wrong_results: u64,
    /// The first wrong result, for the report.
    pub(crate) first_error: Option<String>,
}

/// One partition of the generated table: rows `part, part + parts, …` below `rows`.
#[derive(Debug)]
struct Generator {
    schema: SchemaRef,
    part: u64,
    parts: u64,
    rows: u64,
    groups: u64,
    /// Rows generated count as the engine's live throughput.
    stats: Arc<EngineStats>,
}

fn value(i: u64) -> f64 {
    (i % 1000) as f64 * 0.5
}

impl PartitionStream for Generator {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    fn execute(&self, _ctx: Arc<TaskContext>) -> SendableRecordBatchStream {
        let (schema, part, parts, rows, groups) = (
            Arc::clone(&self.schema),
            self.part,
            self.parts,
            self.rows,
            self.groups,
        );
        let stats = Arc::clone(&self.stats);
        let mine = rows / parts + u64::from(part < rows % parts);
        let batches = mine.div_ceil(BATCH_ROWS);
        let stream = futures::stream::iter((0..batches).map(move |b| {
            let first = b * BATCH_ROWS;
            let n = BATCH_ROWS.min(mine - first);
            stats.add_ops(n);
            let ids = (first..first + n).map(|j| j * parts + part);
            let k = Int64Array::from_iter_values(ids.clone().map(|i| (i * STRIDE % groups) as i64));
            let v = Float64Array::from_iter_values(ids.map(value));
            RecordBatch::try_new(Arc::clone(&schema), vec![Arc::new(k), Arc::new(v)])
                .map_err(Into::into)
        }));
        Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            stream,
        ))
    }
}

/// The exact answer: (groups, rows, total of v, sum over groups of max - min).
fn expected(rows: u64, groups: u64) -> (i64, i64, f64) {
    let total: f64 = (0..rows).map(value).sum();
    (rows.min(groups) as i64, rows as i64, total)
}

/// Sums a metric over every operator of an executed plan.
fn sum_metric(plan: &Arc<dyn ExecutionPlan>, f: fn(&dyn ExecutionPlan) -> usize) -> u64 {
    f(plan.as_ref()) as u64
        + plan
            .children()
            .into_iter()
            .map(|c| sum_metric(c, f))
            .sum::<u64>()
}

/// Runs the engine: a Tokio runtime whose threads all work for the Query engine, DataFusion on
/// it, queries until the deadline.
pub(crate) fn run(
    cfg: &QueryConfig,
    gov: Option<&MemoryGovernor>,
    stats: &Arc<EngineStats>,
) -> Result<QueryOutcome, String> {
    let _guard = EngineGuard::enter(EngineId::Query);
    let governed = gov.is_some();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.partitions.max(1))
        .thread_name("query-worker")
        .on_thread_start(move || {
            if governed {
                // The runtime's threads (workers and blocking pool) exist only for DataFusion:
                // everything they allocate is the Query engine's for their whole life.
                std::mem::forget(EngineGuard::enter(EngineId::Query));
            }
        })
        .build()
        .map_err(|e| format!("starting the query runtime: {e}"))?;
    if let Some(g) = gov {
        // DataFusion writes its spill files itself: the governor's background thread drops
        // them from the page cache behind it, so a spilling query does not evict other
        // engines' pages.
        g.govern_dir(EngineId::Query, &cfg.spill_dir)
            .map_err(|e| format!("governing the spill directory: {e}"))?;
    }
    let governor_pool = gov.map(|g| Arc::new(GovernorPool::new(g.clone(), EngineId::Query)));
    let pool: Arc<dyn MemoryPool> = match &governor_pool {
        Some(p) => Arc::clone(p) as Arc<dyn MemoryPool>,
        None => Arc::new(UnboundedMemoryPool::default()),
    };
    let result = rt.block_on(queries(cfg, pool, governor_pool.as_deref(), stats));
    drop(rt);
    stats.finish();
    result
}

async fn queries(
    cfg: &QueryConfig,
    pool: Arc<dyn MemoryPool>,
    governor_pool: Option<&GovernorPool>,
    stats: &Arc<EngineStats>,
) -> Result<QueryOutcome, String> {
    let err = |what: &str| {
        let what = what.to_owned();
        move |e: datafusion::error::DataFusionError| format!("{what}: {e}")
    };
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(pool)
        .with_disk_manager_builder(
            DiskManagerBuilder::default()
                .with_mode(DiskManagerMode::Directories(vec![cfg.spill_dir.clone()])),
        )
        .build_arc()
        .map_err(err("configuring DataFusion"))?;
    let config = SessionConfig::new()
        .with_target_partitions(cfg.partitions.max(1))
        .with_batch_size(BATCH_ROWS as usize);
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    let schema: SchemaRef = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Float64, false),
    ]));
    let parts = cfg.partitions.max(1) as u64;
    let partitions: Vec<Arc<dyn PartitionStream>> = (0..parts)
        .map(|part| {
            Arc::new(Generator {
                schema: Arc::clone(&schema),
                part,
                parts,
                rows: cfg.rows,
                groups: cfg.groups.max(1),
                stats: Arc::clone(stats),
            }) as Arc<dyn PartitionStream>
        })
        .collect();
    let table = StreamingTable::try_new(Arc::clone(&schema), partitions)
        .map_err(err("creating the table"))?;
    ctx.register_table("t", Arc::new(table))
        .map_err(err("registering the table"))?;

    let want = expected(cfg.rows, cfg.groups.max(1));
    let mut o = QueryOutcome::default();
    let started = Instant::now();
    while o.queries == 0 || (o.queries < cfg.max_queries && Instant::now() < cfg.deadline) {
        let plan = ctx
            .sql(SQL)
            .await
            .map_err(err("planning"))?
            .create_physical_plan()
            .await
            .map_err(err("planning"))?;
        let batches = collect(Arc::clone(&plan), ctx.task_ctx())
            .await
            .map_err(err("running the GROUP BY"))?;
        o.queries += 1;
        o.rows += cfg.rows;
        let spills = sum_metric(&plan, |p| {
            p.metrics().and_then(|m| m.spill_count()).unwrap_or(0)
        });
        o.spills += spills;
        stats.spills.fetch_add(spills, Ordering::Relaxed);
        o.spilled_bytes += sum_metric(&plan, |p| {
            p.metrics().and_then(|m| m.spilled_bytes()).unwrap_or(0)
        });
        if let Some(p) = governor_pool {
            o.refusals = p.refusals();
            stats.rejections.store(o.refusals, Ordering::Relaxed);
        }
        if let Err(e) = check(&batches, want) {
            o.wrong_results += 1;
            o.first_error.get_or_insert(e);
        }
        drop(batches);
        // The loop runs on this thread (`block_on`) and nothing else waits for it here: a
        // plain sleep idles it without holding a runtime worker.
        let wake = (Instant::now() + cfg.pause).min(cfg.deadline);
        std::thread::sleep(wake.saturating_duration_since(Instant::now()));
    }
    o.elapsed = started.elapsed();
    Ok(o)
}

/// Compares the one result row with the expected answer.
fn check(batches: &[RecordBatch], (groups, rows, total): (i64, i64, f64)) -> Result<(), String> {
    let batch = batches
        .iter()
        .find(|b| b.num_rows() > 0)
        .ok_or("the query returned no row")?;
    let int = |i: usize| -> Result<i64, String> {
        let a = batch.column(i).as_any().downcast_ref::<Int64Array>();
        a.filter(|a| !a.is_null(0))
            .map(|a| a.value(0))
            .ok_or_else(|| format!("column {i} is not a non-null BIGINT"))
    };
    let float = |i: usize| -> Result<f64, String> {
        let a = batch.column(i).as_any().downcast_ref::<Float64Array>();
        a.filter(|a| !a.is_null(0))
            .map(|a| a.value(0))
            .ok_or_else(|| format!("column {i} is not a non-null DOUBLE"))
    };
    let got = (int(0)?, int(1)?, float(2)?);
    // Every value is a multiple of 0.5 and every partial sum stays far below 2^52: the sums
    // are exact in any order.
    if got != (groups, rows, total) {
        return Err(format!(
            "got (groups, rows, total) = {got:?}, expected {:?}",
            (groups, rows, total)
        ));
    }
    let spread = float(3)?;
    if !spread.is_finite() || spread < 0.0 {
        return Err(format!("sum(max - min) = {spread}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_answer_counts_every_group_once() {
        assert_eq!(expected(10, 4), (4, 10, (0..10).map(value).sum()));
        assert_eq!(expected(3, 100), (3, 3, 1.5));
    }

    #[test]
    fn datafusion_answers_the_query_exactly_without_a_governor() {
        let stats = Arc::new(EngineStats::default());
        let dir = std::env::temp_dir();
        let cfg = QueryConfig {
            rows: 50_000,
            groups: 20_000,
            partitions: 2,
            spill_dir: dir,
            deadline: Instant::now(),
            max_queries: 1,
            pause: Duration::ZERO,
        };
        let o = run(&cfg, None, &stats).expect("runs");
        assert_eq!(
            (o.queries, o.rows, o.wrong_results),
            (1, 50_000, 0),
            "{o:?}"
        );
        assert_eq!(o.spills, 0);
        assert_eq!(stats.ops(), 50_000);
    }
}
