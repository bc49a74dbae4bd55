//! The waiting tests' governor (included with `#[path]` by the test files that use it).

use nodedb_mem::{EngineId, MemoryGovernor};

/// Query 8 MiB, capped there (no rebalancing lends it more), ceiling 64 MiB, no overhead.
pub(crate) fn fixed_query() -> MemoryGovernor {
    MemoryGovernor::builder()
        .global_ceiling(64 << 20)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, 8u64 << 20)
        .cap(EngineId::Query, 8u64 << 20)
        .build()
        .unwrap()
}
