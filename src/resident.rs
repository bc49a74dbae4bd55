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
    /// background rebalancer does this on every tick; call it yourself if you drive
    /// `rebalance` by hand.
    ///
    /// The kernel's peak (`VmHWM`) never comes down, so the margin must be kept *before* the
    /// ceiling is reached: sample often enough that the process cannot grow by more than the
    /// margin between two samples.
    pub fn check_resident(&self) -> Result<RssSample> {
        let inner = &*self.inner;
        let read = || {
            crate::rss::read_status(&inner.proc_status).map_err(|source| MemError::Io {
                what: format!("reading {}", inner.proc_status.display()),
                source,
            })
        };
        let (mut resident, peak) = read()?;
        let ceiling = self.ceiling();
        // jemalloc's statistics are refreshed once per call (twice only after an engine was
        // purged): a refresh walks every arena and takes locks allocating threads also need.
        if resident.saturating_add(self.rss_margin()) >= ceiling {
            let before = resident;
            if self.is_installed() {
                nodedb_mem_alloc::purge_all_arenas();
                nodedb_mem_alloc::page_out_overflow();
                resident = read()?.0;
            }
            inner.ledger.events.record(EventKind::ResidentNearCeiling {
                resident: before,
                after_purge: resident,
                ceiling,
            });
        }
        // `purge_dirty_engines` refreshes the statistics (after any purge above) to judge the
        // engines' dirty pages.
        let purged_engines = self.is_installed() && self.purge_dirty_engines();
        if purged_engines {
            resident = read()?.0;
        }
        #[cfg(not(nodedb_mem_loom))]
        if self.is_installed() {
            self.report_overflow_breaches();
        }
        let allocator_resident = if !self.is_installed() {
            0
        } else if purged_engines || !nodedb_mem_alloc::arenas_ready() {
            // Purged since the refresh, or no refresh made (no engine arenas).
            nodedb_mem_alloc::allocator_resident().unwrap_or(0)
        } else {
            nodedb_mem_alloc::allocator_resident_as_refreshed().unwrap_or(0)
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

    /// Records an [`EventKind::OverflowBreach`] (and so a `tracing` warning) for each engine
    /// whose overflow could not take allocations since the last report.
    #[cfg(not(nodedb_mem_loom))]
    fn report_overflow_breaches(&self) {
        let mut news = Vec::new();
        {
            let mut seen = lock(&self.inner.breaches_seen);
            for e in EngineId::ALL {
                let b = nodedb_mem_alloc::overflow_breaches(e);
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
        let stats = nodedb_mem_alloc::arena_stats();
        let mut purged = false;
        for e in EngineId::ALL {
            let allowance = (self.limit(e) / 4).max(DIRTY_ALLOWANCE_MIN);
            if e != EngineId::Unattributed
                && stats[e.index()].dirty > allowance
                && nodedb_mem_alloc::purge_engine(e)
            {
                self.inner
                    .ledger
                    .global
                    .dirty_purges
                    .fetch_add(1, Ordering::Relaxed);
                purged = true;
            }
        }
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
