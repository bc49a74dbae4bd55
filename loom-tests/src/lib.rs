//! Loom models of nodedb-mem's lock-free accounting live in `tests/`. They only compile their
//! models when built with `RUSTFLAGS="--cfg nodedb_mem_loom"`; see `docs/testing.md`.

/// Runs `f` under loom, through every interleaving up to `LOOM_MAX_PREEMPTIONS` preemptions
/// (2 where the variable is not set: what CI runs).
#[cfg(nodedb_mem_loom)]
pub fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    builder.check(f);
}

/// A mebibyte.
#[cfg(nodedb_mem_loom)]
pub const MIB: u64 = 1 << 20;

/// The models' governor: 16 MiB ceiling, no overhead, Query 4 MiB, Vector 4 MiB (floor 1 MiB),
/// the rest sharing 8 MiB; rebalancing moves of any size.
#[cfg(nodedb_mem_loom)]
pub fn governor() -> nodedb_mem::MemoryGovernor {
    use nodedb_mem::{EngineId, MemoryGovernor, RebalanceConfig};
    MemoryGovernor::builder()
        .global_ceiling(16 * MIB)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, 4 * MIB)
        .budget(EngineId::Vector, 4 * MIB)
        .floor(EngineId::Vector, MIB)
        .rebalance(RebalanceConfig {
            min_move: 1,
            ..Default::default()
        })
        .build()
        .expect("a valid configuration")
}
