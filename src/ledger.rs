//! The ledger every reservation goes through: the engines' budgets, the global ledger under the
//! ceiling, and [`Reservation`], which gives back exactly what it was admitted.
//!
//! A [`Reservation`] holds the ledger itself (not the whole governor), so the governor can hold
//! the ledger without either module naming the other's types in a circle.

use std::fmt;

use crossbeam_utils::CachePadded;

use crate::EngineId;
use crate::budget::{Budget, checked_sub, raise_max};
use crate::error::{Limit, MemError, Result};
use crate::events::{EventKind, EventLog};
use crate::headroom::{Headroom, Refused};
use crate::pressure::ThresholdsPpm;
use crate::scope::{Scope, ScopeNode, ScopeTree};
use crate::sync::{Arc, AtomicU8, AtomicU64, Ordering};
use crate::top_sites::TopSites;
use crate::wait::{Attempt, Queues, Ticker, Waiter};

/// The process-wide counterpart of a [`Budget`]: usage of all engines against the ceiling.
pub(crate) struct GlobalLedger {
    /// The ceiling (moved only by `MemoryGovernor::set_ceiling`, under the rebalance lock) and
    /// `ceiling - usage`, the global admission word.
    pub(crate) headroom: Headroom,
    pub(crate) usage: AtomicU64,
    pub(crate) peak: AtomicU64,
    pub(crate) rejections: AtomicU64,
    pub(crate) level: AtomicU8,
    pub(crate) transitions: AtomicU64,
    /// Whether the global allocator's ledger counts (see `Budget::allocator_bytes`).
    pub(crate) from_allocator: bool,
    /// Resident memory beyond the governed usage at the last sample (allocator overhead,
    /// fragmentation, code, stacks): counted against the ceiling by admission and pressure.
    pub(crate) rss_excess: AtomicU64,
    /// Engine arenas purged because their dirty pages passed the allowance.
    pub(crate) dirty_purges: AtomicU64,
    /// Panics caught in reclaimers and in the background thread's steps.
    pub(crate) callback_panics: AtomicU64,
    /// Ticks the background thread has finished.
    pub(crate) background_ticks: AtomicU64,
    /// The background thread's sleep after its last tick, in nanoseconds (0: no thread).
    pub(crate) background_sleep_ns: AtomicU64,
    /// Refreshes of jemalloc's statistics made to judge resident memory and dirty pages.
    pub(crate) stats_refreshes: AtomicU64,
    /// Spill episodes begun, by every spill controller of this governor.
    pub(crate) spills_begun: AtomicU64,
    /// The kernel's pressure level from the cgroup's stall time (a `PressureLevel`), the
    /// floor of the global level.
    pub(crate) kernel_level: AtomicU8,
}

impl GlobalLedger {
    pub(crate) fn new(ceiling: u64, from_allocator: bool) -> GlobalLedger {
        GlobalLedger {
            headroom: Headroom::new(ceiling),
            usage: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            rejections: AtomicU64::new(0),
            level: AtomicU8::new(crate::PressureLevel::Normal as u8),
            transitions: AtomicU64::new(0),
            from_allocator,
            rss_excess: AtomicU64::new(0),
            dirty_purges: AtomicU64::new(0),
            callback_panics: AtomicU64::new(0),
            background_ticks: AtomicU64::new(0),
            background_sleep_ns: AtomicU64::new(0),
            stats_refreshes: AtomicU64::new(0),
            spills_begun: AtomicU64::new(0),
            kernel_level: AtomicU8::new(crate::PressureLevel::Normal as u8),
        }
    }

    pub(crate) fn ceiling(&self) -> u64 {
        self.headroom.limit()
    }

    /// Moves the ceiling to `ceiling` (the headroom by as much, below zero if usage is above
    /// it); returns the old one. Caller holds the rebalance lock.
    pub(crate) fn set_ceiling(&self, ceiling: u64) -> u64 {
        self.headroom.set_limit(ceiling)
    }

    /// Bytes the global allocator has charged to all engines together.
    pub(crate) fn allocator_bytes(&self) -> u64 {
        #[cfg(not(nodedb_mem_loom))]
        if self.from_allocator {
            return EngineId::ALL
                .iter()
                .map(|&e| nodedb_mem_alloc::ctl::ledger::charged(e))
                .sum();
        }
        0
    }

    pub(crate) fn own_usage(&self) -> u64 {
        self.usage.load(Ordering::Acquire)
    }

    /// Usage of all engines together: reservations and direct charges, and the allocator's.
    pub(crate) fn usage(&self) -> u64 {
        self.own_usage() + self.allocator_bytes()
    }

    /// Admission against the ceiling: the allocator's bytes and the resident memory found
    /// beyond the governed usage count besides the word.
    fn take(&self, bytes: u64) -> std::result::Result<(), Refused> {
        let ext = self.allocator_bytes() + self.rss_excess.load(Ordering::Acquire);
        self.headroom.take(bytes, ext)
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
        self.headroom.give(bytes);
    }
}

/// The engines' budgets, the scopes and the global ledger, with the admission rules over them.
pub(crate) struct Ledger {
    pub(crate) budgets: [CachePadded<Budget>; EngineId::COUNT],
    pub(crate) global: CachePadded<GlobalLedger>,
    pub(crate) scopes: ScopeTree,
    /// Shared with the scope tree, which records scopes' pressure changes in it.
    pub(crate) events: std::sync::Arc<EventLog>,
    pub(crate) ppm: ThresholdsPpm,
    /// Requests waiting for memory, per engine.
    pub(crate) waiters: Queues<Reservation>,
    /// The thread that retries and times out waiting requests (started by the first one).
    pub(crate) ticker: std::sync::Arc<Ticker>,
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

/// How an admission ends when it fits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Commit the bytes as a reservation.
    Commit,
    /// Give them back at once (a question only).
    Ask,
    /// Commit, but a refusal is not counted or reported (a waiting request's retries).
    Retry,
}

impl Ledger {
    pub(crate) fn budget(&self, engine: EngineId) -> &Budget {
        &self.budgets[engine.index()]
    }

    /// Admission for `bytes` for `engine`, and in `scope` and the scopes above it if given:
    /// engine first, then the scopes from the leaf up, then the ceiling, each a
    /// compare-and-swap that refuses to take its headroom below zero; a refusal gives back
    /// every level already taken, so nothing stays charged.
    pub(crate) fn admit(
        &self,
        engine: EngineId,
        scope: Option<&Arc<ScopeNode>>,
        bytes: u64,
        how: Admit,
    ) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let report = how != Admit::Retry;
        let b = self.budget(engine);
        if let Err(refused) = b.try_admit(bytes) {
            if report {
                self.refused_by_budget(
                    engine,
                    EventKind::BudgetRejected {
                        engine,
                        requested: bytes,
                        used: refused.usage,
                        limit: refused.limit,
                        top: TopSites::NONE,
                    },
                );
            }
            return Err(MemError::budget_exceeded(
                engine,
                bytes,
                refused.usage,
                refused.limit,
            ));
        }
        // The scopes on the path, leaf first (none for an unscoped reservation).
        let path = || scope.map(|leaf| leaf.path_up()).into_iter().flatten();
        for (taken, n) in path().enumerate() {
            if let Err(used) = n.try_take(bytes) {
                path().take(taken).for_each(|m| m.untake(bytes));
                b.cancel_admission(bytes);
                let limit = n.limit();
                if report {
                    self.refused_by_scope(
                        n,
                        EventKind::ScopeRejected {
                            scope: n.id,
                            engine,
                            requested: bytes,
                            used,
                            limit,
                        },
                    );
                }
                return Err(MemError::scope_exceeded(
                    &n.path, engine, bytes, used, limit,
                ));
            }
        }
        let g = &self.global;
        if let Err(Refused {
            usage: used,
            limit: ceiling,
        }) = g.take(bytes)
        {
            path().for_each(|m| m.untake(bytes));
            b.cancel_admission(bytes);
            if report {
                self.refused_by_ceiling(
                    engine,
                    EventKind::CeilingRejected {
                        engine,
                        requested: bytes,
                        used,
                        ceiling,
                    },
                );
            }
            return Err(MemError::ceiling_exceeded(engine, bytes, used, ceiling));
        }
        if how == Admit::Ask {
            g.headroom.give(bytes);
            path().for_each(|m| m.untake(bytes));
            b.cancel_admission(bytes);
        } else {
            g.raise(bytes);
            path().for_each(|m| m.commit(bytes));
            b.commit_reservation(bytes);
        }
        Ok(())
    }

    fn release(&self, engine: EngineId, scope: Option<&Arc<ScopeNode>>, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.budget(engine).release(bytes)?;
        if let Some(leaf) = scope {
            leaf.path_up().for_each(|n| n.release(bytes));
        }
        self.global.lower(bytes);
        Ok(())
    }

    /// Charges `bytes` of live memory to `engine`, unconditionally.
    pub(crate) fn charge(&self, engine: EngineId, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let g = &self.global;
        g.headroom.force(bytes);
        g.raise(bytes);
        self.budget(engine).charge(bytes);
    }

    /// Credits `bytes` of freed memory to `engine`; refuses, changing nothing, if more than is
    /// charged.
    pub(crate) fn credit(&self, engine: EngineId, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.budget(engine).credit(bytes)?;
        self.global.lower(bytes);
        Ok(())
    }

    /// Serves the waiting requests if there are any: called after every release, credit,
    /// limit raised and rebalancing step (see `wait`'s rules for why none is missed).
    pub(crate) fn wake_waiters(this: &Arc<Self>) {
        if this.waiters.anyone_waiting() {
            Ledger::serve_waiters(this);
        }
    }

    /// One pass over the waiting requests (the rules are in `wait`): grants what fits in
    /// order, times out requests whose deadline passed; returns the earliest deadline still
    /// waiting. Refusals at a deadline are counted and reported as any refusal is, once the
    /// queue's lock is released.
    pub(crate) fn serve_waiters(this: &Arc<Self>) -> Option<std::time::Instant> {
        let (next, refusals) = this.waiters.serve(
            now(),
            |w| Ledger::attempt(this, w),
            |w, e| this.refusal_of(w.scope.as_ref(), e),
        );
        for r in refusals {
            this.report(r);
        }
        next
    }

    /// Queues `w` and serves the queue (`w` tried in its place, last); returns its outcome
    /// if that pass gave one.
    pub(crate) fn join_waiters(
        this: &Arc<Self>,
        w: &Arc<Waiter<Reservation>>,
    ) -> Option<Result<Reservation>> {
        let (outcome, refusals) = this.waiters.join(
            w,
            now(),
            |w| Ledger::attempt(this, w),
            |w, e| this.refusal_of(w.scope.as_ref(), e),
        );
        for r in refusals {
            this.report(r);
        }
        outcome
    }

    /// A quiet attempt for a waiting request: granted, not yet (with the refusal), or never
    /// (its scope was removed, or a limit on its path is now below what it asks).
    pub(crate) fn attempt(this: &Arc<Self>, w: &Waiter<Reservation>) -> Attempt<Reservation> {
        match reserve(this, w.engine, w.scope.as_ref(), w.bytes, Admit::Retry) {
            Ok(r) => Attempt::Granted(r),
            Err(e) if e.is_over_budget() => {
                match this.never_fits(w.engine, w.scope.as_ref(), w.bytes) {
                    Some(never) => Attempt::Fail(never),
                    None => Attempt::Wait(e),
                }
            }
            Err(e) => Attempt::Fail(e),
        }
    }

    /// Why `bytes` for `engine` (in `scope`) cannot be admitted however much is released while
    /// the limits stand, if it cannot: more than the engine's cap, the limit of a scope on its
    /// path, or the ceiling. Such a request is refused instead of waiting (in the queue it
    /// would hold back every request behind it that competes for that limit until its
    /// deadline).
    pub(crate) fn never_fits(
        &self,
        engine: EngineId,
        scope: Option<&Scope>,
        bytes: u64,
    ) -> Option<MemError> {
        let never = |limit, max| {
            Some(MemError::NeverFits {
                engine,
                requested: bytes,
                limit,
                max,
            })
        };
        let cap = self.budget(engine).cap();
        if bytes > cap {
            return never(Limit::Cap(engine), cap);
        }
        if let Some(n) = scope.and_then(|s| s.node.path_up().find(|n| bytes > n.limit())) {
            return never(Limit::Scope(n.path.clone()), n.limit());
        }
        let ceiling = self.global.ceiling();
        if bytes > ceiling {
            return never(Limit::Ceiling, ceiling);
        }
        None
    }

    /// Counts and reports a refusal found quietly (see [`Refusal`]).
    pub(crate) fn report(&self, r: Refusal) {
        match r {
            Refusal::Budget(engine, kind) => self.refused_by_budget(engine, kind),
            Refusal::Ceiling(engine, kind) => self.refused_by_ceiling(engine, kind),
            Refusal::Scope(node, kind) => self.refused_by_scope(&node, kind),
        }
    }

    /// Counts a refusal by `engine`'s limit and records `kind` (a `BudgetRejected`).
    fn refused_by_budget(&self, engine: EngineId, kind: EventKind) {
        self.budget(engine).count_rejection();
        self.events.record(kind);
    }

    /// Counts a refusal by the ceiling and records `kind` (a `CeilingRejected`).
    fn refused_by_ceiling(&self, engine: EngineId, kind: EventKind) {
        self.budget(engine).count_rejection();
        self.global.rejections.fetch_add(1, Ordering::Relaxed);
        self.events.record(kind);
    }

    /// Counts a refusal by scope `n`'s limit and records `kind` (a `ScopeRejected`).
    fn refused_by_scope(&self, n: &ScopeNode, kind: EventKind) {
        n.count_rejection();
        self.events.record_scope(kind, &n.path);
    }
}

/// The time a pass over the waiting requests judges deadlines by (none in the loom models,
/// which keep no deadlines: only requests of one attempt leave by time there).
fn now() -> Option<std::time::Instant> {
    #[cfg(not(nodedb_mem_loom))]
    return Some(std::time::Instant::now());
    #[cfg(nodedb_mem_loom)]
    return None;
}

/// A refusal found by a quiet attempt, to count and report later, outside a lock: what a
/// reporting attempt would have counted and recorded.
pub(crate) enum Refusal {
    Budget(EngineId, EventKind),
    Ceiling(EngineId, EventKind),
    Scope(Arc<ScopeNode>, EventKind),
}

impl Ledger {
    /// The refusal to count and report for `e`, an error given to a request (in `scope`, if
    /// any) by a quiet attempt: what a reporting attempt would have counted and recorded.
    pub(crate) fn refusal_of(&self, scope: Option<&Scope>, e: &MemError) -> Option<Refusal> {
        let node = |path: &str| {
            let mut at = scope.map(|s| Arc::clone(&s.node));
            while let Some(n) = at {
                if n.path == path {
                    return Some(n);
                }
                at = n.parent.clone();
            }
            None
        };
        Some(match *e {
            MemError::BudgetExceeded {
                engine,
                requested,
                used,
                limit,
                ..
            } => Refusal::Budget(
                engine,
                EventKind::BudgetRejected {
                    engine,
                    requested,
                    used,
                    limit,
                    top: TopSites::NONE,
                },
            ),
            MemError::CeilingExceeded {
                engine,
                requested,
                used,
                ceiling,
                ..
            } => Refusal::Ceiling(
                engine,
                EventKind::CeilingRejected {
                    engine,
                    requested,
                    used,
                    ceiling,
                },
            ),
            MemError::ScopeExceeded {
                ref scope,
                engine,
                requested,
                used,
                limit,
                ..
            } => {
                let n = node(scope)?;
                let kind = EventKind::ScopeRejected {
                    scope: n.id,
                    engine,
                    requested,
                    used,
                    limit,
                };
                Refusal::Scope(n, kind)
            }
            MemError::NeverFits {
                engine,
                requested,
                ref limit,
                max,
            } => match limit {
                Limit::Budget(_) | Limit::Cap(_) => Refusal::Budget(
                    engine,
                    EventKind::BudgetRejected {
                        engine,
                        requested,
                        used: self.budget(engine).usage(),
                        limit: max,
                        top: TopSites::NONE,
                    },
                ),
                Limit::Ceiling => Refusal::Ceiling(
                    engine,
                    EventKind::CeilingRejected {
                        engine,
                        requested,
                        used: self.global.usage(),
                        ceiling: max,
                    },
                ),
                Limit::Scope(path) => {
                    let n = node(path)?;
                    let kind = EventKind::ScopeRejected {
                        scope: n.id,
                        engine,
                        requested,
                        used: n.usage(),
                        limit: max,
                    };
                    Refusal::Scope(n, kind)
                }
            },
            _ => return None,
        })
    }
}

/// Reserves `bytes` for `engine` in `ledger` (and in `scope`, if given), or refuses with a
/// deterministic error.
pub(crate) fn reserve(
    ledger: &Arc<Ledger>,
    engine: EngineId,
    scope: Option<&Scope>,
    bytes: u64,
    how: Admit,
) -> Result<Reservation> {
    let scope = match scope {
        None => None,
        Some(s) => {
            if !ledger.scopes.owns(s) {
                return Err(MemError::foreign_scope(&s.node.path));
            }
            if s.node.is_removed() {
                return Err(MemError::ScopeRemoved {
                    scope: s.node.path.clone(),
                });
            }
            Some(Arc::clone(&s.node))
        }
    };
    // Only an admitted reservation holds its scope open: a refused attempt never makes the
    // scope look in use (clients retrying refused reservations in a tight loop kept a drained
    // scope from being removed).
    ledger.admit(engine, scope.as_ref(), bytes, how)?;
    if let Some(n) = &scope
        && !n.enter()
    {
        // Removed between the check and the admission: give back what was admitted. (No
        // waiters are woken here: this may run under the queue's lock, and the bytes were
        // held for an instant; the waiting thread retries within `WAIT_RETRY`.)
        let released = ledger.release(engine, Some(n), bytes);
        debug_assert!(released.is_ok(), "{released:?}");
        return Err(MemError::ScopeRemoved {
            scope: n.path.clone(),
        });
    }
    Ok(Reservation {
        ledger: Arc::clone(ledger),
        engine,
        scope: scope.map(|node| Scope { node }),
        size: bytes,
    })
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
    ledger: Arc<Ledger>,
    engine: EngineId,
    /// The scope it was made in (it counts against that scope and every one above it).
    scope: Option<Scope>,
    size: u64,
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("engine", &self.engine)
            .field("scope", &self.scope.as_ref().map(Scope::path))
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

    /// The scope it was made in, if any: its handle, with its figures and pressure.
    pub fn scope(&self) -> Option<&Scope> {
        self.scope.as_ref()
    }

    fn node(&self) -> Option<&Arc<ScopeNode>> {
        self.scope.as_ref().map(|s| &s.node)
    }

    /// Reserves `bytes` more (against the engine, its scopes and the ceiling), or refuses
    /// (holding what it held) with the same error as
    /// [`MemoryGovernor::reserve`](crate::MemoryGovernor::reserve).
    pub fn try_grow(&mut self, bytes: u64) -> Result<()> {
        self.ledger
            .admit(self.engine, self.node(), bytes, Admit::Commit)?;
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
        self.ledger.release(self.engine, self.node(), bytes)?;
        self.size -= bytes;
        Ledger::wake_waiters(&self.ledger);
        Ok(())
    }

    /// Moves `bytes` of this reservation into a new one for the same engine and scope.
    pub fn split(&mut self, bytes: u64) -> Result<Reservation> {
        self.check_holds(bytes)?;
        if let Some(n) = self.node() {
            // This reservation keeps the scope open, so it cannot be removed meanwhile.
            let entered = n.enter();
            debug_assert!(entered, "a scope with a live reservation was removed");
        }
        self.size -= bytes;
        Ok(Reservation {
            ledger: Arc::clone(&self.ledger),
            engine: self.engine,
            scope: self.scope.clone(),
            size: bytes,
        })
    }

    /// Gives everything back; returns how many bytes that was.
    pub fn free(&mut self) -> u64 {
        let size = std::mem::take(&mut self.size);
        // A reservation releases exactly what it was admitted, so this cannot be refused; if a
        // bug ever made it so, the ledger counts it in `over_releases` and stays unchanged.
        let released = self.ledger.release(self.engine, self.node(), size);
        debug_assert!(released.is_ok(), "{released:?}");
        if size > 0 {
            Ledger::wake_waiters(&self.ledger);
        }
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
        if let Some(n) = self.node() {
            n.leave();
        }
    }
}
