//! `MemoryGovernor`: what it holds, and its limits, usage, pressure, snapshot and consistency
//! check. Reserving and scopes (`admission.rs`), waiting (`waiting.rs`), rebalancing
//! (`rebalance.rs`), resident feedback (`resident.rs`), reclaimers (`reclaim.rs`) and
//! installing (`install.rs`) are faces of it in modules of their own.

use std::fmt;

use crossbeam_utils::CachePadded;

use crate::EngineId;
use crate::budget::{Budget, raise_max, update_level_at_least};
use crate::cache::ledger::PageCacheLedger;
use crate::ceiling::CeilingSource;
use crate::config::{Config, GovernorBuilder, RebalanceConfig};
use crate::error::Result;
use crate::events::{EventKind, EventLog};
use crate::ledger::{GlobalLedger, Ledger};
use crate::pressure::{PressureLevel, PressureThresholds};
use crate::reclaim::{Reclaimer, ReclaimerHandle, Reclaimers};
use crate::rss::RssSample;
use crate::scope::ScopeTree;
use crate::sync::{Arc, AtomicU64, Mutex, Ordering, lock};
use crate::wait::Queues;

/// The least dirty memory an engine's arenas may keep before
/// [`MemoryGovernor::check_resident`] purges them (else a quarter of the engine's limit).
pub const DIRTY_ALLOWANCE_MIN: u64 = 4 << 20;

/// The process-wide governor: one [`Budget`] per engine under one global ceiling.
///
/// A cheap handle (an `Arc`): clone it into every engine. Reservations keep a handle, so they
/// are `'static` and `Send`.
///
/// ```
/// use nodedb_mem::{EngineId, MemoryGovernor, PressureLevel};
///
/// let gov = MemoryGovernor::builder()
///     .global_ceiling(64 << 20)
///     .budget(EngineId::Query, 16u64 << 20)
///     .build()?;
///
/// let mut r = gov.reserve(EngineId::Query, 12 << 20)?;
/// assert_eq!(gov.usage(EngineId::Query), 12 << 20);
/// assert_eq!(gov.pressure(EngineId::Query), PressureLevel::Warning); // 75 %
///
/// let err = r.try_grow(8 << 20).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "cannot reserve 8 MiB for engine query: 12 MiB already used of its 16 MiB limit, 4 MiB available"
/// );
/// drop(r);
/// assert_eq!(gov.usage(EngineId::Query), 0);
/// # Ok::<(), nodedb_mem::MemError>(())
/// ```
#[derive(Clone)]
pub struct MemoryGovernor {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// Budgets, scopes, the global ledger, the event log and the waiting queue: what
    /// reservations hold on to.
    pub(crate) ledger: Arc<Ledger>,
    pub(crate) thresholds: PressureThresholds,
    pub(crate) rebalance: RebalanceConfig,
    /// Serialises limit changes: held by `rebalance` and by `snapshot` while reading limits.
    pub(crate) rebalance_lock: Mutex<()>,
    /// Where the ceiling came from (its cgroup limit updated as the ceiling follows it).
    pub(crate) ceiling_source: Mutex<CeilingSource>,
    pub(crate) reclaimers: Reclaimers,
    /// The RSS margin, scaled with the ceiling.
    pub(crate) rss_margin: AtomicU64,
    /// What the budgets were built from, scaled when the ceiling moves.
    pub(crate) configured: crate::follow::Configured,
    /// The state of following the cgroup and of a lowered ceiling.
    pub(crate) following: Mutex<crate::follow::Following>,
    /// The longest sleep of the background thread while quiet, in intervals.
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models run no background thread")
    )]
    pub(crate) background_stretch: u32,
    /// `proc_status`, kept open.
    pub(crate) proc_file: crate::kept::KeptFile,
    /// What the engines' dirty pages were at the last statistics refresh.
    pub(crate) dirty_watch: Mutex<crate::resident::DirtyWatch>,
    /// The process's memory cgroup, if it is in one.
    pub(crate) cgroup: Option<crate::cgroup::Cgroup>,
    pub(crate) last_rss: Mutex<RssSample>,
    /// Per engine, the overflow breaches and refusals already reported as events.
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models never install a governor")
    )]
    pub(crate) breaches_seen: Mutex<[(u64, u64); EngineId::COUNT]>,
    /// Per engine, the page cache governed I/O left behind, and its budget.
    pub(crate) page_cache: [PageCacheLedger; EngineId::COUNT],
    pub(crate) page_cache_budget: [u64; EngineId::COUNT],
    /// Directories whose files the background thread drops from the page cache, per engine,
    /// each with where its last sweep stopped.
    pub(crate) governed_dirs: Mutex<Vec<crate::cache::GovernedDir>>,
    /// Bytes of file data one sweep of a governed directory examines.
    pub(crate) sweep_budget: u64,
}

impl GovernorBuilder {
    /// Validates the configuration and builds a standalone governor.
    pub fn build(self) -> Result<MemoryGovernor> {
        Ok(MemoryGovernor::from_config(self.validate()?, false))
    }
}

impl fmt::Debug for MemoryGovernor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryGovernor")
            .field("ceiling", &self.inner.ledger.global.ceiling())
            .field("global_usage", &self.global_usage())
            .finish_non_exhaustive()
    }
}

impl MemoryGovernor {
    /// Starts configuring a governor. See [`GovernorBuilder`].
    pub fn builder() -> GovernorBuilder {
        GovernorBuilder::default()
    }

    pub(crate) fn from_config(c: Config, from_allocator: bool) -> MemoryGovernor {
        let budgets = EngineId::ALL.map(|e| {
            let l = c.budgets[e.index()];
            CachePadded::new(Budget::new(e, l.base, l.floor, l.cap, from_allocator))
        });
        let events = std::sync::Arc::new(EventLog::new());
        let log = std::sync::Arc::clone(&events);
        let ppm = c.thresholds.to_ppm();
        let scopes = ScopeTree::new(
            ppm,
            Box::new(move |scope, from, to| {
                log.record_quiet(EventKind::ScopePressure { scope, from, to });
            }),
        );
        MemoryGovernor {
            inner: Arc::new(Inner {
                ledger: Arc::new(Ledger {
                    budgets,
                    global: CachePadded::new(GlobalLedger::new(c.ceiling, from_allocator)),
                    scopes,
                    events,
                    ppm,
                    waiters: Queues::new(),
                    ticker: Default::default(),
                }),
                thresholds: c.thresholds,
                rebalance: c.rebalance,
                rebalance_lock: Mutex::new(()),
                configured: crate::follow::Configured {
                    ceiling: c.ceiling,
                    limits: c.budgets,
                    rss_margin: c.rss_margin,
                    cgroup_margin: c.cgroup_margin,
                    // Only a ceiling someone chose stays put: one from the cgroup, or from
                    // physical memory for want of a cgroup limit, follows the limit.
                    follows_cgroup: !matches!(
                        c.ceiling_source,
                        CeilingSource::Explicit | CeilingSource::Environment
                    ),
                    physical: c.physical,
                },
                following: Mutex::new(Default::default()),
                ceiling_source: Mutex::new(c.ceiling_source),
                reclaimers: Reclaimers::new(),
                rss_margin: AtomicU64::new(c.rss_margin),
                proc_file: crate::kept::KeptFile::new(c.proc_status),
                background_stretch: c.background_stretch,
                dirty_watch: Default::default(),
                cgroup: c.cgroup,
                last_rss: Mutex::new(RssSample::default()),
                breaches_seen: Mutex::new([(0, 0); EngineId::COUNT]),
                page_cache: Default::default(),
                page_cache_budget: c.page_cache,
                governed_dirs: Mutex::new(Vec::new()),
                sweep_budget: c.sweep_budget,
            }),
        }
    }

    /// Tells the allocator each engine's current limit for its heap, above which its new
    /// allocations go to its overflow region (installed governors only): the engine's limit
    /// less its protected mapped data (counted against the limit by a reservation, beside the
    /// heap), so that the two together stay within the limit. Called when limits move and when
    /// protected regions come and go, under the rebalancing lock, so two publishers cannot
    /// store stale figures out of order.
    pub(crate) fn publish_limits(&self) {
        // Without overflow regions there is nowhere to reroute to: publishing limits would only
        // send the over-limit engines' allocations down the slow path for nothing.
        #[cfg(not(nodedb_mem_loom))]
        if self.is_installed()
            && nodedb_mem_alloc::ctl::overflow::overflow_region(EngineId::Vector).is_some()
        {
            let _serial = lock(&self.inner.rebalance_lock);
            for e in EngineId::ALL {
                let protected = self.page_cache_ledger(e).protected_bytes();
                let heap = self.limit(e).saturating_sub(protected);
                nodedb_mem_alloc::ctl::ledger::set_overflow_limit(e, Some(heap));
            }
        }
    }

    /// Whether this governor is bound to the global allocator (made by
    /// [`GovernorBuilder::install`]), so heap allocations count against its budgets.
    pub fn is_installed(&self) -> bool {
        self.inner.ledger.global.from_allocator
    }

    /// The ledger of `engine`.
    pub fn budget(&self, engine: EngineId) -> &Budget {
        self.inner.ledger.budget(engine)
    }

    /// The margin kept between resident memory and the ceiling, in bytes (see
    /// [`GovernorBuilder::rss_margin`](crate::GovernorBuilder::rss_margin)).
    pub fn rss_margin(&self) -> u64 {
        self.inner.rss_margin.load(Ordering::Acquire)
    }

    /// The global ceiling in bytes.
    pub fn ceiling(&self) -> u64 {
        self.inner.ledger.global.ceiling()
    }

    /// Where the ceiling came from.
    pub fn ceiling_source(&self) -> CeilingSource {
        lock(&self.inner.ceiling_source).clone()
    }

    /// The pressure thresholds in force.
    pub fn thresholds(&self) -> PressureThresholds {
        self.inner.thresholds
    }

    /// `engine`'s usage: live bytes charged plus outstanding reservations.
    pub fn usage(&self, engine: EngineId) -> u64 {
        self.budget(engine).usage()
    }

    /// `engine`'s current limit.
    pub fn limit(&self, engine: EngineId) -> u64 {
        self.budget(engine).limit()
    }

    /// Every engine's current limit (by [`EngineId::index`]), read together: limits change
    /// only in rebalancing steps, and this waits for one in progress, so the figures are from
    /// one moment and sum to at most the ceiling.
    pub fn limits(&self) -> [u64; EngineId::COUNT] {
        let _serial = lock(&self.inner.rebalance_lock);
        EngineId::ALL.map(|e| self.budget(e).limit())
    }

    /// Usage of all engines together.
    pub fn global_usage(&self) -> u64 {
        self.inner.ledger.global.usage()
    }

    /// The highest global usage seen (sampled at every reservation, charge and poll).
    pub fn global_peak(&self) -> u64 {
        let g = &self.inner.ledger.global;
        let now = self.global_usage();
        raise_max(&g.peak, now);
        g.peak.load(Ordering::Acquire)
    }

    /// `engine`'s pressure level, with hysteresis. O(1), lock-free, allocation-free.
    ///
    /// A change of level is recorded as a breach event (emitted to `tracing` at the next
    /// snapshot, rebalance or background tick, never from this call).
    pub fn pressure(&self, engine: EngineId) -> PressureLevel {
        let b = self.budget(engine);
        let (level, changed) = b.update_pressure(&self.inner.ledger.ppm);
        if let Some(from) = changed {
            self.inner.ledger.events.record_quiet(EventKind::Pressure {
                engine: Some(engine),
                from,
                to: level,
            });
        }
        level
    }

    /// The process's pressure level: global usage against the ceiling, with hysteresis, and
    /// never below the kernel's (the cgroup's memory stall time, sampled by the background
    /// thread: see [`sample_cgroup_pressure`](Self::sample_cgroup_pressure)). O(1),
    /// lock-free, allocation-free.
    pub fn global_pressure(&self) -> PressureLevel {
        let g = &self.inner.ledger.global;
        let (level, changed) = update_level_at_least(
            &g.level,
            &g.transitions,
            &self.inner.ledger.ppm,
            self.global_usage() + g.rss_excess.load(Ordering::Acquire),
            g.ceiling(),
            PressureLevel::from_u8(g.kernel_level.load(Ordering::Acquire)),
        );
        if let Some(from) = changed {
            self.inner.ledger.events.record_quiet(EventKind::Pressure {
                engine: None,
                from,
                to: level,
            });
        }
        level
    }

    /// Registers something `engine` can free on request. The governor calls it from
    /// [`rebalance`](Self::rebalance) (and so from the background rebalancer) when the engine
    /// is left above its limit, or the process is at critical pressure. Dropping the returned
    /// handle unregisters it.
    pub fn register_reclaimer(
        &self,
        engine: EngineId,
        reclaimer: std::sync::Arc<dyn Reclaimer>,
    ) -> ReclaimerHandle {
        self.inner.reclaimers.register(engine, reclaimer)
    }

    /// What `engine`'s reclaimers say they could free now.
    /// A reclaimer that panics counts 0 and is unregistered (see [`Reclaimer`]).
    pub fn reclaimable(&self, engine: EngineId) -> u64 {
        let l = &self.inner.ledger;
        self.inner
            .reclaimers
            .reclaimable(engine, &l.events, &l.global.callback_panics)
    }

    /// Asks `engine`'s reclaimers, the one with most to give first, to free `bytes`; returns
    /// what they report freed (recorded as a breach event). A reclaimer that panics counts 0
    /// and is unregistered (see [`Reclaimer`]).
    pub fn reclaim(&self, engine: EngineId, bytes: u64) -> u64 {
        let l = &self.inner.ledger;
        self.inner
            .reclaimers
            .reclaim(engine, bytes, &l.events, &l.global.callback_panics)
    }

    /// Every budget's state, the global figures and the recent breach events.
    pub fn snapshot(&self) -> crate::Snapshot {
        let inner = &*self.inner;
        let global_pressure = self.global_pressure();
        let (arenas, by_node) = if inner.ledger.global.from_allocator {
            nodedb_mem_alloc::ctl::arenas::arena_stats_by_node()
        } else {
            Default::default()
        };
        let engines = {
            // Limits change only under this lock, so the limits read here sum to at most the
            // ceiling.
            let _serial = lock(&inner.rebalance_lock);
            EngineId::ALL.map(|e| {
                let pressure = self.pressure(e);
                crate::metrics::EngineSnapshot::read(
                    self.budget(e),
                    pressure,
                    arenas[e.index()],
                    by_node[e.index()],
                    inner.ledger.global.from_allocator,
                    self.page_cache(e),
                    inner.ledger.waiters.figures(e),
                )
            })
        };
        let g = &inner.ledger.global;
        crate::Snapshot {
            ceiling: g.ceiling(),
            ceiling_source: self.ceiling_source(),
            ceiling_changes: self.ceiling_changes(),
            spills_begun: g.spills_begun.load(Ordering::Relaxed),
            global_usage: self.global_usage(),
            global_peak: self.global_peak(),
            global_pressure,
            kernel_pressure: self.kernel_pressure(),
            global_rejections: g.rejections.load(Ordering::Relaxed),
            global_pressure_transitions: g.transitions.load(Ordering::Relaxed),
            engines,
            events: inner.ledger.events.history(),
            events_recorded: inner.ledger.events.recorded(),
            events_dropped: inner.ledger.events.dropped(),
            resident: *lock(&inner.last_rss),
            resident_unaccounted: g.rss_excess.load(Ordering::Acquire),
            dirty_purges: g.dirty_purges.load(Ordering::Relaxed),
            callback_panics: g.callback_panics.load(Ordering::Relaxed),
            background_ticks: g.background_ticks.load(Ordering::Relaxed),
            background_sleep: std::time::Duration::from_nanos(
                g.background_sleep_ns.load(Ordering::Relaxed),
            ),
            allocator_stats_refreshes: g.stats_refreshes.load(Ordering::Relaxed),
            overflow: if self.is_installed() {
                nodedb_mem_alloc::ctl::overflow::overflow_stats()
            } else {
                Default::default()
            },
            scopes: self
                .scopes()
                .iter()
                .map(|s| {
                    let waiting = inner.ledger.waiters.waiting_in(s.id());
                    s.node.snapshot(self.scope_pressure(s), waiting)
                })
                .collect(),
            waits_granted: inner.ledger.waiters.granted.load(Ordering::Relaxed),
            waits_timed_out: inner.ledger.waiters.timed_out.load(Ordering::Relaxed),
            waits_cancelled: inner.ledger.waiters.cancelled.load(Ordering::Relaxed),
            cgroup: self.cgroup(),
        }
    }

    /// The kernel's figures for the process's memory cgroup now (usage with page cache, the
    /// tightest limits on its path, `memory.events`, `memory.stat`, `memory.pressure`), or
    /// `None` outside a memory cgroup. Read from the cgroup files at each call (a few
    /// `read`s); a file that cannot be read leaves its figures unknown and is named in
    /// [`CgroupFigures::problems`](crate::CgroupFigures::problems).
    pub fn cgroup(&self) -> Option<crate::CgroupFigures> {
        self.inner.cgroup.as_ref().map(crate::cgroup::Cgroup::read)
    }

    /// The Prometheus text exposition of [`snapshot`](Self::snapshot).
    pub fn prometheus(&self) -> String {
        self.snapshot().to_prometheus()
    }

    /// Checks the ledger's invariants at a quiescent moment (no operation in flight): for each
    /// engine `usage == used + reserved` and `headroom == limit - usage`, global usage equals
    /// the engines' sum, the limits sum to at most the ceiling, and for each scope
    /// `headroom == limit - usage` with its children's usage inside its own. Returns the first
    /// violation found. Meant for tests and debugging.
    pub fn check_consistency(&self) -> std::result::Result<(), String> {
        let _serial = lock(&self.inner.rebalance_lock);
        let mut total_usage = 0u64;
        let mut total_limit = 0u64;
        for e in EngineId::ALL {
            let b = self.budget(e);
            let (used, reserved, usage, limit) =
                (b.own_used(), b.reserved(), b.own_usage(), b.limit());
            if usage != used + reserved {
                return Err(format!(
                    "{e}: usage {usage} != used {used} + reserved {reserved}"
                ));
            }
            let headroom = b.raw_headroom();
            if i128::from(headroom) != i128::from(limit) - i128::from(usage) {
                return Err(format!(
                    "{e}: headroom {headroom} != limit {limit} - usage {usage}"
                ));
            }
            if limit < b.floor() || limit > b.cap() {
                return Err(format!(
                    "{e}: limit {limit} outside [{}, {}]",
                    b.floor(),
                    b.cap()
                ));
            }
            total_usage += usage;
            total_limit += limit;
        }
        let g = &self.inner.ledger.global;
        let usage = g.own_usage();
        if usage != total_usage {
            return Err(format!(
                "global usage {usage} != sum of engines {total_usage}"
            ));
        }
        let headroom = g.headroom.raw();
        if i128::from(headroom) != i128::from(g.ceiling()) - i128::from(usage) {
            return Err(format!(
                "global headroom {headroom} != ceiling - usage {usage}"
            ));
        }
        if total_limit > g.ceiling() {
            return Err(format!(
                "limits sum to {total_limit}, above the ceiling {}",
                g.ceiling()
            ));
        }
        let scopes = self.inner.ledger.scopes.live();
        for n in &scopes {
            let (limit, usage, headroom) = (n.limit(), n.usage(), n.raw_headroom());
            if i128::from(headroom) != i128::from(limit) - i128::from(usage) {
                return Err(format!(
                    "scope {}: headroom {headroom} != limit {limit} - usage {usage}",
                    n.path
                ));
            }
            let below: u64 = scopes
                .iter()
                .filter(|c| c.parent.as_ref().is_some_and(|p| p.id == n.id))
                .map(|c| c.usage())
                .sum();
            if below > usage {
                return Err(format!(
                    "scope {}: usage {usage} below its children's {below}",
                    n.path
                ));
            }
            if n.parent.is_none() && usage > total_usage {
                return Err(format!(
                    "scope {}: usage {usage} above all engines' {total_usage}",
                    n.path
                ));
            }
        }
        Ok(())
    }

    #[cfg(not(nodedb_mem_loom))]
    /// Counts and reports a panic caught in a step of the background thread.
    pub(crate) fn report_background_panic(&self, payload: &(dyn std::any::Any + Send)) {
        let l = &self.inner.ledger;
        l.global.callback_panics.fetch_add(1, Ordering::Relaxed);
        l.events.record_panic(None, "background tick", payload);
    }

    #[cfg(not(nodedb_mem_loom))]
    pub(crate) fn pump_events(&self) {
        self.inner.ledger.events.pump();
    }
}
