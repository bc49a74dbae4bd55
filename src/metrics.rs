//! Snapshots of the governor's state and their Prometheus text exposition.

use std::fmt::Write as _;

use crate::budget::Budget;
use crate::ceiling::CeilingSource;
use crate::events::BreachEvent;
use crate::pressure::PressureLevel;
use crate::scope::ScopeSnapshot;
use crate::wait::QueueFigures;
use crate::{ArenaStats, EngineId};

/// One engine's figures at the moment of a [`Snapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineSnapshot {
    /// The engine.
    pub engine: EngineId,
    /// Configured budget.
    pub base: u64,
    /// Guaranteed floor.
    pub floor: u64,
    /// Rebalancing cap.
    pub cap: u64,
    /// Current limit.
    pub limit: u64,
    /// Live bytes charged by allocators.
    pub used: u64,
    /// Bytes held by reservations.
    pub reserved: u64,
    /// `used + reserved`.
    pub usage: u64,
    /// What a reservation could still get.
    pub available: u64,
    /// Highest usage seen.
    pub peak: u64,
    /// Bytes in overflow extents.
    pub overflow_bytes: u64,
    /// Reservations refused.
    pub rejections: u64,
    /// Releases refused for exceeding the charge.
    pub over_releases: u64,
    /// Pressure level.
    pub pressure: PressureLevel,
    /// Pressure level changes so far.
    pub pressure_transitions: u64,
    /// Limit lent to other engines, in total.
    pub lent_total: u64,
    /// Limit borrowed from other engines, in total.
    pub borrowed_total: u64,
    /// Lent limit taken back from borrowers, in total.
    pub taken_back_total: u64,
    /// Borrowed limit given back to lenders that took it back, in total.
    pub returned_total: u64,
    /// Rebalancing moves that changed the engine's limit.
    pub rebalance_moves: u64,
    /// jemalloc's figures for the engine's arenas, summed over nodes (zero for a standalone
    /// governor).
    pub arena: ArenaStats,
    /// The same figures per NUMA node (index = node; zero where the engine has no arena).
    pub arena_by_node: [ArenaStats; crate::MAX_NODES],
    /// Bytes of address space the engine's arenas may hold
    /// ([`range_bytes`](crate::range_bytes); zero for `Unattributed` and for a standalone
    /// governor).
    pub range_bytes: u64,
    /// Allocations that found the engine's range full and were served, and counted, outside it
    /// as `Unattributed`'s (zero for a standalone governor).
    pub range_fallbacks: crate::RangeFallbacks,
    /// The engine's overflow region as the kernel sees it: backed, resident and on-disk bytes,
    /// capacity (zero without overflow).
    pub overflow: crate::OverflowFigures,
    /// Overflow pushed out by the allocating threads: calls, bytes swept, time.
    pub push_out: crate::PushOutStats,
    /// Allocations the engine's overflow could not take (served past the limit, or refused).
    pub overflow_breaches: crate::OverflowBreaches,
    /// The page cache the engine's governed I/O left behind, dropped, and protected regions.
    pub page_cache: crate::PageCacheStats,
    /// Requests of the engine waiting for memory
    /// ([`reserve_blocking`](crate::MemoryGovernor::reserve_blocking),
    /// [`reserve_async`](crate::MemoryGovernor::reserve_async)).
    pub waiters: u64,
    /// The bytes they wait for.
    pub waiting_bytes: u64,
}

impl EngineSnapshot {
    pub(crate) fn read(
        b: &Budget,
        pressure: PressureLevel,
        arena: ArenaStats,
        arena_by_node: [ArenaStats; crate::MAX_NODES],
        installed: bool,
        page_cache: crate::PageCacheStats,
        queue: QueueFigures,
    ) -> EngineSnapshot {
        let e = b.engine();
        let (range_bytes, range_fallbacks, overflow, push_out, overflow_breaches) =
            if installed && e != EngineId::Unattributed {
                (
                    nodedb_mem_alloc::ctl::arenas::range_bytes() as u64,
                    nodedb_mem_alloc::ctl::arenas::range_fallbacks(e),
                    nodedb_mem_alloc::ctl::overflow::overflow_figures(e),
                    nodedb_mem_alloc::ctl::overflow::push_out_stats(e),
                    nodedb_mem_alloc::ctl::overflow::overflow_breaches(e),
                )
            } else {
                Default::default()
            };
        EngineSnapshot {
            engine: b.engine(),
            base: b.base(),
            floor: b.floor(),
            cap: b.cap(),
            limit: b.limit(),
            used: b.used(),
            reserved: b.reserved(),
            usage: b.usage(),
            available: b.available(),
            peak: b.peak(),
            overflow_bytes: b.overflow_bytes(),
            rejections: b.rejections(),
            over_releases: b.over_releases(),
            pressure,
            pressure_transitions: b.pressure_transitions(),
            lent_total: b.lent_total(),
            borrowed_total: b.borrowed_total(),
            taken_back_total: b.taken_back_total(),
            returned_total: b.returned_total(),
            rebalance_moves: b.moves(),
            arena,
            arena_by_node,
            range_bytes,
            range_fallbacks,
            overflow,
            push_out,
            overflow_breaches,
            page_cache,
            waiters: queue.waiters,
            waiting_bytes: queue.waiting_bytes,
        }
    }
}

/// The governor's state at one moment: see [`MemoryGovernor::snapshot`](crate::MemoryGovernor::snapshot).
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The kernel's figures for the process's memory cgroup, `None` outside one (see
    /// [`MemoryGovernor::cgroup`](crate::MemoryGovernor::cgroup)).
    pub cgroup: Option<crate::CgroupFigures>,
    /// The global ceiling.
    pub ceiling: u64,
    /// Where the ceiling came from.
    pub ceiling_source: CeilingSource,
    /// Spill episodes begun by the governor's spill controllers.
    pub spills_begun: u64,
    /// How many times the ceiling moved (each also a
    /// [`EventKind::CeilingChanged`](crate::EventKind) event).
    pub ceiling_changes: u64,
    /// Usage of all engines.
    pub global_usage: u64,
    /// Highest global usage seen.
    pub global_peak: u64,
    /// The process's pressure level.
    pub global_pressure: PressureLevel,
    /// The kernel's pressure level from the cgroup's stall time at the last sample, the floor
    /// of `global_pressure` (see
    /// [`MemoryGovernor::sample_cgroup_pressure`](crate::MemoryGovernor::sample_cgroup_pressure)).
    pub kernel_pressure: PressureLevel,
    /// Reservations refused by the ceiling.
    pub global_rejections: u64,
    /// Global pressure level changes so far.
    pub global_pressure_transitions: u64,
    /// Every engine, in [`EngineId::ALL`] order.
    pub engines: [EngineSnapshot; EngineId::COUNT],
    /// The most recent breach events, oldest first.
    pub events: Vec<BreachEvent>,
    /// Events recorded since the governor was built.
    pub events_recorded: u64,
    /// Events lost because nobody collected them in time.
    pub events_dropped: u64,
    /// The last resident-memory sample (all zero before the first).
    pub resident: crate::RssSample,
    /// Resident bytes beyond the governed usage at that sample, counted against the ceiling.
    pub resident_unaccounted: u64,
    /// Engine arenas purged by [`check_resident`](crate::MemoryGovernor::check_resident)
    /// because their dirty pages exceeded a quarter of the engine's limit.
    pub dirty_purges: u64,
    /// Panics caught in reclaimers (each then unregistered) and in the background thread's
    /// steps; each is also an [`EventKind::CallbackPanicked`](crate::EventKind) event.
    pub callback_panics: u64,
    /// Ticks the background thread has finished.
    pub background_ticks: u64,
    /// How long the background thread sleeps after its last tick: its interval, or up to
    /// [`BACKGROUND_STRETCH_MAX`](crate::BACKGROUND_STRETCH_MAX) times that while nothing moves (zero before its
    /// first tick, and without one).
    pub background_sleep: std::time::Duration,
    /// Refreshes of jemalloc's statistics (a walk over every arena, taking locks allocating
    /// threads also take) made by the background thread and
    /// [`check_resident`](crate::MemoryGovernor::check_resident): a quiet tick makes none.
    pub allocator_stats_refreshes: u64,
    /// The overflow path's counters (all zero without an installed governor).
    pub overflow: crate::OverflowStats,
    /// Every live scope, in creation order.
    pub scopes: Vec<ScopeSnapshot>,
    /// Waiting requests granted, in total.
    pub waits_granted: u64,
    /// Waiting requests that timed out, in total.
    pub waits_timed_out: u64,
    /// Waiting requests their owners gave up (futures dropped), in total.
    pub waits_cancelled: u64,
}

impl Snapshot {
    /// The figures of one engine.
    pub fn engine(&self, engine: EngineId) -> &EngineSnapshot {
        &self.engines[engine.index()]
    }

    /// The Prometheus text exposition format (version 0.0.4): `nodedb_mem_*` metrics, the
    /// engine as a label, `HELP` and `TYPE` lines for each.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::with_capacity(8 << 10);
        let mut global = |name: &str, kind: &str, help: &str, value: &dyn std::fmt::Display| {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "nodedb_mem_{name} {value}");
        };
        global(
            "ceiling_bytes",
            "gauge",
            "The global memory ceiling.",
            &self.ceiling,
        );
        global(
            "spills_begun_total",
            "counter",
            "Spill episodes begun (BeginSpill) by the governor's spill controllers.",
            &self.spills_begun,
        );
        global(
            "ceiling_changes_total",
            "counter",
            "Times the global ceiling moved (set by the host or following the cgroup's limit).",
            &self.ceiling_changes,
        );
        global(
            "usage_bytes",
            "gauge",
            "Usage of all engines: live bytes plus reservations.",
            &self.global_usage,
        );
        global(
            "peak_usage_bytes",
            "gauge",
            "Highest usage of all engines together.",
            &self.global_peak,
        );
        global(
            "pressure_level",
            "gauge",
            "Process pressure level: 0 normal, 1 warning, 2 critical, 3 emergency.",
            &(self.global_pressure as u64),
        );
        global(
            "kernel_pressure_level",
            "gauge",
            "The kernel's pressure level from the cgroup's memory stall time (0-3, as pressure_level).",
            &(self.kernel_pressure as u64),
        );
        global(
            "ceiling_rejections_total",
            "counter",
            "Reservations refused by the global ceiling.",
            &self.global_rejections,
        );
        global(
            "pressure_transitions_total",
            "counter",
            "Changes of the process pressure level.",
            &self.global_pressure_transitions,
        );
        global(
            "events_total",
            "counter",
            "Breach events recorded.",
            &self.events_recorded,
        );
        global(
            "events_dropped_total",
            "counter",
            "Breach events lost before collection.",
            &self.events_dropped,
        );
        global(
            "waits_granted_total",
            "counter",
            "Waiting reservations granted.",
            &self.waits_granted,
        );
        global(
            "waits_timed_out_total",
            "counter",
            "Waiting reservations that timed out.",
            &self.waits_timed_out,
        );
        global(
            "waits_cancelled_total",
            "counter",
            "Waiting reservations given up by their owners.",
            &self.waits_cancelled,
        );
        global(
            "process_resident_bytes",
            "gauge",
            "Resident memory of the process at the last sample (VmRSS).",
            &self.resident.resident,
        );
        global(
            "process_peak_resident_bytes",
            "gauge",
            "Peak resident memory of the process (VmHWM).",
            &self.resident.peak,
        );
        global(
            "allocator_resident_bytes",
            "gauge",
            "jemalloc's resident bytes (stats.resident).",
            &self.resident.allocator_resident,
        );
        global(
            "overflow_breaches_total",
            "counter",
            "Allocations overflow could not take, served from the normal arena instead.",
            &self.overflow.breaches,
        );
        global(
            "overflow_refused_total",
            "counter",
            "Allocations overflow could not take, refused (policy FailAllocation).",
            &self.overflow.refused,
        );
        global(
            "resident_unaccounted_bytes",
            "gauge",
            "Resident bytes beyond the governed usage, counted against the ceiling.",
            &self.resident_unaccounted,
        );

        global(
            "dirty_purges_total",
            "counter",
            "Engine arenas purged because their dirty pages exceeded a quarter of the engine's limit.",
            &self.dirty_purges,
        );
        global(
            "callback_panics_total",
            "counter",
            "Panics caught in reclaimers and in the background thread's steps.",
            &self.callback_panics,
        );
        global(
            "background_ticks_total",
            "counter",
            "Ticks the background thread has finished.",
            &self.background_ticks,
        );
        global(
            "background_sleep_seconds",
            "gauge",
            "How long the background thread sleeps after its last tick (longer while nothing moves).",
            &self.background_sleep.as_secs_f64(),
        );
        global(
            "allocator_stats_refreshes_total",
            "counter",
            "Refreshes of jemalloc's statistics (a walk over every arena) made to judge resident memory and dirty pages.",
            &self.allocator_stats_refreshes,
        );

        if let Some(c) = &self.cgroup {
            c.write_prometheus(&mut out, self.ceiling);
        }

        type Field = fn(&EngineSnapshot) -> i128;
        let per_engine: [(&str, &str, &str, Field); 46] = [
            (
                "engine_waiters",
                "gauge",
                "Requests of the engine waiting for memory.",
                |e| e.waiters.into(),
            ),
            (
                "engine_waiting_bytes",
                "gauge",
                "Bytes the engine's waiting requests wait for.",
                |e| e.waiting_bytes.into(),
            ),
            (
                "engine_governed_dir_cached_bytes",
                "gauge",
                "Bytes of the engine's governed directories found in the page cache at the last sweep.",
                |e| e.page_cache.dirs_cached.into(),
            ),
            (
                "engine_governed_dir_dropped_bytes_total",
                "counter",
                "Bytes of the engine's governed directories dropped from the page cache by sweeps.",
                |e| e.page_cache.dirs_dropped.into(),
            ),
            (
                "engine_page_cache_budget_bytes",
                "gauge",
                "Page cache the engine's governed I/O may leave behind.",
                |e| e.page_cache.budget.into(),
            ),
            (
                "engine_page_cache_bytes",
                "gauge",
                "Page cache the engine's governed I/O has left behind and not dropped.",
                |e| e.page_cache.left_behind.into(),
            ),
            (
                "engine_page_cache_direct_bytes_total",
                "counter",
                "Bytes the engine's governed writers wrote with direct I/O, past the page cache.",
                |e| e.page_cache.direct_written.into(),
            ),
            (
                "engine_page_cache_dropped_bytes_total",
                "counter",
                "Bytes the engine's governed I/O wrote back and dropped behind itself.",
                |e| e.page_cache.dropped.into(),
            ),
            (
                "engine_protected_bytes",
                "gauge",
                "Bytes of the engine's mapped data locked resident.",
                |e| e.page_cache.protected.into(),
            ),
            (
                "engine_protected_resident_bytes",
                "gauge",
                "Bytes of the engine's protected regions resident in memory (mincore).",
                |e| e.page_cache.protected_resident.into(),
            ),
            (
                "engine_overflow_paged_out_bytes",
                "gauge",
                "Bytes of the engine's overflow region backed by its file but not resident.",
                |e| e.overflow.paged_out().into(),
            ),
            (
                "engine_overflow_resident_bytes",
                "gauge",
                "Bytes of the engine's overflow region resident in memory (mincore).",
                |e| e.overflow.resident.into(),
            ),
            (
                "engine_overflow_disk_bytes",
                "gauge",
                "Bytes of disk the engine's overflow file occupies.",
                |e| e.overflow.disk.into(),
            ),
            (
                "engine_overflow_capacity_bytes",
                "gauge",
                "Capacity of the engine's overflow region.",
                |e| e.overflow.capacity.into(),
            ),
            (
                "engine_push_outs_total",
                "counter",
                "Spans of the engine's overflow pushed out of memory by allocating threads.",
                |e| e.push_out.calls.into(),
            ),
            (
                "engine_push_out_bytes_total",
                "counter",
                "Bytes of the engine's overflow region swept by push-outs.",
                |e| e.push_out.bytes.into(),
            ),
            (
                "engine_push_out_milliseconds_total",
                "counter",
                "Time spent pushing the engine's overflow out, in milliseconds.",
                |e| (e.push_out.nanos / 1_000_000).into(),
            ),
            (
                "engine_overflow_breach_bytes_total",
                "counter",
                "Bytes the engine's overflow could not take, served past its limit.",
                |e| e.overflow_breaches.breach_bytes.into(),
            ),
            (
                "engine_range_bytes",
                "gauge",
                "Address space the engine's arenas may hold before allocations fall back outside it.",
                |e| e.range_bytes.into(),
            ),
            (
                "engine_range_fallbacks_total",
                "counter",
                "Allocations served outside the engine's full range (in the shared fallback range, still the engine's, or beyond it).",
                |e| e.range_fallbacks.count.into(),
            ),
            (
                "engine_range_fallback_bytes_total",
                "counter",
                "Bytes of allocations served outside the engine's full range.",
                |e| e.range_fallbacks.bytes.into(),
            ),
            (
                "engine_range_fallback_unattributed_bytes_total",
                "counter",
                "Bytes of those served beyond the fallback range too, counted as unattributed.",
                |e| e.range_fallbacks.unattributed_bytes.into(),
            ),
            (
                "engine_limit_bytes",
                "gauge",
                "Current limit of the engine.",
                |e| e.limit.into(),
            ),
            (
                "engine_budget_bytes",
                "gauge",
                "Configured budget of the engine.",
                |e| e.base.into(),
            ),
            (
                "engine_floor_bytes",
                "gauge",
                "Floor below which the engine's limit is never lent.",
                |e| e.floor.into(),
            ),
            (
                "engine_cap_bytes",
                "gauge",
                "Cap above which the engine's limit never grows.",
                |e| e.cap.into(),
            ),
            (
                "engine_usage_bytes",
                "gauge",
                "Usage of the engine: live bytes plus reservations.",
                |e| e.usage.into(),
            ),
            (
                "engine_used_bytes",
                "gauge",
                "Live heap bytes charged to the engine.",
                |e| e.used.into(),
            ),
            (
                "engine_reserved_bytes",
                "gauge",
                "Bytes held by the engine's reservations.",
                |e| e.reserved.into(),
            ),
            (
                "engine_available_bytes",
                "gauge",
                "What a reservation of the engine could still get.",
                |e| e.available.into(),
            ),
            (
                "engine_peak_usage_bytes",
                "gauge",
                "Highest usage of the engine.",
                |e| e.peak.into(),
            ),
            (
                "engine_overflow_bytes",
                "gauge",
                "Bytes of the engine held in overflow extents.",
                |e| e.overflow_bytes.into(),
            ),
            (
                "engine_pressure_level",
                "gauge",
                "Engine pressure level: 0 normal, 1 warning, 2 critical, 3 emergency.",
                |e| e.pressure as i128,
            ),
            (
                "engine_rejections_total",
                "counter",
                "Reservations of the engine refused.",
                |e| e.rejections.into(),
            ),
            (
                "engine_over_releases_total",
                "counter",
                "Releases refused for exceeding the charge.",
                |e| e.over_releases.into(),
            ),
            (
                "engine_pressure_transitions_total",
                "counter",
                "Changes of the engine's pressure level.",
                |e| e.pressure_transitions.into(),
            ),
            (
                "engine_lent_bytes_total",
                "counter",
                "Limit lent to other engines by rebalancing.",
                |e| e.lent_total.into(),
            ),
            (
                "engine_borrowed_bytes_total",
                "counter",
                "Limit borrowed from other engines by rebalancing.",
                |e| e.borrowed_total.into(),
            ),
            (
                "engine_taken_back_bytes_total",
                "counter",
                "Lent limit the engine took back from borrowers when it became busy.",
                |e| e.taken_back_total.into(),
            ),
            (
                "engine_returned_bytes_total",
                "counter",
                "Borrowed limit the engine gave back to lenders taking it back.",
                |e| e.returned_total.into(),
            ),
            (
                "engine_rebalance_moves_total",
                "counter",
                "Rebalancing moves that changed the engine's limit.",
                |e| e.rebalance_moves.into(),
            ),
            (
                "engine_arena_resident_bytes",
                "gauge",
                "Physical memory of the engine's jemalloc arena.",
                |e| e.arena.resident.into(),
            ),
            (
                "engine_arena_active_bytes",
                "gauge",
                "Bytes in active pages of the engine's jemalloc arena.",
                |e| e.arena.active.into(),
            ),
            (
                "engine_arena_dirty_bytes",
                "gauge",
                "Bytes in dirty (freed, not yet purged) pages of the engine's arena.",
                |e| e.arena.dirty.into(),
            ),
            (
                "engine_arena_mapped_bytes",
                "gauge",
                "Bytes mapped by the engine's jemalloc arena.",
                |e| e.arena.mapped.into(),
            ),
            (
                "engine_rebalance_net_bytes",
                "gauge",
                "Limit minus budget: positive when borrowing, negative when lending.",
                |e| i128::from(e.limit) - i128::from(e.base),
            ),
        ];
        header(
            &mut out,
            "engine_node_resident_bytes",
            "gauge",
            "Physical memory of the engine's arena on each NUMA node.",
        );
        for e in &self.engines {
            for (node, s) in e.arena_by_node.iter().enumerate() {
                if s.mapped > 0 || s.resident > 0 {
                    let _ = writeln!(
                        out,
                        "nodedb_mem_engine_node_resident_bytes{{engine=\"{}\",node=\"{node}\"}} {}",
                        e.engine, s.resident
                    );
                }
            }
        }
        for (name, kind, help, field) in per_engine {
            header(&mut out, name, kind, help);
            for e in &self.engines {
                let _ = writeln!(
                    out,
                    "nodedb_mem_{name}{{engine=\"{}\"}} {}",
                    e.engine,
                    field(e)
                );
            }
        }
        type ScopeField = fn(&ScopeSnapshot) -> u64;
        let per_scope: [(&str, &str, &str, ScopeField); 8] = [
            ("scope_limit_bytes", "gauge", "The scope's limit.", |s| {
                s.limit
            }),
            (
                "scope_usage_bytes",
                "gauge",
                "Bytes reserved in the scope and below it.",
                |s| s.usage,
            ),
            (
                "scope_peak_usage_bytes",
                "gauge",
                "Highest usage of the scope.",
                |s| s.peak,
            ),
            (
                "scope_rejections_total",
                "counter",
                "Reservations the scope's limit refused.",
                |s| s.rejections,
            ),
            (
                "scope_reservations",
                "gauge",
                "Live reservations made in the scope.",
                |s| s.reservations,
            ),
            (
                "scope_waiters",
                "gauge",
                "Requests waiting for memory in the scope.",
                |s| s.waiters,
            ),
            (
                "scope_pressure_level",
                "gauge",
                "Scope pressure level: 0 normal, 1 warning, 2 critical, 3 emergency.",
                |s| s.pressure as u64,
            ),
            (
                "scope_pressure_transitions_total",
                "counter",
                "Changes of the scope's pressure level.",
                |s| s.pressure_transitions,
            ),
        ];
        if !self.scopes.is_empty() {
            for (name, kind, help, field) in per_scope {
                header(&mut out, name, kind, help);
                for s in &self.scopes {
                    let _ = writeln!(
                        out,
                        "nodedb_mem_{name}{{scope=\"{}\"}} {}",
                        escape_label(&s.path),
                        field(s)
                    );
                }
            }
        }
        out
    }
}

/// A label value as the text format wants it: backslash, double quote and line feed escaped.
fn escape_label(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

pub(crate) fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP nodedb_mem_{name} {help}");
    let _ = writeln!(out, "# TYPE nodedb_mem_{name} {kind}");
}
