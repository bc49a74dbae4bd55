//! Resident-memory feedback: sampling `VmRSS`, counting what it finds beyond the governed usage
//! against the ceiling, and purging dirty pages before the kernel's peak reaches the ceiling.

use crate::EngineId;
use crate::error::{MemError, Result};
use crate::events::EventKind;
use crate::governor::{DIRTY_ALLOWANCE_MIN, MemoryGovernor};
use crate::rss::RssSample;
use crate::sync::{Ordering, lock};

impl MemoryGovernor {
    /// Samples the process's resident memory (`VmRSS`, `VmHWM`, jemalloc's `stats.resident`)
    /// and feeds it back: resident memory beyond the governed usage (allocator overhead,
    /// fragmentation, dirty pages, code and stacks) is counted against the ceiling by
    /// reservations and global pressure until the next sample; and when resident memory comes
    /// within the RSS margin of the ceiling (default 5 %), the arenas' dirty pages are purged
    /// at once and a breach event is recorded. Whatever the total, an engine whose arenas keep
    /// more dirty pages than a quarter of its limit (at least [`DIRTY_ALLOWANCE_MIN`]) has them
    /// purged (counted in [`Snapshot::dirty_purges`](crate::Snapshot::dirty_purges)). The
    /// background thread does this on every tick, reading jemalloc's statistics only when
    /// resident memory is near the ceiling or an engine's dirty pages may have passed its
    /// allowance (this call always reads them); call it yourself if you drive `rebalance` by
    /// hand.
    ///
    /// The kernel's peak (`VmHWM`) never comes down, so the margin must be kept *before* the
    /// ceiling is reached: sample often enough that the process cannot grow by more than the
    /// margin between two samples.
    pub fn check_resident(&self) -> Result<RssSample> {
        self.resident_step(Stats::Refresh)
    }

    /// [`check_resident`](Self::check_resident), refreshing jemalloc's statistics only where
    /// `stats` allows: always, or only when resident memory is near the ceiling or some
    /// engine's dirty pages may have passed its allowance (see [`DirtyWatch`]).
    pub(crate) fn resident_step(&self, stats: Stats) -> Result<RssSample> {
        let inner = &*self.inner;
        let read = || {
            crate::rss::read_status(&inner.proc_file).map_err(|source| MemError::Io {
                what: format!("reading {}", inner.proc_file.path().display()),
                source,
            })
        };
        let (mut resident, peak) = read()?;
        let ceiling = self.ceiling();
        let installed = self.is_installed();
        // jemalloc's statistics are refreshed at most once per call (twice only after an
        // engine was purged): a refresh walks every arena and takes locks allocating threads
        // also need.
        let near = resident.saturating_add(self.rss_margin()) >= ceiling;
        if near {
            let before = resident;
            if installed {
                nodedb_mem_alloc::ctl::arenas::purge_all_arenas();
                nodedb_mem_alloc::ctl::overflow::page_out_overflow();
                resident = read()?.0;
            }
            inner.ledger.events.record(EventKind::ResidentNearCeiling {
                resident: before,
                after_purge: resident,
                ceiling,
            });
        }
        #[cfg(not(nodedb_mem_loom))]
        let refresh = installed && (near || stats == Stats::Refresh || self.dirty_may_have_grown());
        #[cfg(nodedb_mem_loom)]
        let refresh = installed && (near || stats == Stats::Refresh);
        // `purge_dirty_engines` refreshes the statistics (after any purge above) to judge the
        // engines' dirty pages.
        let purged_engines = refresh && self.purge_dirty_engines();
        if purged_engines {
            resident = read()?.0;
        }
        #[cfg(not(nodedb_mem_loom))]
        if installed {
            self.report_overflow_breaches();
        }
        let allocator_resident = if !installed {
            0
        } else if !refresh {
            // As of the last refresh.
            lock(&inner.last_rss).allocator_resident
        } else if purged_engines || !nodedb_mem_alloc::ctl::arenas::arenas_ready() {
            // Purged since the refresh, or no refresh made (no engine arenas).
            nodedb_mem_alloc::ctl::arenas::allocator_resident().unwrap_or(0)
        } else {
            nodedb_mem_alloc::ctl::arenas::allocator_resident_as_refreshed().unwrap_or(0)
        };
        let sample = RssSample {
            resident,
            peak,
            allocator_resident,
        };
        let excess = resident.saturating_sub(self.global_usage());
        inner
            .ledger
            .global
            .rss_excess
            .store(excess, Ordering::Release);
        *lock(&inner.last_rss) = sample;
        self.global_pressure();
        Ok(sample)
    }

    /// Whether some engine's dirty pages may have passed its allowance since the statistics
    /// were last read, judged from the allocator's ledger alone (see [`DirtyWatch`]); also
    /// true once [`DIRTY_RECHECK`] has passed with anything moved, and before the first read.
    #[cfg(not(nodedb_mem_loom))]
    fn dirty_may_have_grown(&self) -> bool {
        let w = lock(&self.inner.dirty_watch);
        let Some(at) = w.at else {
            return true;
        };
        let mut moved = false;
        let moved_by = dirty_moved();
        for e in EngineId::ALL {
            let (b, i) = (self.budget(e), e.index());
            let now = nodedb_mem_alloc::ctl::ledger::charged(e);
            let peak = b.alloc_peak_since_stats().max(now);
            // Pages freed since the read are at most what the charge fell from its peak.
            let bound = w.dirty[i].saturating_add(peak - now);
            if e != EngineId::Unattributed && bound > self.dirty_allowance(e) {
                return true;
            }
            moved |=
                now.abs_diff(w.charged[i]) >= moved_by || peak - w.charged[i].min(peak) >= moved_by;
        }
        moved && at.elapsed() >= DIRTY_RECHECK
    }

    /// The dirty bytes above which `engine`'s arenas are purged: a quarter of its limit, at
    /// least [`DIRTY_ALLOWANCE_MIN`].
    fn dirty_allowance(&self, engine: EngineId) -> u64 {
        (self.limit(engine) / 4).max(DIRTY_ALLOWANCE_MIN)
    }

    /// Records an [`EventKind::OverflowBreach`] (and so a `tracing` warning) for each engine
    /// whose overflow could not take allocations since the last report.
    #[cfg(not(nodedb_mem_loom))]
    fn report_overflow_breaches(&self) {
        let mut news = Vec::new();
        {
            let mut seen = lock(&self.inner.breaches_seen);
            for e in EngineId::ALL {
                let b = nodedb_mem_alloc::ctl::overflow::overflow_breaches(e);
                let last = &mut seen[e.index()];
                let (breaches, refused) = (b.breaches - last.0, b.refused - last.1);
                if breaches > 0 || refused > 0 {
                    *last = (b.breaches, b.refused);
                    news.push(EventKind::OverflowBreach {
                        engine: e,
                        breaches,
                        refused,
                        breach_bytes: b.breach_bytes,
                        refused_bytes: b.refused_bytes,
                        top: crate::TopSites::NONE,
                    });
                }
            }
        }
        // Reported with no lock held: a subscriber may call back into the governor.
        for kind in news {
            self.inner.ledger.events.record(kind);
        }
    }

    /// Purges the arenas of every engine whose dirty pages (freed memory jemalloc keeps for
    /// reuse, resident but charged to nobody) exceed a quarter of its limit, at least 4 MiB:
    /// an engine that churns through its budget would otherwise keep several budgets' worth
    /// resident until jemalloc's 10 s decay returns them.
    /// Returns whether it purged any.
    fn purge_dirty_engines(&self) -> bool {
        let stats = nodedb_mem_alloc::ctl::arenas::arena_stats();
        self.inner
            .ledger
            .global
            .stats_refreshes
            .fetch_add(1, Ordering::Relaxed);
        let mut purged = false;
        let mut watch = DirtyWatch {
            at: Some(std::time::Instant::now()),
            ..DirtyWatch::default()
        };
        for e in EngineId::ALL {
            let i = e.index();
            let charged = nodedb_mem_alloc::ctl::ledger::charged(e);
            #[cfg(not(nodedb_mem_loom))]
            self.budget(e).restart_stats_window(charged);
            watch.charged[i] = charged;
            watch.dirty[i] = stats[i].dirty;
            if e != EngineId::Unattributed
                && stats[i].dirty > self.dirty_allowance(e)
                && nodedb_mem_alloc::ctl::arenas::purge_engine(e)
            {
                self.inner
                    .ledger
                    .global
                    .dirty_purges
                    .fetch_add(1, Ordering::Relaxed);
                watch.dirty[i] = 0;
                purged = true;
            }
        }
        *lock(&self.inner.dirty_watch) = watch;
        purged
    }

    /// The last [`check_resident`](Self::check_resident) sample, and the resident bytes beyond
    /// the governed usage it found.
    pub fn last_resident(&self) -> (RssSample, u64) {
        (
            *lock(&self.inner.last_rss),
            self.inner.ledger.global.rss_excess.load(Ordering::Acquire),
        )
    }
}

/// Whether [`MemoryGovernor::resident_step`] refreshes jemalloc's statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stats {
    /// Always ([`MemoryGovernor::check_resident`]).
    Refresh,
    /// Only when resident memory is near the ceiling or dirty pages may have grown past an
    /// allowance (the background thread's ticks).
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models run no background thread")
    )]
    IfNeeded,
}

/// A change in an engine's allocator charge, or in its peak, that counts as "moved" for
/// [`DIRTY_RECHECK`]: the smallest allowance, and at least twice the in-flight bound (a
/// thread's headroom moves the charge by up to the bound with no block allocated or freed).
#[cfg(not(nodedb_mem_loom))]
fn dirty_moved() -> u64 {
    DIRTY_ALLOWANCE_MIN.max(2 * nodedb_mem_alloc::ctl::ledger::inflight_bound().batch)
}

/// How long the statistics may go unread while the allocator's ledgers moved but no engine's
/// bound on its dirty pages passed its allowance: the bound assumes jemalloc reuses freed pages
/// before it maps new ones, which fragmentation can break. jemalloc's own decay returns dirty
/// pages over 10 s.
#[cfg_attr(
    nodedb_mem_loom,
    expect(dead_code, reason = "loom models run no background thread")
)]
const DIRTY_RECHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// What the engines' arenas held at the last refresh of jemalloc's statistics, to tell without
/// a refresh whether one is needed.
///
/// An engine's dirty pages (freed, still resident, charged to nobody) grow only as its live
/// bytes fall: jemalloc hands freed pages out again before it maps new ones, so pages made
/// dirty since the refresh are at most the fall of the engine's allocator charge from its
/// highest point since (`peak - now`, from the ledger's windows). The bound
/// `dirty_then + peak - now` is compared with the engine's allowance on every tick, for the
/// price of a few atomic loads; the statistics are read only when it is passed, when resident
/// memory is near the ceiling, or [`DIRTY_RECHECK`] after anything moved.
#[derive(Debug, Default)]
pub(crate) struct DirtyWatch {
    /// When the statistics were last read here (`None`: never).
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models run no background thread")
    )]
    at: Option<std::time::Instant>,
    /// Per engine, its arenas' dirty bytes then (0 where they were purged).
    dirty: [u64; EngineId::COUNT],
    /// Per engine, its allocator charge then.
    charged: [u64; EngineId::COUNT],
}
