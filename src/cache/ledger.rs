//! The per-engine page-cache ledger the governor keeps: what governed I/O left in the cache,
//! what it dropped behind, and the protected regions.

use std::sync::atomic::{AtomicU64, Ordering};

/// One engine's page-cache figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageCacheStats {
    /// The engine's page-cache budget for governed I/O.
    pub budget: u64,
    /// Bytes governed I/O has left in the page cache and not dropped yet.
    pub left_behind: u64,
    /// The highest `left_behind` seen.
    pub peak: u64,
    /// Bytes written back and dropped behind, in total.
    pub dropped: u64,
    /// Bytes of protected (locked) regions.
    pub protected: u64,
    /// Bytes of protected regions resident in memory when these figures were taken (`mincore`
    /// over each region): `protected` while the locks hold.
    pub protected_resident: u64,
    /// Bytes governed writers wrote with direct I/O (`O_DIRECT`), past the page cache, in
    /// total.
    pub direct_written: u64,
    /// Bytes of the engine's governed directories' files found in the page cache at the last
    /// sweep (before it dropped them).
    pub dirs_cached: u64,
    /// The most a sweep found cached.
    pub dirs_peak: u64,
    /// Bytes those sweeps found cached and dropped, in total.
    pub dirs_dropped: u64,
}

/// Per-engine page-cache ledger (inside the governor).
#[derive(Debug, Default)]
pub(crate) struct PageCacheLedger {
    pub(super) left: AtomicU64,
    peak: AtomicU64,
    dropped: AtomicU64,
    pub(super) protected: AtomicU64,
    /// The protected regions, as (address, length), for their residency.
    pub(super) regions: std::sync::Mutex<Vec<(usize, usize)>>,
    pub(super) direct: AtomicU64,
    dirs_cached: AtomicU64,
    dirs_peak: AtomicU64,
    dirs_dropped: AtomicU64,
}

impl PageCacheLedger {
    /// Bytes of the engine's data protected (locked resident) now.
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models never install a governor")
    )]
    pub(crate) fn protected_bytes(&self) -> u64 {
        self.protected.load(Ordering::Acquire)
    }

    pub(super) fn add(&self, bytes: u64) -> u64 {
        let now = self.left.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.peak.fetch_max(now, Ordering::AcqRel);
        now
    }

    /// Gives back `bytes` this caller added (it never gives back more than it added).
    pub(super) fn sub(&self, bytes: u64) {
        self.left.fetch_sub(bytes, Ordering::AcqRel);
        self.dropped.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self, budget: u64) -> PageCacheStats {
        PageCacheStats {
            budget,
            left_behind: self.left.load(Ordering::Acquire),
            peak: self.peak.load(Ordering::Acquire),
            dropped: self.dropped.load(Ordering::Relaxed),
            protected: self.protected.load(Ordering::Acquire),
            protected_resident: lock_regions(&self.regions)
                .iter()
                .map(|&(addr, len)| resident_range(addr, len).unwrap_or(0))
                .sum(),
            direct_written: self.direct.load(Ordering::Relaxed),
            dirs_cached: self.dirs_cached.load(Ordering::Acquire),
            dirs_peak: self.dirs_peak.load(Ordering::Acquire),
            dirs_dropped: self.dirs_dropped.load(Ordering::Relaxed),
        }
    }

    /// Records one sweep of the engine's governed directories.
    pub(crate) fn swept(&self, cached: u64, dropped: u64) {
        self.dirs_cached.store(cached, Ordering::Release);
        self.dirs_peak.fetch_max(cached, Ordering::AcqRel);
        self.dirs_dropped.fetch_add(dropped, Ordering::Relaxed);
    }
}

/// The protected regions' list (a std mutex: this ledger is not part of the loom models, whose
/// `crate::sync` swaps in loom's types).
pub(super) fn lock_regions(
    m: &std::sync::Mutex<Vec<(usize, usize)>>,
) -> std::sync::MutexGuard<'_, Vec<(usize, usize)>> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The page size `mincore` and `mlock` work in.
pub(super) use nodedb_mem_alloc::sys::PAGE;

pub(super) use nodedb_mem_alloc::sys::resident_range;
