//! The reclaimer registry: what each engine can free when the governor needs memory back.

use std::fmt;

use crate::EngineId;
use crate::events::{EventKind, EventLog};
use crate::sync::{Arc, AtomicU64, Mutex, Ordering, lock};

/// Something an engine can free on request: caches, buffered data that can be flushed,
/// operator state that can spill. Register it with
/// [`MemoryGovernor::register_reclaimer`](crate::MemoryGovernor::register_reclaimer); the
/// governor calls it when it needs memory back (an engine over its limit after a rebalancing
/// step, or the process at critical pressure).
///
/// Both methods are called from the governor's threads (the rebalancer), never from the
/// allocator: they may allocate, lock and take their time. A reclaimer that panics is caught,
/// reported (an [`EventKind::CallbackPanicked`] event, a `tracing` error with the message, the
/// [`Snapshot::callback_panics`](crate::Snapshot::callback_panics) counter) and unregistered,
/// since its state can no longer be trusted; the governor and its background thread go on.
pub trait Reclaimer: Send + Sync {
    /// Bytes this reclaimer could free now.
    fn reclaimable(&self) -> u64;
    /// Frees up to `bytes` (more is fine); returns how many it freed.
    fn reclaim(&self, bytes: u64) -> u64;
}

struct Registered {
    id: u64,
    engine: EngineId,
    reclaimer: std::sync::Arc<dyn Reclaimer>,
}

struct Registry {
    list: Mutex<Vec<Registered>>,
    next: AtomicU64,
}

/// Every registered reclaimer, by engine.
pub(crate) struct Reclaimers {
    registry: Arc<Registry>,
}

impl Reclaimers {
    pub(crate) fn new() -> Reclaimers {
        Reclaimers {
            registry: Arc::new(Registry {
                list: Mutex::new(Vec::new()),
                next: AtomicU64::new(0),
            }),
        }
    }

    pub(crate) fn register(
        &self,
        engine: EngineId,
        reclaimer: std::sync::Arc<dyn Reclaimer>,
    ) -> ReclaimerHandle {
        let id = self.registry.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.registry.list).push(Registered {
            id,
            engine,
            reclaimer,
        });
        ReclaimerHandle {
            registry: Arc::clone(&self.registry),
            id,
        }
    }

    /// What `engine`'s reclaimers say they could free now.
    pub(crate) fn reclaimable(
        &self,
        engine: EngineId,
        events: &EventLog,
        panics: &AtomicU64,
    ) -> u64 {
        self.of(engine)
            .iter()
            .map(|(id, r)| {
                self.guarded(engine, *id, "reclaimable", events, panics, || {
                    r.reclaimable()
                })
            })
            .fold(0, u64::saturating_add)
    }

    /// Calls `f` on reclaimer `id`; if it panics, unregisters it, reports the panic and
    /// returns 0.
    fn guarded(
        &self,
        engine: EngineId,
        id: u64,
        what: &'static str,
        events: &EventLog,
        panics: &AtomicU64,
        f: impl FnOnce() -> u64,
    ) -> u64 {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(n) => n,
            Err(payload) => {
                lock(&self.registry.list).retain(|r| r.id != id);
                panics.fetch_add(1, Ordering::Relaxed);
                events.record_panic(Some(engine), what, &*payload);
                0
            }
        }
    }

    /// Asks `engine`'s reclaimers, the one with most to give first, to free `bytes`; returns
    /// what they report freed (recorded in `events`).
    pub(crate) fn reclaim(
        &self,
        engine: EngineId,
        bytes: u64,
        events: &EventLog,
        panics: &AtomicU64,
    ) -> u64 {
        if bytes == 0 {
            return 0;
        }
        let mut reclaimers: Vec<(u64, u64, std::sync::Arc<dyn Reclaimer>)> = self
            .of(engine)
            .into_iter()
            .map(|(id, r)| {
                let n = self.guarded(engine, id, "reclaimable", events, panics, || {
                    r.reclaimable()
                });
                (n, id, r)
            })
            .filter(|(n, _, _)| *n > 0)
            .collect();
        if reclaimers.is_empty() {
            return 0;
        }
        reclaimers.sort_by_key(|(n, _, _)| std::cmp::Reverse(*n));
        let mut freed = 0u64;
        for (_, id, r) in reclaimers {
            if freed >= bytes {
                break;
            }
            let want = bytes - freed;
            let got = self.guarded(engine, id, "reclaim", events, panics, || r.reclaim(want));
            freed = freed.saturating_add(got);
        }
        events.record(EventKind::Reclaim {
            engine,
            requested: bytes,
            freed,
        });
        freed
    }

    /// The engine's reclaimers, cloned out so none is called under the registry's lock.
    fn of(&self, engine: EngineId) -> Vec<(u64, std::sync::Arc<dyn Reclaimer>)> {
        lock(&self.registry.list)
            .iter()
            .filter(|r| r.engine == engine)
            .map(|r| (r.id, std::sync::Arc::clone(&r.reclaimer)))
            .collect()
    }
}

/// Keeps a reclaimer registered; dropping it unregisters the reclaimer.
pub struct ReclaimerHandle {
    registry: Arc<Registry>,
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
        lock(&self.registry.list).retain(|r| r.id != self.id);
    }
}
