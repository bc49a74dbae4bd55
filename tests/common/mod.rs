//! Setup shared by the integration tests.

use nodedb_mem::{EngineId, MemoryGovernor, RebalanceConfig};

pub(crate) const MIB: u64 = 1 << 20;

/// 100 MiB ceiling, no overhead reserve, Query and Vector 40 MiB each (floor 10 MiB), the four
/// other engines 5 MiB each; moves of any size.
pub(crate) fn two_big_engines() -> MemoryGovernor {
    MemoryGovernor::builder()
        .global_ceiling(100 * MIB)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, 40 * MIB)
        .floor(EngineId::Query, 10 * MIB)
        .budget(EngineId::Vector, 40 * MIB)
        .floor(EngineId::Vector, 10 * MIB)
        .budget(EngineId::Sparse, 5 * MIB)
        .budget(EngineId::Crdt, 5 * MIB)
        .budget(EngineId::Timeseries, 5 * MIB)
        .budget(EngineId::Unattributed, 5 * MIB)
        .rebalance(RebalanceConfig {
            min_move: 1,
            ..Default::default()
        })
        .build()
        .unwrap()
}
