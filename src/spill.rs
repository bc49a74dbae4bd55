//! Cooperative spilling: a per-engine controller that turns usage into actions with
//! hysteresis, and reclaimers the governor can call when it needs memory back.

use std::fmt;

use crate::EngineId;
use crate::error::{MemError, Result};
use crate::governor::MemoryGovernor;
use crate::pressure::ratio_ppm;
use crate::sync::{AtomicBool, Ordering};

/// When an engine should start and stop spilling, as fractions of its limit.
///
/// Defaults (from the original crate): begin at 90 %, restore at 75 %. Between the two the
/// controller keeps doing what it did, so an engine at the threshold does not flap.
///
/// ```
/// use nodedb_mem::SpillConfig;
/// let c = SpillConfig::default();
/// assert_eq!((c.begin, c.restore), (0.90, 0.75));
/// let bad = SpillConfig { begin: 0.7, restore: 0.8 };
/// assert_eq!(
///     bad.validate().unwrap_err().to_string(),
///     "invalid configuration `spill.restore` = 0.8: must be above 0 and below spill.begin (0.7)"
/// );
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpillConfig {
    /// Usage / limit at which spilling begins, in `(0, 1]`.
    pub begin: f64,
    /// Usage / limit below which spilling stops, in `(0, begin)`.
    pub restore: f64,
}

impl Default for SpillConfig {
    fn default() -> Self {
        SpillConfig {
            begin: 0.90,
            restore: 0.75,
        }
    }
}

impl SpillConfig {
    /// Checks `0 < restore < begin <= 1`; the error names the field.
    pub fn validate(&self) -> Result<()> {
        if !(self.begin > 0.0 && self.begin <= 1.0) {
            return Err(MemError::config(
                "spill.begin",
                self.begin,
                "must be above 0 and at most 1",
            ));
        }
        if !(self.restore > 0.0 && self.restore < self.begin) {
            return Err(MemError::config(
                "spill.restore",
                self.restore,
                format!("must be above 0 and below spill.begin ({})", self.begin),
            ));
        }
        Ok(())
    }
}

/// What an engine should do now, from [`SpillController::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpillAction {
    /// Below the begin threshold (or back under restore): carry on.
    None,
    /// Usage just crossed the begin threshold: start spilling. Freeing `bytes` brings usage
    /// down to the restore threshold.
    BeginSpill {
        /// Bytes to free to reach the restore threshold.
        bytes: u64,
    },
    /// Still above the restore threshold while spilling: keep spilling `bytes`.
    ContinueSpill {
        /// Bytes to free to reach the restore threshold.
        bytes: u64,
    },
    /// Usage fell below the restore threshold: stop spilling, work in memory again.
    Restore,
}

/// Turns one engine's usage into [`SpillAction`]s with hysteresis. O(1), lock-free,
/// allocation-free per poll; cheap to clone into every operator of the engine.
///
/// ```
/// use nodedb_mem::{EngineId, MemoryGovernor, SpillAction, SpillConfig};
///
/// let gov = MemoryGovernor::builder()
///     .global_ceiling(64 << 20)
///     .budget(EngineId::Query, 10u64 << 20)
///     .build()?;
/// let spill = gov.spill_controller(EngineId::Query, SpillConfig::default())?;
/// let r = gov.reserve(EngineId::Query, 9 << 20)?; // 90 %
/// assert_eq!(spill.poll(), SpillAction::BeginSpill { bytes: (9 << 20) - (75 << 20) / 10 });
/// drop(r);
/// assert_eq!(spill.poll(), SpillAction::Restore);
/// assert_eq!(spill.poll(), SpillAction::None);
/// # Ok::<(), nodedb_mem::MemError>(())
/// ```
pub struct SpillController {
    gov: MemoryGovernor,
    engine: EngineId,
    config: SpillConfig,
    begin_ppm: u64,
    restore_ppm: u64,
    spilling: AtomicBool,
}

impl fmt::Debug for SpillController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpillController")
            .field("engine", &self.engine)
            .field("config", &self.config)
            .field("spilling", &self.is_spilling())
            .finish()
    }
}

impl SpillController {
    pub(crate) fn new(
        gov: MemoryGovernor,
        engine: EngineId,
        config: SpillConfig,
    ) -> Result<SpillController> {
        config.validate()?;
        let ppm = |f: f64| (f * 1e6).round() as u64;
        Ok(SpillController {
            gov,
            engine,
            begin_ppm: ppm(config.begin),
            restore_ppm: ppm(config.restore),
            config,
            spilling: AtomicBool::new(false),
        })
    }

    /// The engine this controller watches.
    pub fn engine(&self) -> EngineId {
        self.engine
    }

    /// Whether the engine is in the spilling state.
    pub fn is_spilling(&self) -> bool {
        self.spilling.load(Ordering::Acquire)
    }

    /// The action for the engine's usage (live bytes, reservations and overflow) against its
    /// current limit. Concurrent pollers see exactly one `BeginSpill` and one `Restore` per
    /// episode.
    pub fn poll(&self) -> SpillAction {
        let b = self.gov.budget(self.engine);
        let usage = b.usage() + b.overflow_bytes();
        let limit = b.limit();
        let ratio = ratio_ppm(usage, limit);
        let restore_at =
            u64::try_from(u128::from(limit) * u128::from(self.restore_ppm) / 1_000_000)
                .unwrap_or(u64::MAX);
        let bytes = usage.saturating_sub(restore_at);
        if self.is_spilling() {
            if ratio < self.restore_ppm {
                if self
                    .spilling
                    .compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    return SpillAction::Restore;
                }
                return SpillAction::None;
            }
            return SpillAction::ContinueSpill { bytes };
        }
        if ratio >= self.begin_ppm {
            if self
                .spilling
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.gov
                    .inner
                    .ledger
                    .global
                    .spills_begun
                    .fetch_add(1, Ordering::Relaxed);
                return SpillAction::BeginSpill { bytes };
            }
            return SpillAction::ContinueSpill { bytes };
        }
        SpillAction::None
    }
}

impl MemoryGovernor {
    /// A spill controller for `engine` (see [`SpillController`]).
    pub fn spill_controller(
        &self,
        engine: EngineId,
        config: SpillConfig,
    ) -> Result<SpillController> {
        SpillController::new(self.clone(), engine, config)
    }
}
