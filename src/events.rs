//! Breach events: rejections, pressure transitions and rebalance moves.
//!
//! Recording is lock-free and allocation-free (a bounded queue of `Copy` records), so the
//! polling path can record a pressure transition. Events become visible in
//! [`Snapshot::events`](crate::Snapshot) and are emitted as `tracing` events when the governor
//! pumps the queue: at once for ceiling and scope rejections and rebalance moves; for a
//! budget's refusals and overflow breaches, which carry the engine's top allocation sites,
//! and for transitions seen by [`MemoryGovernor::pressure`](crate::MemoryGovernor::pressure),
//! at the next snapshot, rebalance or background tick (the background thread is woken for
//! them): neither the poll nor a refused reservation calls into a subscriber or reads
//! symbols.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use crate::EngineId;
use crate::pressure::PressureLevel;
use crate::sync::{AtomicU64, Mutex, Ordering, lock};
use crate::top_sites::TopSites;

/// How many events the history keeps, and how many may wait to be pumped.
pub const EVENT_CAPACITY: usize = 1024;

/// One breach event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreachEvent {
    /// Position in the sequence of all events this governor recorded, from 0.
    pub seq: u64,
    /// Time since the governor was built.
    pub at: Duration,
    /// What happened.
    pub kind: EventKind,
}

/// What a [`BreachEvent`] records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A reservation was refused by the engine's limit.
    BudgetRejected {
        /// The engine refused.
        engine: EngineId,
        /// Bytes asked for.
        requested: u64,
        /// Usage at the refusal.
        used: u64,
        /// Limit at the refusal.
        limit: u64,
        /// The engine's largest allocation sites by sampled live bytes when it was refused
        /// (none with heap profiling off).
        top: TopSites,
    },
    /// A reservation fit the engine's limit but was refused by the global ceiling.
    CeilingRejected {
        /// The engine refused.
        engine: EngineId,
        /// Bytes asked for.
        requested: u64,
        /// Global usage at the refusal.
        used: u64,
        /// The ceiling.
        ceiling: u64,
    },
    /// A pressure level changed. `engine` is `None` for the global level.
    Pressure {
        /// The engine, or `None` for the process.
        engine: Option<EngineId>,
        /// Level before.
        from: PressureLevel,
        /// Level after.
        to: PressureLevel,
    },
    /// The process's resident memory came within the RSS margin of the ceiling; the governor
    /// purged the arenas' dirty pages.
    ResidentNearCeiling {
        /// Resident bytes when it was seen.
        resident: u64,
        /// Resident bytes after purging.
        after_purge: u64,
        /// The ceiling.
        ceiling: u64,
    },
    /// The governor asked an engine's reclaimers for memory back.
    Reclaim {
        /// The engine asked.
        engine: EngineId,
        /// Bytes asked for.
        requested: u64,
        /// Bytes its reclaimers reported freed.
        freed: u64,
    },
    /// An engine's overflow could not take allocations (its region was full, or its file could
    /// not grow): served past the limit from the normal arena (`FallBack`) or refused
    /// (`FailAllocation`).
    OverflowBreach {
        /// The engine.
        engine: EngineId,
        /// Allocations served past the limit since the last such event.
        breaches: u64,
        /// Allocations refused since the last such event.
        refused: u64,
        /// Bytes served past the limit so far, in total.
        breach_bytes: u64,
        /// Bytes refused so far, in total.
        refused_bytes: u64,
        /// The engine's largest allocation sites by sampled live bytes when it was reported
        /// (none with heap profiling off).
        top: TopSites,
    },
    /// A scoped reservation was refused by a scope's limit.
    ScopeRejected {
        /// The scope that refused.
        scope: crate::ScopeId,
        /// The engine asked for memory.
        engine: EngineId,
        /// Bytes asked for.
        requested: u64,
        /// The scope's usage at the refusal.
        used: u64,
        /// The scope's limit at the refusal.
        limit: u64,
    },
    /// A scope's limit was changed.
    ScopeLimit {
        /// The scope.
        scope: crate::ScopeId,
        /// The limit before.
        from: u64,
        /// The limit after.
        to: u64,
        /// The scope's usage when it changed.
        usage: u64,
    },
    /// A scope's pressure level changed.
    ScopePressure {
        /// The scope.
        scope: crate::ScopeId,
        /// Level before.
        from: PressureLevel,
        /// Level after.
        to: PressureLevel,
    },
    /// A callback of the application's panicked and the governor carried on: a reclaimer
    /// (which is then unregistered: its state is not to be trusted) or a step of the
    /// background thread (a `tracing` subscriber's, say; the next tick runs as usual).
    CallbackPanicked {
        /// The engine whose reclaimer panicked, or `None` for a background step.
        engine: Option<EngineId>,
        /// What panicked: `"reclaim"`, `"reclaimable"` or `"background tick"`.
        what: &'static str,
    },
    /// The global ceiling moved, set by the host or following the cgroup's limit: the
    /// engines' budgets and caps moved in proportion, floors were kept where they fit.
    CeilingChanged {
        /// The ceiling before.
        from: u64,
        /// The ceiling after.
        to: u64,
        /// Who moved it.
        cause: CeilingCause,
        /// Global usage when it moved (above `to`: the engines are asked to give back).
        usage: u64,
        /// Whether the floors of all engines no longer fit under it: floors were lowered to
        /// the new budgets, and the engines are at their floors.
        floors_squeezed: bool,
    },
    /// Usage came under a lowered ceiling, `after` the change.
    UnderCeiling {
        /// The ceiling.
        ceiling: u64,
        /// Time from the change.
        after: Duration,
        /// Reservations refused (by an engine's limit or the ceiling) meanwhile.
        refusals: u64,
        /// Spill episodes begun meanwhile (by the governor's spill controllers).
        spills: u64,
    },
    /// The cgroup's limit is below an explicit ceiling (builder or `NODEDB_MEMORY_LIMIT`),
    /// which does not follow it: the kernel, not the governor, will hold the line.
    CgroupBelowCeiling {
        /// The cgroup's limit.
        limit: u64,
        /// The ceiling.
        ceiling: u64,
    },
    /// The rebalancer moved limit from one engine to another.
    Rebalance {
        /// The engine whose limit shrank.
        from: EngineId,
        /// The engine whose limit grew.
        to: EngineId,
        /// Bytes moved.
        bytes: u64,
    },
}

/// Who moved the ceiling (see [`EventKind::CeilingChanged`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CeilingCause {
    /// [`MemoryGovernor::set_ceiling`](crate::MemoryGovernor::set_ceiling).
    Set,
    /// The cgroup's hard limit (`memory.max`; v1 `memory.limit_in_bytes`) moved.
    CgroupMax,
    /// The cgroup's `memory.high` moved (below its `memory.max`).
    CgroupHigh,
}

impl CeilingCause {
    /// A short name: `set`, `cgroup memory.max` or `cgroup memory.high`.
    pub fn name(self) -> &'static str {
        match self {
            CeilingCause::Set => "set",
            CeilingCause::CgroupMax => "cgroup memory.max",
            CeilingCause::CgroupHigh => "cgroup memory.high",
        }
    }
}

struct Pending {
    event: BreachEvent,
    traced: bool,
}

pub(crate) struct EventLog {
    start: Instant,
    next_seq: AtomicU64,
    pending: ArrayQueue<Pending>,
    history: Mutex<VecDeque<BreachEvent>>,
    /// Events lost because the pending queue was full (nobody pumped for a long time).
    dropped: AtomicU64,
    /// The engines' top allocation sites for breach events, computed at most once a second.
    #[cfg(not(nodedb_mem_loom))]
    sites: crate::profile::TopSitesCache,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("recorded", &self.next_seq.load(Ordering::Relaxed))
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl EventLog {
    pub(crate) fn new() -> EventLog {
        EventLog {
            start: Instant::now(),
            next_seq: AtomicU64::new(0),
            pending: ArrayQueue::new(EVENT_CAPACITY),
            history: Mutex::new(VecDeque::with_capacity(EVENT_CAPACITY)),
            dropped: AtomicU64::new(0),
            #[cfg(not(nodedb_mem_loom))]
            sites: Default::default(),
        }
    }

    /// Records an event without allocating, locking or calling a subscriber.
    pub(crate) fn record_quiet(&self, kind: EventKind) {
        self.push(kind, false);
    }

    /// Records an event and emits it as a `tracing` event now. The caller holds no lock of the
    /// governor's: a subscriber may call back into it.
    ///
    /// A breach (a budget's refusal, an overflow breach) waits for the next pump instead,
    /// which looks up the engine's top allocation sites (allocating, reading the binary's
    /// symbols the first time: up to a second in a debug build) off the refusing thread; the
    /// background thread is woken for it.
    pub(crate) fn record(&self, kind: EventKind) {
        if has_top_sites(&kind) {
            self.push(kind, false);
            return;
        }
        let event = self.push(kind, true);
        emit(&event, None);
    }

    /// `kind` with its engine's top sites filled in, for the kinds that carry them (see
    /// [`has_top_sites`]).
    #[cfg_attr(nodedb_mem_loom, allow(unused_mut, clippy::unused_self))]
    fn with_top_sites(&self, mut kind: EventKind) -> EventKind {
        #[cfg(not(nodedb_mem_loom))]
        if let EventKind::BudgetRejected { engine, top, .. }
        | EventKind::OverflowBreach { engine, top, .. } = &mut kind
        {
            *top = self.sites.get(*engine);
        }
        kind
    }

    /// Records an event about the scope at `path` and emits it now, naming the scope. As for
    /// [`record`](Self::record), no lock of the governor's may be held.
    pub(crate) fn record_scope(&self, kind: EventKind, path: &str) {
        let event = self.push(kind, true);
        emit(&event, Some(path));
    }

    /// Records a [`EventKind::CallbackPanicked`] and emits it now with the panic's message.
    /// A subscriber that panics in turn is ignored: the caller is carrying on after a panic.
    pub(crate) fn record_panic(
        &self,
        engine: Option<EngineId>,
        what: &'static str,
        payload: &(dyn std::any::Any + Send),
    ) {
        let event = self.push(EventKind::CallbackPanicked { engine, what }, true);
        let detail = panic_message(payload);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            emit_with(&event, None, &detail);
        }));
    }

    fn push(&self, kind: EventKind, traced: bool) -> BreachEvent {
        let event = BreachEvent {
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
            at: self.start.elapsed(),
            kind,
        };
        if self.pending.push(Pending { event, traced }).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        crate::sync::nudge_background();
        event
    }

    /// Moves pending events into the history, then emits those not yet traced, after the
    /// history's lock is released: a subscriber may call back into the governor (a snapshot
    /// pumps too) without deadlocking it.
    pub(crate) fn pump(&self) {
        let mut pending = Vec::new();
        while let Some(mut p) = self.pending.pop() {
            // The breaches' top sites, looked up with no lock held.
            p.event.kind = self.with_top_sites(p.event.kind);
            pending.push(p);
        }
        if pending.is_empty() {
            return;
        }
        {
            let mut history = lock(&self.history);
            for p in &pending {
                if history.len() == EVENT_CAPACITY {
                    history.pop_front();
                }
                history.push_back(p.event);
            }
        }
        for p in pending.iter().filter(|p| !p.traced) {
            emit(&p.event, None);
        }
    }

    /// The most recent events (up to [`EVENT_CAPACITY`]), oldest first.
    pub(crate) fn history(&self) -> Vec<BreachEvent> {
        self.pump();
        let mut v: Vec<BreachEvent> = lock(&self.history).iter().copied().collect();
        // Concurrent recorders may land out of order in the queue; present them in order.
        v.sort_by_key(|e| e.seq);
        v
    }

    pub(crate) fn recorded(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Whether events of `kind` carry their engine's top allocation sites (looked up when they
/// are pumped).
fn has_top_sites(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::BudgetRejected { .. } | EventKind::OverflowBreach { .. }
    )
}

/// The message of a panic's payload (a `&str` or a `String`, as `panic!` makes them).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a payload that is not a string".to_owned()
    }
}

/// Emits `e` to `tracing`; `path` names the scope of a scope event where the caller knows it
/// (its number is given either way).
fn emit(e: &BreachEvent, path: Option<&str>) {
    emit_with(e, path, "");
}

/// As [`emit`], with `detail` (a panic's message) for the events that carry one.
fn emit_with(e: &BreachEvent, path: Option<&str>, detail: &str) {
    let path = path.unwrap_or("");
    match e.kind {
        EventKind::BudgetRejected {
            engine,
            requested,
            used,
            limit,
            top,
        } => tracing::warn!(
            target: "nodedb_mem",
            seq = e.seq,
            engine = engine.name(),
            requested,
            used,
            limit,
            top_sites = %top,
            "reservation refused by the engine's budget"
        ),
        EventKind::CeilingRejected {
            engine,
            requested,
            used,
            ceiling,
        } => tracing::warn!(
            target: "nodedb_mem",
            seq = e.seq,
            engine = engine.name(),
            requested,
            used,
            ceiling,
            "reservation refused by the global ceiling"
        ),
        EventKind::Pressure { engine, from, to } => tracing::info!(
            target: "nodedb_mem",
            seq = e.seq,
            engine = engine.map_or("global", EngineId::name),
            from = from.name(),
            to = to.name(),
            "pressure level changed"
        ),
        EventKind::ResidentNearCeiling {
            resident,
            after_purge,
            ceiling,
        } => tracing::warn!(
            target: "nodedb_mem",
            seq = e.seq,
            resident,
            after_purge,
            ceiling,
            "resident memory near the ceiling: purged dirty pages"
        ),
        EventKind::Reclaim {
            engine,
            requested,
            freed,
        } => tracing::info!(
            target: "nodedb_mem",
            seq = e.seq,
            engine = engine.name(),
            requested,
            freed,
            "asked reclaimers for memory"
        ),
        EventKind::OverflowBreach {
            engine,
            breaches,
            refused,
            breach_bytes,
            refused_bytes,
            top,
        } => tracing::warn!(
            target: "nodedb_mem",
            seq = e.seq,
            engine = engine.name(),
            breaches,
            refused,
            breach_bytes,
            refused_bytes,
            top_sites = %top,
            "overflow could not take allocations: served past the budget or refused"
        ),
        EventKind::CallbackPanicked { engine, what } => tracing::error!(
            target: "nodedb_mem",
            seq = e.seq,
            engine = engine.map_or("none", EngineId::name),
            what,
            panic = detail,
            "a callback panicked; the governor carries on"
        ),
        EventKind::CeilingChanged {
            from,
            to,
            cause,
            usage,
            floors_squeezed,
        } => tracing::warn!(
            target: "nodedb_mem",
            seq = e.seq,
            from,
            to,
            cause = cause.name(),
            usage,
            floors_squeezed,
            "the global ceiling moved"
        ),
        EventKind::UnderCeiling {
            ceiling,
            after,
            refusals,
            spills,
        } => tracing::info!(
            target: "nodedb_mem",
            seq = e.seq,
            ceiling,
            after_ms = after.as_millis() as u64,
            refusals,
            spills,
            "usage is under the lowered ceiling"
        ),
        EventKind::CgroupBelowCeiling { limit, ceiling } => tracing::warn!(
            target: "nodedb_mem",
            seq = e.seq,
            limit,
            ceiling,
            "the cgroup's memory limit is below the explicit ceiling, which does not follow it"
        ),
        EventKind::Rebalance { from, to, bytes } => tracing::info!(
            target: "nodedb_mem",
            seq = e.seq,
            from = from.name(),
            to = to.name(),
            bytes,
            "rebalanced budget"
        ),
        EventKind::ScopeRejected {
            scope,
            engine,
            requested,
            used,
            limit,
        } => tracing::warn!(
            target: "nodedb_mem",
            seq = e.seq,
            scope = path,
            scope_id = scope.get(),
            engine = engine.name(),
            requested,
            used,
            limit,
            "reservation refused by a scope's limit"
        ),
        EventKind::ScopeLimit {
            scope,
            from,
            to,
            usage,
        } => tracing::info!(
            target: "nodedb_mem",
            seq = e.seq,
            scope = path,
            scope_id = scope.get(),
            from,
            to,
            usage,
            "scope limit changed"
        ),
        // Recorded quietly by a poll and emitted when pumped, where the path is not known.
        EventKind::ScopePressure { scope, from, to } => tracing::info!(
            target: "nodedb_mem",
            seq = e.seq,
            scope_id = scope.get(),
            from = from.name(),
            to = to.name(),
            "scope pressure level changed"
        ),
    }
}
