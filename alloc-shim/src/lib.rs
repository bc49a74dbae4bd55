//! The allocation path of `nodedb-mem`: the `#[global_allocator]` that attributes every heap
//! allocation to an engine, and the engine identities it shares with the policy crate.
//!
//! This crate holds only what runs on (or right beside) every `malloc`; budgets, rebalancing
//! and metrics live in `nodedb-mem`, which re-exports everything here.
//!
//! # How an allocation is attributed
//!
//! * The thread's current engine is set by [`EngineGuard`] (a thread-local write).
//! * Each engine but `Unattributed` has jemalloc arenas (one per CPU of a node, up to four)
//!   created with our extent hooks, which carve their extents from one reserved virtual range
//!   per engine; the owner of any pointer is then found from its address alone. `Unattributed` is served by jemalloc's automatic arenas
//!   (everything outside the ranges).
//! * Charges and credits go to the owner by address, in the jemalloc size class actually
//!   handed out: a free on any thread, and a `realloc`, credit the engine that owns the memory.
//! * A thread's allocations and frees of its *home* engine's blocks of up to [`FAST_MAX`]
//!   (8 KiB − 1) go straight to jemalloc, which counts them; jemalloc's thread-event hook
//!   settles them into the [`charged`] ledger every [`Bound::interval`] (24 KiB by default), and
//!   the thread holds headroom bought within the engine's limit, so the ledger is never below
//!   the live bytes, never past the limit, and less than the in-flight bound
//!   ([`inflight_bound`]: 64 KiB by default, up to 4 MiB through [`INFLIGHT_BOUND_ENV`]) per
//!   thread above the live bytes.
//!   Everything else updates the ledger at once. See `ledger.rs` and `docs/design.md`.
//!
//! The hot path never allocates, locks, panics or unwinds, and works before `main`, during
//! thread start-up and teardown (after its thread-local is gone it charges the ledger directly).

mod alloc;
mod arena;
mod events;
mod guard;
mod ledger;
mod mallctl;
#[cfg(nodedb_mem_loom)]
#[doc(hidden)]
pub mod model;
mod numa;
mod overflow;
mod pin;
mod pushout;
mod size_class;
mod slot;
mod sync;
pub mod sys;
mod thread;
pub mod wake;

pub use alloc::{
    GovernedAlloc, RangeFallbacks, detached_operations, is_active, range_fallbacks,
    unrouted_allocations,
};
pub use arena::{
    ArenaFailure, ArenaStats, ArenaStatsByNode, MAX_RANGE_BYTES, MIN_RANGE_BYTES, NumaPolicy,
    RANGE_BYTES_ENV, allocator_resident, allocator_resident_as_refreshed, arena_failure,
    arena_index, arena_stats, arena_stats_by_node, arenas_ready, is_overflow, machine_topology,
    mbind_failures, node_of, node_range_bytes, owner, prevent_huge_pages, purge_all_arenas,
    purge_engine, range_bytes, range_exhaustions, set_numa_policy, shards,
};
pub use events::{ThreadEventCallback, register_thread_event_hook, thread_events_active};
pub use guard::{EngineGuard, GUARD_SLOTS};
pub use ledger::{
    Bound, DEFAULT_INFLIGHT_BOUND, DIRECT_THRESHOLD, FAST_MAX, INFLIGHT_BOUND_ENV,
    MAX_INFLIGHT_BOUND, MIN_INFLIGHT_BOUND, bound_from_env, charged, charged_peak, inflight_bound,
    overflow_charged, parse_bound, set_overflow_limit, take_window_peak, window_peak,
};
pub use numa::{MAX_CPUS, MAX_NODES, Topology};
pub use overflow::{
    OverflowBreaches, OverflowError, OverflowFigures, OverflowPolicy, OverflowRegion,
    OverflowStats, PageOutMethod, enable_overflow, fault as overflow_fault, is_forked_child,
    is_overflowing, overflow_breaches, overflow_figures, overflow_region, overflow_stats,
    page_out_overflow, set_overflow_policy,
};
pub use pin::{NumaError, bind_thread_to_local_numa, pin_thread_arena, thread_node};
pub use pushout::{
    PushOutStats, push_out_checks, push_out_stats, resident, resident_target, set_resident_target,
};
pub use thread::{
    HOME_SWITCH_AFTER, current_engine, explicit_caches_created, flush_thread, home_engine,
    home_switches, thread_settlements,
};

use core::fmt;
use core::str::FromStr;

/// One of the engines that share the process, plus one bucket for memory outside any engine.
///
/// The set is fixed at compile time, so per-engine state lives in plain arrays indexed by
/// [`EngineId::index`], and no engine can exist without a budget.
///
/// ```
/// use nodedb_mem_alloc::EngineId;
///
/// assert_eq!(EngineId::ALL.len(), EngineId::COUNT);
/// for (i, e) in EngineId::ALL.iter().enumerate() {
///     assert_eq!(e.index(), i);
///     assert_eq!(EngineId::from_index(i), Some(*e));
/// }
/// assert_eq!(EngineId::Query.to_string(), "query");
/// assert_eq!("timeseries".parse::<EngineId>(), Ok(EngineId::Timeseries));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum EngineId {
    /// Dense vector search (HNSW indexes and their vectors).
    Vector = 0,
    /// Sparse vector / inverted-index search.
    Sparse = 1,
    /// CRDT documents and their operation logs.
    Crdt = 2,
    /// Timeseries ingest and compressed segments.
    Timeseries = 3,
    /// SQL query execution (DataFusion).
    Query = 4,
    /// Memory allocated outside any engine's guard: runtime, networking, start-up.
    Unattributed = 5,
}

impl EngineId {
    /// The number of engines, including [`EngineId::Unattributed`].
    pub const COUNT: usize = 6;

    /// Every engine, in [`index`](EngineId::index) order.
    pub const ALL: [EngineId; EngineId::COUNT] = [
        EngineId::Vector,
        EngineId::Sparse,
        EngineId::Crdt,
        EngineId::Timeseries,
        EngineId::Query,
        EngineId::Unattributed,
    ];

    /// The engine's position in [`EngineId::ALL`], suitable for indexing per-engine arrays.
    #[inline]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The engine at `index`, or `None` when `index >= EngineId::COUNT`.
    #[inline]
    pub const fn from_index(index: usize) -> Option<EngineId> {
        if index < EngineId::COUNT {
            Some(EngineId::ALL[index])
        } else {
            None
        }
    }

    /// The engine's lower-case name, as used in metrics labels and configuration keys.
    pub const fn name(self) -> &'static str {
        match self {
            EngineId::Vector => "vector",
            EngineId::Sparse => "sparse",
            EngineId::Crdt => "crdt",
            EngineId::Timeseries => "timeseries",
            EngineId::Query => "query",
            EngineId::Unattributed => "unattributed",
        }
    }
}

impl fmt::Display for EngineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error returned when parsing a string that names no engine.
///
/// ```
/// use nodedb_mem_alloc::{EngineId, UnknownEngine};
/// assert_eq!("graph".parse::<EngineId>(), Err(UnknownEngine));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownEngine;

impl fmt::Display for UnknownEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "unknown engine: expected one of vector, sparse, crdt, timeseries, query, unattributed",
        )
    }
}

impl std::error::Error for UnknownEngine {}

impl FromStr for EngineId {
    type Err = UnknownEngine;

    /// Parses an engine name, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EngineId::ALL
            .iter()
            .copied()
            .find(|e| e.name().eq_ignore_ascii_case(s))
            .ok_or(UnknownEngine)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip() {
        for (i, a) in EngineId::ALL.iter().enumerate() {
            assert_eq!(a.name().parse::<EngineId>(), Ok(*a));
            assert_eq!(a.name().to_ascii_uppercase().parse::<EngineId>(), Ok(*a));
            for b in &EngineId::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    #[test]
    fn from_index_rejects_out_of_range() {
        assert_eq!(EngineId::from_index(EngineId::COUNT), None);
        assert_eq!(EngineId::from_index(usize::MAX), None);
    }

    #[test]
    fn engine_id_is_one_byte() {
        assert_eq!(core::mem::size_of::<EngineId>(), 1);
        assert_eq!(core::mem::size_of::<Option<EngineId>>(), 1);
    }
}
