//! A DataFusion [`MemoryPool`] backed by a nodedb-mem governor's engine budget.
//!
//! DataFusion's operators (hash aggregation, sorts, joins) ask their pool before they buffer,
//! and spill to disk when `try_grow` fails with `ResourcesExhausted`. [`GovernorPool`] answers
//! from the governor: a request is granted only if it fits what the engine (usually
//! [`EngineId::Query`]) has left under its budget and the global ceiling *right now* — usage
//! that includes the bytes the global allocator has already charged to the engine.
//!
//! No byte is counted twice: the governor's admission is a reservation taken and released at
//! once (nothing stays reserved in the governor for the operator's memory); the allocator's own
//! charge, when the operator really allocates, is what counts against the budget. The pool
//! keeps DataFusion's view of what its consumers reserved ([`MemoryPool::reserved`]) for
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use datafusion_common::{DataFusionError, Result};
use datafusion_execution::memory_pool::{MemoryLimit, MemoryPool, MemoryReservation};
use nodedb_mem::{EngineId, MemoryGovernor};

/// A [`MemoryPool`] whose `try_grow` asks a [`MemoryGovernor`] (see the crate docs).
pub struct GovernorPool {
    gov: MemoryGovernor,
    engine: EngineId,
    name: String,
    /// What DataFusion's consumers hold, by their own accounting.
    reserved: AtomicUsize,
    /// `try_grow` calls refused (each is a spill or an error in the operator).
    refusals: AtomicU64,
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
        }
    }

    /// The engine whose budget this pool spends.
    pub fn engine(&self) -> EngineId {
        self.engine
    }

    /// How many `try_grow` calls were refused.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }
}

impl MemoryPool for GovernorPool {
    fn name(&self) -> &str {
        &self.name
    }

    fn grow(&self, _reservation: &MemoryReservation, additional: usize) {
        self.reserved.fetch_add(additional, Ordering::AcqRel);
    }

    fn shrink(&self, _reservation: &MemoryReservation, shrink: usize) {
        // DataFusion shrinks only what it grew; a larger shrink would be its bug, and the pool
        // keeps its counter at zero rather than wrapping.
        let _ = self
            .reserved
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                Some(r.saturating_sub(shrink))
            });
    }

    fn try_grow(&self, reservation: &MemoryReservation, additional: usize) -> Result<()> {
        match self.gov.reserve(self.engine, additional as u64) {
            Ok(admitted) => {
                // Admission only: the allocator charges the memory when it is allocated.
                drop(admitted);
                self.reserved.fetch_add(additional, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                self.refusals.fetch_add(1, Ordering::Relaxed);
                Err(DataFusionError::ResourcesExhausted(format!(
                    "{} (consumer {}, holding {} bytes)",
                    e,
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
