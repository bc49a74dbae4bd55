//! A DataFusion [`MemoryPool`] backed by a nodedb-mem governor's engine budget.
//!
//! DataFusion's operators (hash aggregation, sorts, joins) ask their pool before they buffer,
//! and spill to disk when `try_grow` fails with `ResourcesExhausted`. [`GovernorPool`] answers
//! from the governor: a request is granted only if it fits what the engine (usually
//! [`EngineId::Query`]) has left under its budget and the global ceiling *right now* — usage
//! that includes the bytes the global allocator has already charged to the engine.
//!
//! No byte is counted twice: the governor's admission is only a question
//! ([`MemoryGovernor::check_admission`]: nothing is reserved in the governor for the operator's
//! memory, and nothing shows in the engine's usage or peak); the allocator's own charge, when
//! the operator really allocates, is what counts against the budget.
//!
//! **Grants not yet allocated count as a margin.** DataFusion's partitions ask together and
//! allocate after; each would be admitted against the same headroom. So the pool remembers
//! what it granted that the allocator has not charged yet (*outstanding*: grants, less the
//! growth of the engine's charged bytes since, less what consumers gave back), and admits a
//! request only if it fits together with the outstanding grants. The margin lives in the
//! pool, not in the governor's ledger, so it never shows as usage.
//!
//! DataFusion's own view counts too: where its consumers hold more than the engine's charged
//! bytes (a hash aggregation reserves headroom for the sort it would need to spill, before it
//! allocates it), the difference is granted memory not allocated yet, whichever is larger.
//!
//! **A margin for growth DataFusion makes before it asks.** Operators allocate first and ask
//! after: a hash aggregation doubles its table (the new one allocated beside the old, 68 MiB at
//! four million groups) and then asks for the difference. The pool admits a request only if
//! it also leaves a margin free: a quarter of the engine's limit by default
//! ([`GovernorPool::with_margin_percent`]), more if the engine has been seen holding more than
//! that past its limit (in its overflow region under an installed governor, or charged past
//! the limit otherwise; learned up to half the limit, [`GovernorPool::margin`]). Spillable
//! operators then spill that much earlier, and the next doubling lands within the limit
//! instead of in overflow. What the engine holds in overflow counts as usage while it lasts.
//! The margin is not reserved anywhere: the allocator's charges use it freely. It applies to
//! consumers that hold a share of the limit already (a thirty-second, at least 1 MiB but at
//! most an eighth of the limit: they can spill to make room); one that holds less is admitted against the budget and the pool's
//! outstanding grants alone, since refusing it would fail its query — an aggregation that has
//! just spilled re-reserves its small state and fails if refused (DataFusion's
//! `FairSpillPool` gives every spillable consumer a share for the same reason). Refused even
//! so (the engine at its limit by real usage), it is granted anyway while what it holds stays
//! under that share, counted in [`GovernorPool::overdrafts`].
//!
//! **Consumers that cannot spill get what DataFusion's own pool would give them.** A sort's
//! merge of its spill files, or any consumer registered without `with_can_spill(true)`, fails
//! the query when refused, where a spillable one spills. The governor counts real memory, so
//! the budget alone leaves such a consumer less than DataFusion's `FairSpillPool` at the same
//! limit would (a `row_number() OVER (PARTITION BY … ORDER BY …)` over 2 M rows failed at a
//! 32 MiB budget that way). The pool grants them, as `FairSpillPool` does, while what
//! unspillable consumers hold stays within the engine's limit, even where the budget's
//! headroom is taken by real usage ([`GovernorPool::overdrafts`] counts those grants); the
//! governor's allocator still never lets the engine's ledger pass its limit and places what
//! they allocate beyond it in the engine's overflow region.
//!
//! `RepartitionExec` is treated the same way, though it registers as spillable: its spill path
//! (a refused batch written to a spill pool its reader then waits on) can stop a query for good
//! when two input tasks spill at once — every worker waits and nothing wakes them
//! (apache/datafusion#24883; seen here with DataFusion 55.2, a GROUP BY on two partitions that
//! never finished). Its reservations only cover batches in flight between partitions.
//!
//! The pool keeps DataFusion's view of what its consumers reserved ([`MemoryPool::reserved`]) for
//! DataFusion's own bookkeeping and reports.
//!
//! ```
//! use std::sync::Arc;
//! use datafusion_execution::memory_pool::{MemoryConsumer, MemoryPool};
//! use nodedb_mem::{EngineId, MemoryGovernor};
//! use nodedb_mem_datafusion::GovernorPool;
//!
//! let gov = MemoryGovernor::builder()
//!     .global_ceiling(1 << 30)
//!     .budget(EngineId::Query, 64u64 << 20)
//!     .build()?;
//! let pool: Arc<dyn MemoryPool> = Arc::new(GovernorPool::new(gov, EngineId::Query));
//! let r = MemoryConsumer::new("GroupedHashAggregateStream").with_can_spill(true).register(&pool);
//! assert!(r.try_grow(32 << 20).is_ok());
//! let err = r.try_grow(128 << 20).unwrap_err();
//! assert!(err.to_string().contains("cannot reserve 128 MiB for engine query"));
//! # Ok::<(), nodedb_mem::MemError>(())
//! ```

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use datafusion_common::{DataFusionError, Result};
use datafusion_execution::memory_pool::{MemoryLimit, MemoryPool, MemoryReservation};
use nodedb_mem::{EngineId, MemoryGovernor};

/// The share of the engine's limit kept free beside grants unless configured otherwise.
const DEFAULT_MARGIN_PERCENT: u8 = 25;

/// A [`MemoryPool`] whose `try_grow` asks a [`MemoryGovernor`] (see the crate docs).
pub struct GovernorPool {
    gov: MemoryGovernor,
    engine: EngineId,
    name: String,
    /// What DataFusion's consumers hold, by their own accounting.
    reserved: AtomicUsize,
    /// `try_grow` calls refused (each is a spill or an error in the operator).
    refusals: AtomicU64,
    /// Grants to consumers that cannot spill which the engine's budget alone would have
    /// refused.
    overdrafts: AtomicU64,
    /// The margin kept free before anything is learned, in percent of the engine's limit.
    margin_percent: u8,
    /// Grants not yet charged by the allocator, and the engine's charged bytes when that was
    /// last brought up to date.
    margin: Mutex<Margin>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Margin {
    outstanding: u64,
    last_used: u64,
    /// The largest excess over the engine's limit seen so far (at most half of it).
    learned: u64,
    /// What consumers that cannot spill hold, by DataFusion's accounting.
    unspillable: u64,
}

impl Margin {
    /// Retires outstanding grants by what the allocator charged since the last look.
    fn catch_up(&mut self, used: u64) {
        let growth = used.saturating_sub(self.last_used);
        self.outstanding -= growth.min(self.outstanding);
        self.last_used = used;
    }

    /// Learns from what the engine holds past its limit right now.
    fn learn(&mut self, excess: u64, limit: u64) {
        self.learned = self.learned.max(excess.min(limit / 2));
    }
}

/// The engine's figures a pool call looks at.
#[derive(Debug, Clone, Copy)]
struct Engine {
    used: u64,
    overflow: u64,
    limit: u64,
}

impl fmt::Debug for GovernorPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GovernorPool")
            .field("engine", &self.engine)
            .field("reserved", &self.reserved())
            .field("refusals", &self.refusals())
            .finish()
    }
}

impl fmt::Display for GovernorPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} engine budget)", self.name, self.engine)
    }
}

impl GovernorPool {
    /// A pool granting memory out of `engine`'s budget in `gov`.
    pub fn new(gov: MemoryGovernor, engine: EngineId) -> GovernorPool {
        GovernorPool {
            gov,
            engine,
            name: "nodedb-mem governor pool".to_owned(),
            reserved: AtomicUsize::new(0),
            refusals: AtomicU64::new(0),
            overdrafts: AtomicU64::new(0),
            margin_percent: DEFAULT_MARGIN_PERCENT,
            margin: Mutex::new(Margin::default()),
        }
    }

    /// Keeps `percent` of the engine's limit free beside every grant to a spillable consumer
    /// (default 25; see the crate docs), at most 50. A margin learned from the engine's excess
    /// over its limit can still raise it, up to half the limit.
    ///
    /// ```
    /// use nodedb_mem::{EngineId, MemoryGovernor};
    /// use nodedb_mem_datafusion::GovernorPool;
    ///
    /// let gov = MemoryGovernor::builder().global_ceiling(1 << 30).build()?;
    /// let pool = GovernorPool::new(gov.clone(), EngineId::Query).with_margin_percent(10)?;
    /// let err = GovernorPool::new(gov, EngineId::Query).with_margin_percent(60).unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "invalid configuration `margin_percent` = 60: at most 50 (the margin is part of \
    ///      the limit; a larger one would leave spillable operators less than it keeps free)"
    /// );
    /// # Ok::<(), nodedb_mem::MemError>(())
    /// ```
    pub fn with_margin_percent(mut self, percent: u8) -> nodedb_mem::Result<GovernorPool> {
        if percent > 50 {
            return Err(nodedb_mem::MemError::InvalidConfig {
                field: "margin_percent".into(),
                value: percent.to_string(),
                reason: "at most 50 (the margin is part of the limit; a larger one would leave \
                         spillable operators less than it keeps free)"
                    .into(),
            });
        }
        self.margin_percent = percent;
        Ok(self)
    }

    /// The engine whose budget this pool spends.
    pub fn engine(&self) -> EngineId {
        self.engine
    }

    /// How many `try_grow` calls were refused.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// How many grants went to consumers that cannot spill past what the engine's budget had
    /// room for (see the crate docs: the allocator puts what they allocate past the limit in
    /// the engine's overflow region).
    pub fn overdrafts(&self) -> u64 {
        self.overdrafts.load(Ordering::Relaxed)
    }

    /// Granted bytes the allocator has not charged yet (the margin later requests must fit
    /// beside), as of the pool's last call.
    pub fn outstanding(&self) -> u64 {
        self.margin_state().outstanding
    }

    /// The margin kept free for growth that operators make before they ask, as of the pool's
    /// last call: the configured share of the engine's limit, or the largest excess over the
    /// limit seen so far (at most half the limit) where that is larger. See the crate docs.
    pub fn margin(&self) -> u64 {
        let learned = self.margin_state().learned;
        self.margin_for(learned, self.gov.limit(self.engine))
    }

    fn margin_for(&self, learned: u64, limit: u64) -> u64 {
        // At most half of a u64: the product fits u128, the quotient u64.
        let share = u128::from(limit) * u128::from(self.margin_percent) / 100;
        learned.max(u64::try_from(share).unwrap_or(limit))
    }

    /// Reads the engine's figures and brings the margin up to date with them.
    fn look(&self, m: &mut Margin) -> Engine {
        let b = self.gov.budget(self.engine);
        let e = Engine {
            used: b.used(),
            overflow: b.overflow_bytes(),
            limit: b.limit(),
        };
        m.catch_up(e.used);
        m.learn(
            e.overflow
                .max((e.used + e.overflow).saturating_sub(e.limit)),
            e.limit,
        );
        e
    }

    fn margin_state(&self) -> std::sync::MutexGuard<'_, Margin> {
        self.margin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Whether a spillable consumer holding `held` bytes holds enough to make room by spilling
/// (a thirty-second of the engine's limit, at least 1 MiB but never more than an eighth of
/// the limit) and so is held to the margin. The bound by the limit matters at small limits:
/// with a flat 1 MiB, a sort under a 128 KiB limit was granted 959 overdrafts up to 8× the
/// limit before it spilled, and its merge then found the limit used up.
fn holds_enough(held: u64, limit: u64) -> bool {
    held >= (limit / 32).max((1 << 20).min(limit / 8))
}

/// Whether the pool treats `reservation`'s consumer as one that spills when refused: not a
/// `RepartitionExec`, whose spill path can hang a query (see the crate docs).
fn spills(reservation: &MemoryReservation) -> bool {
    let consumer = reservation.consumer();
    consumer.can_spill() && !consumer.name().starts_with("RepartitionExec")
}

/// What a request did not fit beside, in words: the parts that are not zero.
fn beside_text(outstanding: u64, overflow: u64, margin: u64) -> String {
    let parts = [
        (outstanding, "granted and not allocated yet"),
        (overflow, "the engine holds in its overflow region"),
        (
            margin,
            "of margin for growth operators make before they ask",
        ),
    ];
    let said: Vec<String> = parts
        .iter()
        .filter(|(bytes, _)| *bytes > 0)
        .map(|(bytes, what)| format!("{} {what}", nodedb_mem::ByteSize(*bytes)))
        .collect();
    match said.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

impl MemoryPool for GovernorPool {
    fn name(&self) -> &str {
        &self.name
    }

    fn grow(&self, reservation: &MemoryReservation, additional: usize) {
        if !spills(reservation) {
            self.margin_state().unspillable += additional as u64;
        }
        self.reserved.fetch_add(additional, Ordering::AcqRel);
    }

    fn shrink(&self, reservation: &MemoryReservation, shrink: usize) {
        {
            let mut m = self.margin_state();
            self.look(&mut m);
            m.outstanding -= (shrink as u64).min(m.outstanding);
            if !spills(reservation) {
                m.unspillable -= (shrink as u64).min(m.unspillable);
            }
        }
        // DataFusion shrinks only what it grew; a larger shrink would be its bug, and the pool
        // keeps its counter at zero rather than wrapping.
        let _ = self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                Some(r.saturating_sub(shrink))
            });
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        let mut m = self.margin_state();
        let e = self.look(&mut m);
        let wanted = additional as u64;
        // Admission for this request beside the grants not yet allocated, asked without
        // holding anything (the allocator charges the memory when it is allocated), under the
        // pool's lock so concurrent askers see each other's grants. A spillable consumer that
        // already holds a share of the limit (it can spill to make room) is held to more: the
        // grants counted by DataFusion's view where that is larger, what the engine holds in
        // overflow, and the margin for growth operators make before they ask. One that holds
        // little cannot make room by spilling and would fail its query if refused (an
        // aggregation re-reserving its small state right after a spill, or merging its spill
        // files); like `FairSpillPool`'s share for every spillable consumer, it is spared
        // those.
        let unspillable = !spills(reservation);
        let strict = !unspillable && holds_enough(reservation.size() as u64, e.limit);
        let (pending, overflow, margin) = if strict {
            (
                m.outstanding
                    .max((self.reserved() as u64).saturating_sub(e.used)),
                e.overflow,
                self.margin_for(m.learned, e.limit),
            )
        } else {
            (m.outstanding, 0, 0)
        };
        let beside = pending + overflow + margin;
        let refused = match self.gov.check_admission(self.engine, wanted + beside) {
            Ok(()) => None,
            Err(e) if beside == 0 => Some(e.to_string()),
            // Refused with what lies beside it: say so in terms of this request.
            Err(_) => match self.gov.check_admission(self.engine, wanted) {
                Ok(()) => Some(format!(
                    "cannot admit {} for engine {}: it fits the engine's budget alone, but \
                     not beside {}",
                    nodedb_mem::ByteSize(wanted),
                    self.engine,
                    beside_text(pending, overflow, margin)
                )),
                Err(e) => Some(e.to_string()),
            },
        };
        // A consumer that cannot spill (a sort's merge, a read-back after spilling) fails
        // the query when refused, where a spillable one would spill. As DataFusion's own
        // `FairSpillPool` does, grant it as long as what such consumers hold stays within the
        // engine's limit; the governor's allocator keeps the engine's ledger under the limit
        // anyway and places what it allocates beyond in the engine's overflow region.
        // A spillable consumer that holds little has nothing to spill that would make room
        // either (an aggregation re-reserving its small state right after spilling, which
        // fails its query if refused): it is granted while what it holds stays under the
        // share that would make it strict.
        let held = reservation.size() as u64;
        let small = !unspillable && !holds_enough(held + wanted, e.limit);
        let refused = match refused {
            Some(_) if unspillable && m.unspillable + wanted <= e.limit => {
                self.overdrafts.fetch_add(1, Ordering::Relaxed);
                None
            }
            Some(_) if small => {
                self.overdrafts.fetch_add(1, Ordering::Relaxed);
                None
            }
            other => other,
        };
        match refused {
            None => {
                m.outstanding += wanted;
                if unspillable {
                    m.unspillable += wanted;
                }
                self.reserved.fetch_add(additional, Ordering::AcqRel);
                Ok(())
            }
            Some(why) => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                Err(DataFusionError::ResourcesExhausted(format!(
                    "{why} (consumer {}, holding {} bytes)",
                    reservation.consumer().name(),
                    reservation.size()
                )))
            }
        }
    }

    fn reserved(&self) -> usize {
        self.reserved.load(Ordering::Acquire)
    }

    fn memory_limit(&self) -> MemoryLimit {
        MemoryLimit::Finite(usize::try_from(self.gov.limit(self.engine)).unwrap_or(usize::MAX))
    }
}
