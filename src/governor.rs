//! `MemoryGovernor`: budgets under one ceiling, reservations, pressure and rebalancing.

use std::fmt;

use crossbeam_utils::CachePadded;

use crate::EngineId;
use crate::budget::{Budget, checked_sub, raise_max, take_headroom, to_i64, update_level};
use crate::ceiling::CeilingSource;
use crate::config::{Config, GovernorBuilder, RebalanceConfig};
use crate::error::{MemError, Result};
use crate::events::{EventKind, EventLog};
use crate::pressure::{PressureLevel, PressureThresholds, ThresholdsPpm, ratio_ppm};
use crate::rss::RssSample;
use crate::spill::{Reclaimer, SpillConfig, SpillController};
use crate::sync::{Arc, AtomicI64, AtomicU8, AtomicU64, Mutex, Ordering, lock};

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
    inner: Arc<Inner>,
}

struct Inner {
    budgets: [CachePadded<Budget>; EngineId::COUNT],
    global: CachePadded<GlobalLedger>,
    thresholds: PressureThresholds,
    ppm: ThresholdsPpm,
    rebalance: RebalanceConfig,
    /// Serialises limit changes: held by `rebalance` and by `snapshot` while reading limits.
    rebalance_lock: Mutex<()>,
    events: EventLog,
    ceiling_source: CeilingSource,
    reclaimers: Mutex<Vec<Registered>>,
    next_reclaimer: AtomicU64,
    rss_margin: u64,
    proc_status: std::path::PathBuf,
    last_rss: Mutex<RssSample>,
    /// Per engine, the overflow breaches and refusals already reported as events.
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models never install a governor")
    )]
    breaches_seen: Mutex<[(u64, u64); EngineId::COUNT]>,
    /// Per engine, the page cache governed I/O left behind, and its budget.
    page_cache: [crate::cache::PageCacheLedger; EngineId::COUNT],
    page_cache_budget: [u64; EngineId::COUNT],
    /// Directories whose files the background thread drops from the page cache, per engine.
    governed_dirs: Mutex<Vec<(EngineId, std::path::PathBuf)>>,
}

struct Registered {
    id: u64,
    engine: EngineId,
    reclaimer: std::sync::Arc<dyn Reclaimer>,
}

/// The process-wide counterpart of a [`Budget`]: usage of all engines against the ceiling.
struct GlobalLedger {
    ceiling: u64,
    /// `ceiling - usage`; the global admission word.
    headroom: AtomicI64,
    usage: AtomicU64,
    peak: AtomicU64,
    rejections: AtomicU64,
    level: AtomicU8,
    transitions: AtomicU64,
    /// Whether the global allocator's ledger counts (see `Budget::allocator_bytes`).
    from_allocator: bool,
    /// Resident memory beyond the governed usage at the last sample (allocator overhead,
    /// fragmentation, code, stacks): counted against the ceiling by admission and pressure.
    rss_excess: AtomicU64,
    /// Engine arenas purged because their dirty pages passed the allowance.
    dirty_purges: AtomicU64,
}

impl GlobalLedger {
    /// Bytes the global allocator has charged to all engines together.
    fn allocator_bytes(&self) -> u64 {
        #[cfg(not(nodedb_mem_loom))]
        if self.from_allocator {
            return EngineId::ALL
                .iter()
                .map(|&e| nodedb_mem_alloc::charged(e))
                .sum();
        }
        0
    }

    fn own_usage(&self) -> u64 {
        self.usage.load(Ordering::Acquire)
    }

    fn take_headroom(&self, bytes: u64) -> std::result::Result<(), (i64, u64)> {
        let ext = self.allocator_bytes() + self.rss_excess.load(Ordering::Acquire);
        take_headroom(&self.headroom, bytes, ext)
    }

    fn raise(&self, bytes: u64) {
        let now = self.usage.fetch_add(bytes, Ordering::AcqRel) + bytes + self.allocator_bytes();
        raise_max(&self.peak, now);
    }

    /// Lowers usage after the engine-level decrement; cannot underflow because every byte in
    /// an engine's ledger entered the global ledger first.
    fn lower(&self, bytes: u64) {
        let lowered = checked_sub(&self.usage, bytes);
        debug_assert!(lowered.is_ok(), "global usage below an engine's");
        self.headroom.fetch_add(to_i64(bytes), Ordering::AcqRel);
    }
}

impl fmt::Debug for MemoryGovernor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryGovernor")
            .field("ceiling", &self.inner.global.ceiling)
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
        MemoryGovernor {
            inner: Arc::new(Inner {
                budgets,
                global: CachePadded::new(GlobalLedger {
                    ceiling: c.ceiling,
                    headroom: AtomicI64::new(to_i64(c.ceiling)),
                    usage: AtomicU64::new(0),
                    peak: AtomicU64::new(0),
                    rejections: AtomicU64::new(0),
                    level: AtomicU8::new(PressureLevel::Normal as u8),
                    transitions: AtomicU64::new(0),
                    from_allocator,
                    rss_excess: AtomicU64::new(0),
                    dirty_purges: AtomicU64::new(0),
                }),
                thresholds: c.thresholds,
                ppm: c.thresholds.to_ppm(),
                rebalance: c.rebalance,
                rebalance_lock: Mutex::new(()),
                events: EventLog::new(),
                ceiling_source: c.ceiling_source,
                reclaimers: Mutex::new(Vec::new()),
                next_reclaimer: AtomicU64::new(0),
                rss_margin: c.rss_margin,
                proc_status: c.proc_status,
                last_rss: Mutex::new(RssSample::default()),
                breaches_seen: Mutex::new([(0, 0); EngineId::COUNT]),
                page_cache: Default::default(),
                page_cache_budget: c.page_cache,
                governed_dirs: Mutex::new(Vec::new()),
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
        if self.is_installed() && nodedb_mem_alloc::overflow_region(EngineId::Vector).is_some() {
            let _serial = lock(&self.inner.rebalance_lock);
            for e in EngineId::ALL {
                let protected = self.page_cache_ledger(e).protected_bytes();
                let heap = self.limit(e).saturating_sub(protected);
                nodedb_mem_alloc::set_overflow_limit(e, Some(heap));
            }
        }
    }

    /// Whether this governor is bound to the global allocator (made by
    /// [`GovernorBuilder::install`]), so heap allocations count against its budgets.
    pub fn is_installed(&self) -> bool {
        self.inner.global.from_allocator
    }

    /// The ledger of `engine`.
    pub fn budget(&self, engine: EngineId) -> &Budget {
        &self.inner.budgets[engine.index()]
    }

    /// A writer over `file` (from its current position) whose page-cache footprint is charged
    /// to `engine` and held under the engine's page-cache budget: past it, it writes back and
    /// drops its pages behind itself. See [`GovernedWriter`](crate::GovernedWriter).
    pub fn writer(&self, engine: EngineId, file: std::fs::File) -> Result<crate::GovernedWriter> {
        crate::cache::GovernedWriter::new(self, engine, file, false)
    }

    /// A writer like [`writer`](Self::writer) that writes around the page cache with direct
    /// I/O (`O_DIRECT`, set on the caller's descriptor and put back by `finish`): it gathers
    /// 1 MiB in an aligned buffer and writes it at once, so a bulk flush leaves nothing in the
    /// cache but a partial block at either end, which goes through the cache and is dropped
    /// behind. Where the file system does not do direct I/O it is an ordinary governed writer
    /// ([`GovernedWriter::is_direct`](crate::GovernedWriter::is_direct) says which).
    /// `O_DIRECT` is a flag of the open file description, so descriptors cloned from `file`
    /// share it until the writer finishes.
    pub fn direct_writer(
        &self,
        engine: EngineId,
        file: std::fs::File,
    ) -> Result<crate::GovernedWriter> {
        crate::cache::GovernedWriter::new(self, engine, file, true)
    }

    /// A one-pass reader over `file` whose page-cache footprint is charged to `engine` and
    /// dropped behind past its page-cache budget. See [`GovernedReader`](crate::GovernedReader).
    pub fn reader(&self, engine: EngineId, file: std::fs::File) -> Result<crate::GovernedReader> {
        crate::cache::GovernedReader::new(self, engine, file)
    }

    /// Keeps `data` (mapped memory: an index, the upper layers of a graph) resident for as long
    /// as the guard lives: reserves its size against `engine`'s budget and the ceiling (a
    /// refusal is the usual [`MemError::BudgetExceeded`] / [`MemError::CeilingExceeded`]),
    /// then locks it with `mlock` (refused by `RLIMIT_MEMLOCK`: [`MemError::Io`], saying the
    /// limit and how to raise it).
    pub fn protect<'a>(&self, engine: EngineId, data: &'a [u8]) -> Result<crate::Protected<'a>> {
        crate::cache::Protected::new(self, engine, data)
    }

    /// Drops the files under `dir` from the page cache behind whoever writes them (for files a
    /// library writes itself, such as DataFusion's spill files): at every tick of the background
    /// thread, or at [`sweep_governed_dirs`](Self::sweep_governed_dirs), each file's dirty pages
    /// are handed to write-back and its clean pages dropped, and what was cached is reported as
    /// `engine`'s (`PageCacheStats::dirs_cached`). Sampled, not bounded: between two sweeps the
    /// writer can fill the cache at its own pace; use [`writer`](Self::writer) where the code
    /// that writes is yours. A directory that does not exist is refused.
    pub fn govern_dir(&self, engine: EngineId, dir: impl Into<std::path::PathBuf>) -> Result<()> {
        let dir = dir.into();
        if !dir.is_dir() {
            return Err(MemError::config(
                "governed directory",
                dir.display(),
                "not a directory",
            ));
        }
        lock(&self.inner.governed_dirs).push((engine, dir));
        Ok(())
    }

    /// Sweeps every governed directory now (see [`govern_dir`](Self::govern_dir)) and returns
    /// what it found, summed over them. The background thread calls this at every tick.
    pub fn sweep_governed_dirs(&self) -> crate::SweepStats {
        let dirs = lock(&self.inner.governed_dirs).clone();
        let mut total = crate::SweepStats::default();
        let mut per_engine = [crate::SweepStats::default(); EngineId::COUNT];
        for (engine, dir) in &dirs {
            crate::cache::sweep_dir(dir, 0, &mut per_engine[engine.index()]);
        }
        for e in EngineId::ALL {
            let s = per_engine[e.index()];
            if dirs.iter().any(|(d, _)| *d == e) {
                self.page_cache_ledger(e).swept(
                    s.cached_before,
                    s.cached_before.saturating_sub(s.cached_after),
                );
            }
            total.files += s.files;
            total.cached_before += s.cached_before;
            total.cached_after += s.cached_after;
        }
        total
    }

    /// `engine`'s page-cache figures: budget, what governed I/O left behind and its peak,
    /// bytes dropped behind, protected bytes.
    pub fn page_cache(&self, engine: EngineId) -> crate::PageCacheStats {
        self.page_cache_ledger(engine)
            .stats(self.page_cache_budget(engine))
    }

    /// The page cache `engine`'s governed I/O may leave behind.
    pub fn page_cache_budget(&self, engine: EngineId) -> u64 {
        self.inner.page_cache_budget[engine.index()]
    }

    pub(crate) fn page_cache_ledger(&self, engine: EngineId) -> &crate::cache::PageCacheLedger {
        &self.inner.page_cache[engine.index()]
    }

    /// The margin kept between resident memory and the ceiling, in bytes (see
    /// [`GovernorBuilder::rss_margin`](crate::GovernorBuilder::rss_margin)).
    pub fn rss_margin(&self) -> u64 {
        self.inner.rss_margin
    }

    /// The global ceiling in bytes.
    pub fn ceiling(&self) -> u64 {
        self.inner.global.ceiling
    }

    /// Where the ceiling came from.
    pub fn ceiling_source(&self) -> &CeilingSource {
        &self.inner.ceiling_source
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
        let g = &self.inner.global;
        g.own_usage() + g.allocator_bytes()
    }

    /// The highest global usage seen (sampled at every reservation, charge and poll).
    pub fn global_peak(&self) -> u64 {
        let g = &self.inner.global;
        let now = self.global_usage();
        raise_max(&g.peak, now);
        g.peak.load(Ordering::Acquire)
    }

    /// Reserves `bytes` for `engine`, or refuses with a deterministic error.
    ///
    /// Admission is one compare-and-swap on the engine's headroom (`limit - usage`) and one on
    /// the global headroom (`ceiling - usage`): a reservation is admitted only if it fits both
    /// at that instant, whatever other threads do, so reservations alone can never take an
    /// engine past its limit or the process past its ceiling. If the ceiling refuses, the
    /// engine's admission is undone (a concurrent reservation of the same engine may be
    /// refused in that instant — conservative, never over-admitting).
    ///
    /// Two honest uses: hold the reservation across an allocation you are about to make and
    /// drop it once the allocator has charged the memory; or hold it for the lifetime of memory
    /// the allocator does not see (file mappings, I/O buffers, foreign allocators). Never keep
    /// a reservation for memory the allocator also charges, or the bytes count twice.
    ///
    /// Reserving zero bytes always succeeds and holds nothing.
    pub fn reserve(&self, engine: EngineId, bytes: u64) -> Result<Reservation> {
        self.admit(engine, bytes)?;
        Ok(Reservation {
            gov: self.clone(),
            engine,
            size: bytes,
        })
    }

    /// Whether `bytes` more would be admitted for `engine` right now (its limit and the global
    /// ceiling, counting what the allocator has charged), the answer [`reserve`](Self::reserve)
    /// would give, without holding anything. Unlike a reservation taken and dropped at once,
    /// the question leaves no trace in the engine's usage or peak: for a pool that only asks
    /// and lets the allocator charge the memory when it is allocated (see
    /// `nodedb-mem-datafusion`). A refusal is counted and reported as `reserve`'s would be.
    pub fn check_admission(&self, engine: EngineId, bytes: u64) -> Result<()> {
        self.admit_then(engine, bytes, false)
    }

    fn admit(&self, engine: EngineId, bytes: u64) -> Result<()> {
        self.admit_then(engine, bytes, true)
    }

    /// Admission for `bytes`: committed as a reservation (`commit`), or given back at once.
    fn admit_then(&self, engine: EngineId, bytes: u64, commit: bool) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let inner = &*self.inner;
        let b = self.budget(engine);
        if let Err(refused) = b.try_admit(bytes) {
            inner.events.record(EventKind::BudgetRejected {
                engine,
                requested: bytes,
                used: refused.usage,
                limit: refused.limit,
            });
            return Err(MemError::budget_exceeded(
                engine,
                bytes,
                refused.usage,
                refused.limit,
            ));
        }
        let g = &inner.global;
        if let Err((headroom, ext)) = g.take_headroom(bytes) {
            b.cancel_admission(bytes);
            b.count_rejection();
            g.rejections.fetch_add(1, Ordering::Relaxed);
            let own = u64::try_from(i128::from(g.ceiling) - i128::from(headroom)).unwrap_or(0);
            let used = own + ext;
            inner.events.record(EventKind::CeilingRejected {
                engine,
                requested: bytes,
                used,
                ceiling: g.ceiling,
            });
            return Err(MemError::ceiling_exceeded(engine, bytes, used, g.ceiling));
        }
        if commit {
            g.raise(bytes);
            b.commit_reservation(bytes);
        } else {
            g.headroom.fetch_add(to_i64(bytes), Ordering::AcqRel);
            b.cancel_admission(bytes);
        }
        Ok(())
    }

    fn release(&self, engine: EngineId, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.budget(engine).release(bytes)?;
        self.inner.global.lower(bytes);
        Ok(())
    }

    /// Charges `bytes` of live memory to `engine`, unconditionally: the global allocator's
    /// entry point, and for allocators of your own that the global allocator does not see.
    /// Usage may go above the limit this way; pressure rises and reservations are refused
    /// until it falls.
    pub fn charge(&self, engine: EngineId, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let g = &self.inner.global;
        g.headroom.fetch_sub(to_i64(bytes), Ordering::AcqRel);
        g.raise(bytes);
        self.budget(engine).charge(bytes);
    }

    /// Credits `bytes` of freed memory to `engine`. Crediting more than is charged is a bug in
    /// the caller: it is refused with [`MemError::OverRelease`] and changes nothing.
    pub fn credit(&self, engine: EngineId, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.budget(engine).credit(bytes)?;
        self.inner.global.lower(bytes);
        Ok(())
    }

    /// `engine`'s pressure level, with hysteresis. O(1), lock-free, allocation-free.
    ///
    /// A change of level is recorded as a breach event (emitted to `tracing` at the next
    /// snapshot, rebalance or background tick, never from this call).
    pub fn pressure(&self, engine: EngineId) -> PressureLevel {
        let b = self.budget(engine);
        let (level, changed) = b.update_pressure(&self.inner.ppm);
        if let Some(from) = changed {
            self.inner.events.record_quiet(EventKind::Pressure {
                engine: Some(engine),
                from,
                to: level,
            });
        }
        level
    }

    /// The process's pressure level: global usage against the ceiling, with hysteresis.
    /// O(1), lock-free, allocation-free.
    pub fn global_pressure(&self) -> PressureLevel {
        let g = &self.inner.global;
        let (level, changed) = update_level(
            &g.level,
            &g.transitions,
            &self.inner.ppm,
            self.global_usage() + g.rss_excess.load(Ordering::Acquire),
            g.ceiling,
        );
        if let Some(from) = changed {
            self.inner.events.record_quiet(EventKind::Pressure {
                engine: None,
                from,
                to: level,
            });
        }
        level
    }

    /// One rebalancing step: busy engines below their budget take back what they lent, then
    /// idle engines lend spare limit to busy ones (see [`RebalanceConfig`]). The sum of all
    /// limits never exceeds the ceiling: every move lowers one limit before raising another
    /// by the same amount.
    pub fn rebalance(&self) -> RebalanceReport {
        let inner = &*self.inner;
        let _serial = lock(&inner.rebalance_lock);
        let cfg = inner.rebalance;
        let target_ppm = (cfg.target_utilisation * 1e6).round() as u64;
        let idle_ppm = (cfg.idle_utilisation * 1e6).round() as u64;

        #[derive(Clone, Copy)]
        struct Seen {
            usage: u64,
            window_peak: u64,
            busy: bool,
            idle: bool,
        }
        let seen = EngineId::ALL.map(|e| {
            let b = self.budget(e);
            let window_peak = b.take_window_peak();
            let busy = self.pressure(e) >= PressureLevel::Warning;
            Seen {
                // Demand includes what overflowed: a borrower asks for enough to hold it again.
                usage: b.usage() + b.overflow_bytes(),
                window_peak,
                busy,
                idle: !busy && ratio_ppm(window_peak, b.limit()) < idle_ppm,
            }
        });
        let mut moves = Vec::new();
        let mut record = |from: EngineId, to: EngineId, bytes: u64| {
            inner
                .events
                .record(EventKind::Rebalance { from, to, bytes });
            moves.push(RebalanceMove { from, to, bytes });
        };

        // 1. Busy lenders take back what they lent, from engines above their own budget.
        for e in EngineId::ALL.into_iter().filter(|e| seen[e.index()].busy) {
            let b = self.budget(e);
            let mut need = b.base().saturating_sub(b.limit());
            while need > 0 {
                let donor = EngineId::ALL
                    .into_iter()
                    .filter(|&d| d != e)
                    .max_by_key(|&d| self.budget(d).limit().saturating_sub(self.budget(d).base()));
                let Some(d) = donor else { break };
                let surplus = self.budget(d).limit().saturating_sub(self.budget(d).base());
                if surplus == 0 {
                    break;
                }
                let x = need.min(surplus);
                self.budget(d).give_back(x);
                b.take_back(x);
                record(d, e, x);
                need -= x;
            }
        }

        // 2. Idle engines lend to busy ones, fullest borrower first.
        let mut borrowers: Vec<EngineId> = EngineId::ALL
            .into_iter()
            .filter(|e| seen[e.index()].busy)
            .collect();
        borrowers
            .sort_by_key(|&e| std::cmp::Reverse(ratio_ppm(seen[e.index()].usage, self.limit(e))));
        for e in borrowers {
            let b = self.budget(e);
            let wanted = div_ceil_ppm(seen[e.index()].usage, target_ppm);
            let mut want = wanted.min(b.cap()).saturating_sub(b.limit());
            for l in EngineId::ALL {
                if want < cfg.min_move {
                    break;
                }
                let s = seen[l.index()];
                if l == e || !s.idle {
                    continue;
                }
                let lender = self.budget(l);
                let keep = lender.floor().max(div_ceil_ppm(s.window_peak, target_ppm));
                let spare = lender.limit().saturating_sub(keep).min(lender.available());
                let x = want.min(spare);
                if x < cfg.min_move {
                    continue;
                }
                if lender.lend(x) {
                    b.borrow(x);
                    record(l, e, x);
                    want -= x;
                }
            }
        }
        drop(_serial);
        if !moves.is_empty() {
            self.publish_limits();
        }
        // Engines left above their limit (a lender took its headroom back) are asked to free
        // down to the target utilisation; at critical global pressure, everyone is.
        let mut reclaimed = Vec::new();
        for e in EngineId::ALL {
            let b = self.budget(e);
            let want = b.usage().saturating_sub(b.limit());
            if want > 0 {
                let keep =
                    u64::try_from(u128::from(b.limit()) * u128::from(target_ppm) / 1_000_000)
                        .unwrap_or(u64::MAX);
                let freed = self.reclaim(e, b.usage().saturating_sub(keep));
                reclaimed.push((e, freed));
            }
        }
        if self.global_pressure() >= PressureLevel::Critical {
            let warning = crate::size::fraction_of(self.ceiling(), inner.thresholds.warning);
            let mut need = self.global_usage().saturating_sub(warning);
            let mut order: Vec<EngineId> = EngineId::ALL.to_vec();
            order.sort_by_key(|&e| std::cmp::Reverse(self.reclaimable(e)));
            for e in order {
                if need == 0 {
                    break;
                }
                let freed = self.reclaim(e, need);
                reclaimed.push((e, freed));
                need = need.saturating_sub(freed);
            }
        }
        for e in EngineId::ALL {
            self.pressure(e);
        }
        self.global_pressure();
        inner.events.pump();
        RebalanceReport { moves, reclaimed }
    }

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
        if resident.saturating_add(inner.rss_margin) >= ceiling {
            let before = resident;
            if self.is_installed() {
                nodedb_mem_alloc::purge_all_arenas();
                nodedb_mem_alloc::page_out_overflow();
                resident = read()?.0;
            }
            inner.events.record(EventKind::ResidentNearCeiling {
                resident: before,
                after_purge: resident,
                ceiling,
            });
        }
        if self.is_installed() && self.purge_dirty_engines() {
            resident = read()?.0;
        }
        #[cfg(not(nodedb_mem_loom))]
        if self.is_installed() {
            self.report_overflow_breaches();
        }
        let allocator_resident = if self.is_installed() {
            nodedb_mem_alloc::allocator_resident().unwrap_or(0)
        } else {
            0
        };
        let sample = RssSample {
            resident,
            peak,
            allocator_resident,
        };
        let excess = resident.saturating_sub(self.global_usage());
        inner.global.rss_excess.store(excess, Ordering::Release);
        *lock(&inner.last_rss) = sample;
        self.global_pressure();
        Ok(sample)
    }

    /// Records an [`EventKind::OverflowBreach`] (and so a `tracing` warning) for each engine
    /// whose overflow could not take allocations since the last report.
    #[cfg(not(nodedb_mem_loom))]
    fn report_overflow_breaches(&self) {
        let mut seen = lock(&self.inner.breaches_seen);
        for e in EngineId::ALL {
            let b = nodedb_mem_alloc::overflow_breaches(e);
            let last = &mut seen[e.index()];
            let (breaches, refused) = (b.breaches - last.0, b.refused - last.1);
            if breaches > 0 || refused > 0 {
                *last = (b.breaches, b.refused);
                self.inner.events.record(EventKind::OverflowBreach {
                    engine: e,
                    breaches,
                    refused,
                    breach_bytes: b.breach_bytes,
                    refused_bytes: b.refused_bytes,
                });
            }
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
            self.inner.global.rss_excess.load(Ordering::Acquire),
        )
    }

    /// A spill controller for `engine` (see [`SpillController`]).
    pub fn spill_controller(
        &self,
        engine: EngineId,
        config: SpillConfig,
    ) -> Result<SpillController> {
        SpillController::new(self.clone(), engine, config)
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
        let id = self.inner.next_reclaimer.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.reclaimers).push(Registered {
            id,
            engine,
            reclaimer,
        });
        ReclaimerHandle {
            gov: self.clone(),
            id,
        }
    }

    /// What `engine`'s reclaimers say they could free now.
    pub fn reclaimable(&self, engine: EngineId) -> u64 {
        self.reclaimers_of(engine)
            .iter()
            .map(|r| r.reclaimable())
            .fold(0, u64::saturating_add)
    }

    /// Asks `engine`'s reclaimers, the one with most to give first, to free `bytes`; returns
    /// what they report freed (recorded as a breach event).
    pub fn reclaim(&self, engine: EngineId, bytes: u64) -> u64 {
        if bytes == 0 {
            return 0;
        }
        let mut reclaimers: Vec<(u64, std::sync::Arc<dyn Reclaimer>)> = self
            .reclaimers_of(engine)
            .into_iter()
            .map(|r| (r.reclaimable(), r))
            .filter(|(n, _)| *n > 0)
            .collect();
        if reclaimers.is_empty() {
            return 0;
        }
        reclaimers.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
        let mut freed = 0u64;
        for (_, r) in reclaimers {
            if freed >= bytes {
                break;
            }
            freed = freed.saturating_add(r.reclaim(bytes - freed));
        }
        self.inner.events.record(EventKind::Reclaim {
            engine,
            requested: bytes,
            freed,
        });
        freed
    }

    /// The engine's reclaimers, cloned out so none is called under the registry's lock.
    fn reclaimers_of(&self, engine: EngineId) -> Vec<std::sync::Arc<dyn Reclaimer>> {
        lock(&self.inner.reclaimers)
            .iter()
            .filter(|r| r.engine == engine)
            .map(|r| std::sync::Arc::clone(&r.reclaimer))
            .collect()
    }

    /// Every budget's state, the global figures and the recent breach events.
    pub fn snapshot(&self) -> crate::Snapshot {
        let inner = &*self.inner;
        let global_pressure = self.global_pressure();
        let (arenas, by_node) = if inner.global.from_allocator {
            nodedb_mem_alloc::arena_stats_by_node()
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
                    inner.global.from_allocator,
                    self.page_cache(e),
                )
            })
        };
        let g = &inner.global;
        crate::Snapshot {
            ceiling: g.ceiling,
            ceiling_source: inner.ceiling_source.clone(),
            global_usage: self.global_usage(),
            global_peak: self.global_peak(),
            global_pressure,
            global_rejections: g.rejections.load(Ordering::Relaxed),
            global_pressure_transitions: g.transitions.load(Ordering::Relaxed),
            engines,
            events: inner.events.history(),
            events_recorded: inner.events.recorded(),
            events_dropped: inner.events.dropped(),
            resident: *lock(&inner.last_rss),
            resident_unaccounted: g.rss_excess.load(Ordering::Acquire),
            dirty_purges: g.dirty_purges.load(Ordering::Relaxed),
            overflow: if self.is_installed() {
                nodedb_mem_alloc::overflow_stats()
            } else {
                Default::default()
            },
        }
    }

    /// The Prometheus text exposition of [`snapshot`](Self::snapshot).
    pub fn prometheus(&self) -> String {
        self.snapshot().to_prometheus()
    }

    /// Checks the ledger's invariants at a quiescent moment (no operation in flight): for each
    /// engine `usage == used + reserved` and `headroom == limit - usage`, global usage equals
    /// the engines' sum, and the limits sum to at most the ceiling. Returns the first
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
        let g = &self.inner.global;
        let usage = g.own_usage();
        if usage != total_usage {
            return Err(format!(
                "global usage {usage} != sum of engines {total_usage}"
            ));
        }
        let headroom = g.headroom.load(Ordering::Acquire);
        if i128::from(headroom) != i128::from(g.ceiling) - i128::from(usage) {
            return Err(format!(
                "global headroom {headroom} != ceiling - usage {usage}"
            ));
        }
        if total_limit > g.ceiling {
            return Err(format!(
                "limits sum to {total_limit}, above the ceiling {}",
                g.ceiling
            ));
        }
        Ok(())
    }

    #[cfg(not(nodedb_mem_loom))]
    /// Starts a background thread that calls [`rebalance`](Self::rebalance) every `interval`
    /// (which also refreshes pressure levels and emits pending breach events). The thread
    /// stops when the returned handle is dropped or [`Rebalancer::stop`](crate::Rebalancer::stop) is called.
    pub fn spawn_rebalancer(&self, interval: std::time::Duration) -> Result<crate::Rebalancer> {
        crate::rebalancer::Rebalancer::spawn(self.clone(), interval)
    }

    #[cfg(not(nodedb_mem_loom))]
    pub(crate) fn pump_events(&self) {
        self.inner.events.pump();
    }
}

/// `ceil(bytes / (ppm / 1e6))`: the limit at which `bytes` is `ppm` parts per million.
fn div_ceil_ppm(bytes: u64, ppm: u64) -> u64 {
    let q = (u128::from(bytes) * 1_000_000).div_ceil(u128::from(ppm.max(1)));
    u64::try_from(q).unwrap_or(u64::MAX)
}

/// One move of limit between engines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RebalanceMove {
    /// The engine whose limit shrank.
    pub from: EngineId,
    /// The engine whose limit grew.
    pub to: EngineId,
    /// Bytes moved.
    pub bytes: u64,
}

/// What one [`MemoryGovernor::rebalance`] step did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RebalanceReport {
    /// The moves, in the order they were made.
    pub moves: Vec<RebalanceMove>,
    /// Engines whose reclaimers were asked for memory, with the bytes they freed.
    pub reclaimed: Vec<(EngineId, u64)>,
}

/// Keeps a reclaimer registered; dropping it unregisters the reclaimer.
pub struct ReclaimerHandle {
    gov: MemoryGovernor,
    id: u64,
}

impl fmt::Debug for ReclaimerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReclaimerHandle")
            .field("id", &self.id)
            .finish()
    }
}

impl Drop for ReclaimerHandle {
    fn drop(&mut self) {
        lock(&self.gov.inner.reclaimers).retain(|r| r.id != self.id);
    }
}

/// Bytes admitted for one engine, given back when dropped.
///
/// Like DataFusion's `MemoryReservation`: grow it with [`try_grow`](Self::try_grow), give part
/// back with [`shrink`](Self::shrink), hand part to another owner with
/// [`split`](Self::split).
///
/// ```
/// use nodedb_mem::{EngineId, MemoryGovernor};
/// let gov = MemoryGovernor::builder().global_ceiling(16 << 20).build()?;
/// let mut a = gov.reserve(EngineId::Vector, 4096)?;
/// let b = a.split(1024)?;
/// assert_eq!((a.size(), b.size()), (3072, 1024));
/// a.shrink(72)?;
/// assert_eq!(gov.usage(EngineId::Vector), 4024);
/// drop((a, b));
/// assert_eq!(gov.usage(EngineId::Vector), 0);
/// # Ok::<(), nodedb_mem::MemError>(())
/// ```
pub struct Reservation {
    gov: MemoryGovernor,
    engine: EngineId,
    size: u64,
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("engine", &self.engine)
            .field("size", &self.size)
            .finish()
    }
}

impl Reservation {
    /// The engine the bytes are reserved for.
    pub fn engine(&self) -> EngineId {
        self.engine
    }

    /// Bytes held.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reserves `bytes` more, or refuses (holding what it held) with the same error as
    /// [`MemoryGovernor::reserve`].
    pub fn try_grow(&mut self, bytes: u64) -> Result<()> {
        self.gov.admit(self.engine, bytes)?;
        self.size += bytes;
        Ok(())
    }

    /// Grows or shrinks to exactly `new_size`; refuses a growth that does not fit.
    pub fn try_resize(&mut self, new_size: u64) -> Result<()> {
        if new_size >= self.size {
            self.try_grow(new_size - self.size)
        } else {
            self.shrink(self.size - new_size)
        }
    }

    /// Gives `bytes` back to the engine's budget.
    pub fn shrink(&mut self, bytes: u64) -> Result<()> {
        self.check_holds(bytes)?;
        self.gov.release(self.engine, bytes)?;
        self.size -= bytes;
        Ok(())
    }

    /// Moves `bytes` of this reservation into a new one for the same engine.
    pub fn split(&mut self, bytes: u64) -> Result<Reservation> {
        self.check_holds(bytes)?;
        self.size -= bytes;
        Ok(Reservation {
            gov: self.gov.clone(),
            engine: self.engine,
            size: bytes,
        })
    }

    /// Gives everything back; returns how many bytes that was.
    pub fn free(&mut self) -> u64 {
        let size = std::mem::take(&mut self.size);
        // A reservation releases exactly what it was admitted, so this cannot be refused; if a
        // bug ever made it so, the ledger counts it in `over_releases` and stays unchanged.
        let released = self.gov.release(self.engine, size);
        debug_assert!(released.is_ok(), "{released:?}");
        size
    }

    fn check_holds(&self, bytes: u64) -> Result<()> {
        if bytes > self.size {
            return Err(MemError::ReservationTooSmall {
                engine: self.engine,
                requested: bytes,
                reserved: self.size,
            });
        }
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.free();
    }
}
