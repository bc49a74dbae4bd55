//! The engine arenas and the address space, as the governor reads and drives them: who owns a
//! pointer, the ranges and why they may be missing, jemalloc's statistics per engine, purges.

use std::ffi::c_uint;

pub use crate::route::{RangeFallbacks, range_fallbacks};
pub use crate::space::arenas::{arena_failure, arenas_ready, range_exhaustions, shards};
pub use crate::space::reservation::{
    ArenaFailure, MAX_RANGE_BYTES, MIN_RANGE_BYTES, RANGE_BYTES_ENV, fallback_claimed_bytes,
    fallback_range_bytes, node_of, node_range_bytes, prevent_huge_pages, range_bytes,
};

use crate::id::{ARENA_ENGINES, EngineId, Node, Slot};
use crate::overflow::overflow_arena;
use crate::space::arenas::{arena_of, arenas_of, ensure_arenas, purge_arena};
use crate::space::reservation::owner_of;
use crate::sys::PAGE;
use crate::sys::mallctl::{ALL_ARENAS, Ctl, keys};
use crate::sys::numa::MAX_NODES;

/// jemalloc's view of one engine's arena, from `stats.arenas.<i>.*`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArenaStats {
    /// Bytes of physical memory the arena's pages occupy (`resident`).
    pub resident: u64,
    /// Bytes in active pages, i.e. backing live allocations (`pactive` × page size).
    pub active: u64,
    /// Bytes in dirty pages, freed but not yet returned to the system (`pdirty` × page size).
    pub dirty: u64,
    /// Bytes mapped by the arena (`mapped`).
    pub mapped: u64,
}

/// Statistic `key` of `arena` (all these are `size_t`), 0 if unavailable.
fn read_stat(key: &Ctl<usize, (), 4>, arena: c_uint) -> u64 {
    key.at(keys::STATS_ARENA_PART, arena)
        .read()
        .map_or(0, |v| v as u64)
}

/// Asks jemalloc to refresh its statistics.
fn refresh_stats() {
    let _ = keys::EPOCH.write(1);
}

/// Refreshes jemalloc's statistics (`epoch`) and reads every engine's arena figures (summed
/// over its nodes). `Unattributed` gets the automatic arenas' share: all arenas minus the
/// engines' and their overflow arenas'. All zero before the engine arenas exist. Costs tens of
/// microseconds: sample it, never call it per allocation.
pub fn arena_stats() -> [ArenaStats; EngineId::COUNT] {
    arena_stats_by_node().0
}

/// Per-engine figures for each node, indexed `[engine][node]` (zero where there is no arena).
pub type ArenaStatsByNode = [[ArenaStats; MAX_NODES]; EngineId::COUNT];

/// As [`arena_stats`], and the same figures per node.
pub fn arena_stats_by_node() -> ([ArenaStats; EngineId::COUNT], ArenaStatsByNode) {
    let mut out = [ArenaStats::default(); EngineId::COUNT];
    let mut by_node = [[ArenaStats::default(); MAX_NODES]; EngineId::COUNT];
    let stat_keys = [
        &keys::STATS_ARENA_RESIDENT,
        &keys::STATS_ARENA_PACTIVE,
        &keys::STATS_ARENA_PDIRTY,
        &keys::STATS_ARENA_MAPPED,
    ];
    if !arenas_ready() || !stat_keys.iter().all(|k| k.resolve()) {
        return (out, by_node);
    }
    refresh_stats();
    let page = PAGE as u64;
    let read = |arena: c_uint| ArenaStats {
        resident: read_stat(&keys::STATS_ARENA_RESIDENT, arena),
        active: read_stat(&keys::STATS_ARENA_PACTIVE, arena) * page,
        dirty: read_stat(&keys::STATS_ARENA_PDIRTY, arena) * page,
        mapped: read_stat(&keys::STATS_ARENA_MAPPED, arena),
    };
    let all = read(ALL_ARENAS);
    let mut rest = all;
    let mut subtract = |s: &ArenaStats| {
        rest.resident = rest.resident.saturating_sub(s.resident);
        rest.active = rest.active.saturating_sub(s.active);
        rest.dirty = rest.dirty.saturating_sub(s.dirty);
        rest.mapped = rest.mapped.saturating_sub(s.mapped);
    };
    for engine in 0..ARENA_ENGINES {
        for (node, a) in arenas_of(Slot::at(engine)) {
            let s = read(a.index());
            subtract(&s);
            for total in [&mut by_node[engine][node.index()], &mut out[engine]] {
                total.resident += s.resident;
                total.active += s.active;
                total.dirty += s.dirty;
                total.mapped += s.mapped;
            }
        }
    }
    for e in 0..ARENA_ENGINES {
        if let Some(a) = overflow_arena(Slot::at(e)) {
            subtract(&read(a.index()));
        }
    }
    out[EngineId::Unattributed.index()] = rest;
    (out, by_node)
}

/// The engine that owns the heap block at `ptr`, judged by its address alone: the engine
/// whose range (or overflow range) holds it, or `Unattributed` for memory outside them all.
pub fn owner(ptr: *const u8) -> EngineId {
    owner_of(ptr).engine()
}

/// Whether the heap block at `ptr` lives in an engine's overflow range.
pub fn is_overflow(ptr: *const u8) -> bool {
    owner_of(ptr).is_overflow()
}

/// Returns the dirty pages of `engine`'s arenas (on every node) to the system now
/// (`arena.<i>.purge`), leaving the other engines' alone. Takes milliseconds when there is much
/// to purge; call it from a background thread. False if an engine arena could not be purged
/// (or none exists).
pub fn purge_engine(engine: EngineId) -> bool {
    let mut any = false;
    let mut ok = true;
    ensure_arenas();
    for (_, arena) in arenas_of(Slot::of(engine)) {
        any = true;
        ok &= purge_arena(arena.index());
    }
    any && ok
}

/// The index of `engine`'s first arena (node 0, shard 0), for callers that want to inspect it
/// with `mallctl`; the engine has [`shards`] such arenas per node.
pub fn arena_index(engine: EngineId) -> Option<u32> {
    arena_of(Slot::of(engine), Node::FIRST, 0).map(|a| a.index())
}

/// Returns every arena's dirty and muzzy pages to the system now (`arena.<all>.purge`).
/// Takes milliseconds when there is much to purge; call it from a background thread.
pub fn purge_all_arenas() -> bool {
    purge_arena(ALL_ARENAS)
}

/// jemalloc's `stats.resident` after refreshing its statistics: bytes of physical memory in
/// pages jemalloc holds (data, metadata, dirty pages). `None` if statistics are unavailable.
pub fn allocator_resident() -> Option<u64> {
    refresh_stats();
    allocator_resident_as_refreshed()
}

/// jemalloc's `stats.resident` as of the last refresh of its statistics (by
/// [`arena_stats`], [`arena_stats_by_node`] or [`allocator_resident`]): saves a second
/// refresh, which walks every arena, where one was just made.
pub fn allocator_resident_as_refreshed() -> Option<u64> {
    keys::STATS_RESIDENT.read().ok().map(|v| v as u64)
}
