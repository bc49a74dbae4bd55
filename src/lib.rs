#![doc = include_str!("../README.md")]
//!
//! # Crate layout
//!
//! * [`EngineId`] — the closed set of engines (from the `nodedb-mem-alloc` crate, which the
//!   global allocator shares).
//! * [`MemoryGovernor`] — budgets under one ceiling: [`reserve`](MemoryGovernor::reserve),
//!   [`pressure`](MemoryGovernor::pressure), [`rebalance`](MemoryGovernor::rebalance),
//!   [`snapshot`](MemoryGovernor::snapshot), [`prometheus`](MemoryGovernor::prometheus).
//! * [`Budget`] — one engine's lock-free ledger.
//! * [`Scope`] — a named budget in a tree under the ceiling (a database, a tenant), for
//!   [`reserve_in`](MemoryGovernor::reserve_in); [`Reserving`] — a reservation being waited for
//!   ([`reserve_async`](MemoryGovernor::reserve_async),
//!   [`reserve_blocking`](MemoryGovernor::reserve_blocking)).
//! * [`MemError`] / [`Result`] — every refusal and configuration error, with its numbers.

mod admission;
mod budget;
mod cache;
mod ceiling;
mod cgroup;
mod config;
mod error;
mod events;
#[cfg(not(nodedb_mem_loom))]
mod fallible;
mod follow;
#[cfg(not(nodedb_mem_loom))]
mod future;
mod governor;
mod headroom;
#[cfg(not(nodedb_mem_loom))]
mod install;
mod kept;
mod ledger;
mod metrics;
mod pressure;
#[cfg(not(nodedb_mem_loom))]
pub mod profile;
mod rebalance;
#[cfg(not(nodedb_mem_loom))]
mod rebalancer;
mod reclaim;
mod resident;
mod rss;
mod scope;
mod size;
mod spill;
mod sync;
#[cfg(all(test, not(nodedb_mem_loom)))]
mod test_support;
#[cfg(not(nodedb_mem_loom))]
mod tick;
mod top_sites;
mod wait;
mod waiting;

pub use budget::Budget;
pub use cache::{
    FinishError, GovernedReader, GovernedWriter, MappedFile, PageCacheStats, Protected, SYNC_CHUNK,
    SweepStats, cached_bytes, resident_bytes,
};
pub use ceiling::{CeilingSource, DEFAULT_RAM_FRACTION, MEMORY_LIMIT_ENV};
pub use cgroup::{CgroupEvents, CgroupFigures, CgroupStat, CgroupVersion, MemoryPressure, PsiLine};
pub use config::{
    BACKGROUND_STRETCH_MAX, DEFAULT_BACKGROUND_INTERVAL, DEFAULT_CGROUP_MARGIN,
    DEFAULT_HEAP_PROFILE_INTERVAL, DEFAULT_MIN_PAGE_CACHE, DEFAULT_OVERHEAD_RESERVE,
    DEFAULT_RSS_MARGIN, DEFAULT_SWEEP_BUDGET, GovernorBuilder, MAX_CEILING, MAX_OVERFLOW_CAPACITY,
    MIN_CEILING, OVERFLOW_DISK_RESERVE, OverflowConfig, RebalanceConfig,
};
pub use error::{Limit, MemError, Result};
pub use events::{BreachEvent, CeilingCause, EVENT_CAPACITY, EventKind};
#[cfg(not(nodedb_mem_loom))]
pub use fallible::EngineAllocator;
pub use follow::{
    CeilingChange, PSI_FULL_CRITICAL, PSI_FULL_EMERGENCY, PSI_SOME_CRITICAL, PSI_SOME_WARNING,
};
#[cfg(not(nodedb_mem_loom))]
pub use future::{EngineExt, InEngine};
pub use governor::{DIRTY_ALLOWANCE_MIN, MemoryGovernor};
#[cfg(not(nodedb_mem_loom))]
pub use install::installed;
pub use ledger::Reservation;
pub use metrics::{EngineSnapshot, Snapshot};
pub use nodedb_mem_alloc::ctl::arenas::{
    ArenaFailure, ArenaStats, MAX_RANGE_BYTES, MIN_RANGE_BYTES, RANGE_BYTES_ENV, RangeFallbacks,
    arena_failure, fallback_range_bytes, is_overflow, node_of, owner, range_bytes, range_fallbacks,
};
pub use nodedb_mem_alloc::ctl::ledger::{
    Bound, DEFAULT_INFLIGHT_BOUND, DIRECT_THRESHOLD, INFLIGHT_BOUND_ENV, MAX_INFLIGHT_BOUND,
    MIN_INFLIGHT_BOUND, inflight_bound, set_overflow_limit,
};
pub use nodedb_mem_alloc::ctl::numa::{
    MAX_NODES, NumaError, NumaPolicy, Topology, bind_thread_to_local_numa, machine_topology,
    pin_thread_arena, thread_node,
};
pub use nodedb_mem_alloc::ctl::overflow::{
    OverflowBreaches, OverflowError, OverflowFigures, OverflowPolicy, OverflowRegion,
    OverflowStats, PageOutMethod, PushOutStats, enable_overflow, is_forked_child, is_overflowing,
    overflow_breaches, overflow_figures, overflow_region, overflow_stats, push_out_stats,
};
pub use nodedb_mem_alloc::ctl::thread::{current_engine, flush_thread, home_engine};
pub use nodedb_mem_alloc::{EngineGuard, EngineId, GUARD_SLOTS, GovernedAlloc, UnknownEngine};
pub use pressure::{PressureLevel, PressureThresholds};
#[cfg(not(nodedb_mem_loom))]
pub use profile::{Frame, FunctionBytes, HeapProfile, HeapSamples, ScopeTag, Site};
pub use rebalance::{RebalanceMove, RebalanceReport};
#[cfg(not(nodedb_mem_loom))]
pub use rebalancer::Rebalancer;
pub use reclaim::{Reclaimer, ReclaimerHandle};
pub use rss::RssSample;
pub use scope::{MAX_SCOPE_NAME, Scope, ScopeId, ScopeSnapshot};
pub use size::{ByteSize, Size, SizeError};
pub use spill::{SpillAction, SpillConfig, SpillController};
pub use top_sites::{TOP_SITES, TopSite, TopSites};
pub use waiting::{Reserving, WAIT_RETRY};
