//! Moving the ceiling while the governor runs: [`MemoryGovernor::set_ceiling`], and following
//! the cgroup's memory limit from the background thread.
//!
//! # Rules
//!
//! * Budgets, caps and the RSS margin are shares of the ceiling: when it moves, each becomes
//!   its configured value scaled by `new ceiling / configured ceiling`, and every engine's
//!   limit returns to its (scaled) budget, as if the governor had been built with the new
//!   ceiling (rebalancing lends again from there). Floors stay as configured where they fit
//!   under the new budget; where not, they are lowered to it (`floors_squeezed`): the engines
//!   are then at their floors, which is the most the ceiling allows.
//! * The sum of the limits stays at most the ceiling at every instant: a lower ceiling is
//!   stored after the limits are lowered, a higher one before they are raised (both under the
//!   rebalancing lock).
//! * After a lowered ceiling, engines above their new limit are asked to reclaim (the
//!   rebalancing step), pressure rises at once (spill controllers see it at their next poll),
//!   an installed governor purges dirty pages and pages overflow out when resident memory is
//!   near the new ceiling, and waiting requests larger than a new limit are refused. The
//!   time until usage is under the new ceiling is recorded ([`EventKind::UnderCeiling`]).
//!   Nothing already allocated is lost: usage above a limit stays charged, and new memory is
//!   refused or rerouted to overflow until it falls.
//! * A ceiling from the cgroup follows its limit: the tightest `memory.max` or, lower,
//!   `memory.high` on the cgroup's path (v1 `memory.limit_in_bytes`), less the cgroup margin.
//!   A limit that cannot be read (the cgroup vanished, a file being rewritten, garbage) keeps
//!   the last good ceiling, with one warning until it reads again; a limit lifted (`max`)
//!   gives the ceiling [`DEFAULT_RAM_FRACTION`](crate::DEFAULT_RAM_FRACTION) of physical
//!   memory, and a limit set later on a cgroup that had none (the ceiling came from physical
//!   memory) is followed as well. An explicit ceiling (builder or `NODEDB_MEMORY_LIMIT`) never follows, but a
//!   cgroup limit below it is reported ([`EventKind::CgroupBelowCeiling`]).

use std::time::Instant;

use crate::EngineId;
use crate::ceiling::CeilingSource;
use crate::config::{EngineLimits, MAX_CEILING, MIN_CEILING, cgroup_ceiling};
use crate::error::{MemError, Result};
use crate::events::{CeilingCause, EventKind};
use crate::governor::MemoryGovernor;
use crate::ledger::Ledger;
use crate::pressure::PressureLevel;
use crate::size::{ByteSize, Size, fraction_of};
use crate::sync::{Ordering, lock};

/// The cgroup's memory stall time (PSI, share of the last 10 s) at which the kernel's pressure
/// level is at least warning: some task stalled on memory 10 % of the time.
pub const PSI_SOME_WARNING: f64 = 10.0;
/// ... critical: some task stalled 30 % of the time, or all tasks at once 10 %.
pub const PSI_SOME_CRITICAL: f64 = 30.0;
/// ... critical: all non-idle tasks stalled at once this share of the time.
pub const PSI_FULL_CRITICAL: f64 = 10.0;
/// ... emergency: all non-idle tasks stalled at once 30 % of the time.
pub const PSI_FULL_EMERGENCY: f64 = 30.0;

/// The pressure level the cgroup's stall time says (see the `PSI_*` thresholds).
pub(crate) fn kernel_level(p: &crate::MemoryPressure) -> PressureLevel {
    let (some, full) = (p.some.avg10, p.full.avg10);
    if full >= PSI_FULL_EMERGENCY {
        PressureLevel::Emergency
    } else if full >= PSI_FULL_CRITICAL || some >= PSI_SOME_CRITICAL {
        PressureLevel::Critical
    } else if some >= PSI_SOME_WARNING {
        PressureLevel::Warning
    } else {
        PressureLevel::Normal
    }
}

/// What the budgets were built from.
pub(crate) struct Configured {
    pub(crate) ceiling: u64,
    pub(crate) limits: [EngineLimits; EngineId::COUNT],
    pub(crate) rss_margin: u64,
    pub(crate) cgroup_margin: Size,
    /// Whether the ceiling follows the cgroup's limit: it came from the cgroup, or from
    /// physical memory for want of a limit (not from the builder or the environment).
    pub(crate) follows_cgroup: bool,
    /// Physical memory, for a cgroup limit that is lifted.
    pub(crate) physical: Option<u64>,
}

/// The state of following the cgroup and of a lowered ceiling.
#[derive(Default)]
pub(crate) struct Following {
    /// Ceiling changes so far.
    pub(crate) changes: u64,
    /// Since when usage has been above a lowered ceiling, that ceiling, and the refusals and
    /// spills counted at the change.
    over_since: Option<(Instant, u64, u64, u64)>,
    /// The cgroup limit last reported below an explicit ceiling.
    reported_below: Option<u64>,
    /// Whether the cgroup's limit could not be read at the last look (warned once).
    unreadable: bool,
    /// The cgroup's own limit files at the last look (see `Cgroup::own_limits`).
    own_seen: Option<[Option<u64>; 2]>,
}

/// What [`MemoryGovernor::set_ceiling`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CeilingChange {
    /// The ceiling before.
    pub from: u64,
    /// The ceiling now.
    pub to: u64,
    /// Every engine's limit now (its scaled budget), in [`EngineId::ALL`] order.
    pub limits: [u64; EngineId::COUNT],
    /// Whether the engines' floors did not fit and were lowered to their budgets.
    pub floors_squeezed: bool,
    /// Global usage still above the new ceiling once the engines were asked to give back (0
    /// when under it): the caller may spill or shed load until it is gone.
    pub over: u64,
}

impl MemoryGovernor {
    /// Moves the global ceiling to `bytes` while the governor runs, for a host that learns of
    /// a new memory limit itself (an orchestrator's API, say) — the governor follows a cgroup
    /// limit on its own. Budgets, caps and the RSS margin move in proportion, limits return to
    /// the new budgets, floors are kept where they fit; after a lowered ceiling, engines above
    /// their limit are asked to reclaim, pressure rises, and (installed) dirty pages are
    /// purged and overflow paged out near the ceiling. Recorded as an
    /// [`EventKind::CeilingChanged`] event; the time until usage is under a lowered ceiling
    /// as [`EventKind::UnderCeiling`]. Refused with [`MemError::InvalidConfig`] outside
    /// [`MIN_CEILING`](crate::MIN_CEILING)..=[`MAX_CEILING`](crate::MAX_CEILING).
    ///
    /// ```
    /// use nodedb_mem::{EngineId, MemoryGovernor, PressureLevel};
    ///
    /// let gov = MemoryGovernor::builder()
    ///     .global_ceiling(100 << 20)
    ///     .overhead_reserve(0.0)
    ///     .budget(EngineId::Query, 40u64 << 20)
    ///     .build()?;
    /// let held = gov.reserve(EngineId::Query, 30 << 20)?;
    /// let change = gov.set_ceiling(50 << 20)?;
    /// assert_eq!((change.from, change.to), (100 << 20, 50 << 20));
    /// assert_eq!(gov.limit(EngineId::Query), 20 << 20);
    /// // Nothing is lost: the 30 MiB stay, above the new limit, and new memory is refused.
    /// assert_eq!(gov.usage(EngineId::Query), 30 << 20);
    /// assert_eq!(gov.pressure(EngineId::Query), PressureLevel::Emergency);
    /// assert!(gov.reserve(EngineId::Query, 1).is_err());
    /// drop(held);
    /// gov.set_ceiling(100 << 20)?;
    /// assert_eq!(gov.limit(EngineId::Query), 40 << 20);
    /// # Ok::<(), nodedb_mem::MemError>(())
    /// ```
    pub fn set_ceiling(&self, bytes: u64) -> Result<CeilingChange> {
        self.move_ceiling(bytes, CeilingCause::Set)
    }

    pub(crate) fn move_ceiling(&self, bytes: u64, cause: CeilingCause) -> Result<CeilingChange> {
        if !(MIN_CEILING..=MAX_CEILING).contains(&bytes) {
            return Err(MemError::config(
                "ceiling",
                ByteSize(bytes),
                format!(
                    "must be between {} and {}",
                    ByteSize(MIN_CEILING),
                    ByteSize(MAX_CEILING)
                ),
            ));
        }
        let started = Instant::now();
        let inner = &*self.inner;
        let counts_at_change = self.refusals_and_spills();
        let cfg = &inner.configured;
        let scale = |v: u64| {
            u64::try_from(u128::from(v) * u128::from(bytes) / u128::from(cfg.ceiling))
                .unwrap_or(u64::MAX)
        };
        let (from, floors_squeezed, limits) = {
            let _serial = lock(&inner.rebalance_lock);
            let g = &inner.ledger.global;
            let from = g.ceiling();
            if from == bytes {
                let limits = EngineId::ALL.map(|e| self.budget(e).limit());
                return Ok(CeilingChange {
                    from,
                    to: bytes,
                    limits,
                    floors_squeezed: false,
                    over: self.global_usage().saturating_sub(bytes),
                });
            }
            // The limits never sum above the ceiling: a higher ceiling first, a lower last.
            if bytes > from {
                g.set_ceiling(bytes);
            }
            let mut squeezed = false;
            let mut limits = [0; EngineId::COUNT];
            for e in EngineId::ALL {
                let l = cfg.limits[e.index()];
                let base = scale(l.base);
                let floor = l.floor.min(base);
                squeezed |= floor < l.floor;
                self.budget(e)
                    .reset_for_ceiling(base, floor, scale(l.cap).max(base));
                limits[e.index()] = base;
            }
            if bytes < from {
                g.set_ceiling(bytes);
            }
            inner
                .rss_margin
                .store(scale(cfg.rss_margin).clamp(1, bytes - 1), Ordering::Release);
            (from, squeezed, limits)
        };
        self.publish_limits();
        #[cfg(not(nodedb_mem_loom))]
        if self.is_installed()
            && nodedb_mem_alloc::ctl::overflow::overflow_region(EngineId::Vector).is_some()
        {
            let margin = self.rss_margin();
            nodedb_mem_alloc::ctl::overflow::set_resident_target(Some(bytes - margin), margin / 4);
        }
        inner.ledger.events.record(EventKind::CeilingChanged {
            from,
            to: bytes,
            cause,
            usage: self.global_usage(),
            floors_squeezed,
        });
        // Engines above their new limit are asked to reclaim; pressure is refreshed.
        self.rebalance();
        #[cfg(not(nodedb_mem_loom))]
        if self.is_installed() {
            // Purges and pages out overflow when resident memory is near the new ceiling.
            // Without /proc there is nothing to sample; the budgets hold regardless.
            let _ = self.check_resident();
        }
        // Raised: waiting requests may fit. Lowered: those larger than a limit are refused.
        Ledger::wake_waiters(&inner.ledger);
        let over = self.global_usage().saturating_sub(bytes);
        {
            let mut f = lock(&inner.following);
            f.changes += 1;
            if bytes < from {
                let (r, s) = counts_at_change;
                f.over_since = (over > 0).then_some((started, bytes, r, s));
            }
        }
        if bytes < from && over == 0 {
            let (r, s) = self.refusals_and_spills();
            inner.ledger.events.record(EventKind::UnderCeiling {
                ceiling: bytes,
                after: started.elapsed(),
                refusals: r - counts_at_change.0,
                spills: s - counts_at_change.1,
            });
        }
        Ok(CeilingChange {
            from,
            to: bytes,
            limits,
            floors_squeezed,
            over,
        })
    }

    /// Refusals by engines' limits or the ceiling, and spill episodes begun, so far.
    fn refusals_and_spills(&self) -> (u64, u64) {
        let refusals = EngineId::ALL
            .iter()
            .map(|&e| self.budget(e).rejections())
            .sum();
        let spills = self
            .inner
            .ledger
            .global
            .spills_begun
            .load(Ordering::Relaxed);
        (refusals, spills)
    }

    /// Records when usage came under a lowered ceiling (called by every rebalancing step).
    pub(crate) fn note_under_ceiling(&self) {
        let inner = &*self.inner;
        let done = {
            let mut f = lock(&inner.following);
            match f.over_since {
                Some((since, ceiling, r, s)) if self.global_usage() <= ceiling => {
                    f.over_since = None;
                    Some((since, ceiling, r, s))
                }
                _ => None,
            }
        };
        if let Some((since, ceiling, r0, s0)) = done {
            let (r, s) = self.refusals_and_spills();
            inner.ledger.events.record(EventKind::UnderCeiling {
                ceiling,
                after: since.elapsed(),
                refusals: r - r0,
                spills: s - s0,
            });
        }
    }

    /// Reads the cgroup's memory stall time (`memory.pressure`, cgroup v2) and makes the
    /// level it says (see [`PSI_SOME_WARNING`] and the thresholds after it) the floor of
    /// [`global_pressure`](Self::global_pressure) until the next sample: when the kernel's
    /// tasks stall on memory, the engines are told to spill and give back before the ceiling
    /// is reached. Returns that level (`None` without a cgroup's stall time, which leaves the
    /// floor at `Normal`). Clean page cache evicted by the kernel stalls nobody, so a scan
    /// does not raise it; the counts of `memory.events` are figures only for the same reason
    /// (the kernel hits `memory.max` evicting clean cache). The background thread calls this
    /// once a second, and on every tick while global pressure is at `Warning` or above.
    pub fn sample_cgroup_pressure(&self) -> Option<PressureLevel> {
        let g = &self.inner.ledger.global;
        let level = self
            .inner
            .cgroup
            .as_ref()
            .and_then(|c| c.pressure())
            .map(|p| kernel_level(&p));
        g.kernel_level.store(
            level.unwrap_or(PressureLevel::Normal) as u8,
            Ordering::Release,
        );
        self.global_pressure();
        level
    }

    /// How many times the ceiling moved ([`set_ceiling`](Self::set_ceiling) or following the
    /// cgroup).
    pub fn ceiling_changes(&self) -> u64 {
        lock(&self.inner.following).changes
    }

    /// The kernel's pressure level at the last sample (see
    /// [`sample_cgroup_pressure`](Self::sample_cgroup_pressure)).
    pub fn kernel_pressure(&self) -> PressureLevel {
        PressureLevel::from_u8(
            self.inner
                .ledger
                .global
                .kernel_level
                .load(Ordering::Acquire),
        )
    }

    /// [`follow_cgroup`](Self::follow_cgroup) for the background thread: the cgroup's own
    /// limit files are read on every tick, and the limits of its ancestors (a walk up the
    /// hierarchy, a file per level) only when `walk` is set or the own files changed. A
    /// container resized in place has its own cgroup's limit moved (Kubernetes lowers the
    /// container's before the pod's), so that is followed within one tick; a limit moved on an
    /// ancestor only, within one walk.
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models run no background thread")
    )]
    pub(crate) fn follow_cgroup_tick(&self, walk: bool) -> Option<CeilingChange> {
        let own = self.inner.cgroup.as_ref()?.own_limits();
        let changed = lock(&self.inner.following).own_seen.replace(own) != Some(own);
        if walk || changed {
            self.follow_cgroup()
        } else {
            None
        }
    }

    /// Reads the cgroup's limit and moves the ceiling to follow it (see the module's rules);
    /// the background thread calls this whenever the cgroup's own limit files change (it
    /// reads them on every tick) and every 5 s for the ancestors' limits. Returns the change, if there was one.
    pub fn follow_cgroup(&self) -> Option<CeilingChange> {
        let inner = &*self.inner;
        let cg = inner.cgroup.as_ref()?;
        let cfg = &inner.configured;
        let read = cg.limit();
        if !cfg.follows_cgroup {
            let below = match read {
                Ok(Some(l)) if l.bytes < self.ceiling() => Some(l.bytes),
                _ => None,
            };
            let news = {
                let mut f = lock(&inner.following);
                let news = below.is_some() && f.reported_below != below;
                f.reported_below = below;
                news
            };
            if let (true, Some(limit)) = (news, below) {
                inner.ledger.events.record(EventKind::CgroupBelowCeiling {
                    limit,
                    ceiling: self.ceiling(),
                });
            }
            return None;
        }
        let limit = match read {
            Err(why) => {
                let first = !std::mem::replace(&mut lock(&inner.following).unreadable, true);
                if first {
                    tracing::warn!(
                        target: "nodedb_mem",
                        error = %why,
                        ceiling = self.ceiling(),
                        "the cgroup's memory limit cannot be read; the ceiling stays"
                    );
                }
                return None;
            }
            Ok(limit) => limit,
        };
        lock(&inner.following).unreadable = false;
        let (target, cause, source) = match limit {
            Some(l) => {
                let target = cgroup_ceiling(l.bytes, cfg.cgroup_margin)?;
                let cause = if l.high {
                    CeilingCause::CgroupHigh
                } else {
                    CeilingCause::CgroupMax
                };
                let source = CeilingSource::Cgroup {
                    path: l.file,
                    limit: l.bytes,
                };
                (target, cause, source)
            }
            // Lifted: as if there had been none when the governor was built.
            None => {
                let total = cfg.physical?;
                let target = fraction_of(total, crate::DEFAULT_RAM_FRACTION);
                (
                    target,
                    CeilingCause::CgroupMax,
                    CeilingSource::PhysicalMemory { total },
                )
            }
        };
        let target = target.clamp(MIN_CEILING, MAX_CEILING);
        *lock(&inner.ceiling_source) = source;
        if target == self.ceiling() {
            return None;
        }
        self.move_ceiling(target, cause).ok()
    }
}
