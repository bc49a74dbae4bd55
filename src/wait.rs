//! Waiting admission: requests queued in the order they came, granted as memory is released
//! or lent, never ahead of an earlier request that competes for the same memory.
//!
//! # Rules
//!
//! * One queue, in arrival order, served in passes under its lock. A pass walks it oldest
//!   first and tries a request only if no earlier request still waiting is held back by a
//!   limit on the later one's path. Each request tried and refused stays, and blocks the limit
//!   its refusal names (its engine's budget, a scope on its path, or the ceiling); a request
//!   whose path holds a blocked limit is not tried, and waits at that limit too. So:
//!   - a request is granted before every later request that competes for the memory it
//!     lacks (a large request is not passed by smaller ones behind it);
//!   - a request held back only by its own scope's limit never holds back requests outside
//!     that scope (one tenant cannot stall another).
//! * A new request joins the back of the queue and a pass runs at once, so it is tried in its
//!   place, after every earlier request. A zero timeout makes it one attempt in that place.
//! * A request leaves the queue exactly once, under its lock: granted (its reservation is
//!   stored in its slot), failed (its scope was removed, or a limit on its path fell below
//!   what it asks), timed out, or cancelled by its owner. A request whose deadline has passed
//!   leaves at the next pass: if it would be tried, that attempt is its last one; if it is
//!   blocked, it times out untried (`QueuedBehind`, naming the limit and what waits at it
//!   ahead), so no request ever takes memory an earlier one waits for, deadlines included. A
//!   grant the owner no longer wants (a future dropped just after) is taken back out of the
//!   slot and dropped, which releases it: memory is never both granted and lost.
//! * No wake-up is lost: a request counts itself in `waiting` and then, after a sequentially
//!   consistent fence, makes its first attempt; every release gives its bytes back and then,
//!   after a fence of its own, reads `waiting`. The two fences are ordered, so either the
//!   request's attempt sees the released bytes, or the release sees the request and serves
//!   the queue. (A release writes nothing shared for this: `waiting` is only read.)
//!
//! The grant type is generic so that this module needs nothing from the ledger.

use std::collections::VecDeque;
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::EngineId;
use crate::error::{Limit, MemError};
use crate::scope::Scope;
use crate::sync::{Arc, AtomicU64, Mutex, Ordering, lock};

/// Who to wake when a request leaves its queue.
enum Wake {
    Nobody,
    Thread(std::thread::Thread),
    Task(Waker),
}

impl Wake {
    fn wake(self) {
        match self {
            Wake::Nobody => {}
            Wake::Thread(t) => t.unpark(),
            Wake::Task(w) => w.wake(),
        }
    }
}

struct Slot<T> {
    outcome: Option<Result<T, MemError>>,
    wake: Wake,
}

/// One waiting request.
pub(crate) struct Waiter<T> {
    pub(crate) engine: EngineId,
    pub(crate) scope: Option<Scope>,
    pub(crate) bytes: u64,
    pub(crate) since: Instant,
    pub(crate) deadline: Instant,
    /// A zero timeout: one attempt, in its place in the queue.
    once: bool,
    slot: Mutex<Slot<T>>,
}

impl<T> Waiter<T> {
    pub(crate) fn new(
        engine: EngineId,
        scope: Option<Scope>,
        bytes: u64,
        timeout: Duration,
    ) -> Arc<Waiter<T>> {
        let since = Instant::now();
        Arc::new(Waiter {
            engine,
            scope,
            bytes,
            since,
            once: timeout.is_zero(),
            // A timeout past what an `Instant` can hold (`Duration::MAX`) waits for good.
            deadline: since
                .checked_add(timeout)
                .or_else(|| since.checked_add(Duration::from_secs(1 << 32)))
                .unwrap_or(since),
            slot: Mutex::new(Slot {
                outcome: None,
                wake: Wake::Nobody,
            }),
        })
    }

    /// Takes the outcome if there is one; otherwise leaves `waker` (or, without one, the
    /// calling thread) to be woken when there is.
    pub(crate) fn outcome_or_wake(&self, waker: Option<&Waker>) -> Option<Result<T, MemError>> {
        let mut slot = lock(&self.slot);
        if let Some(outcome) = slot.outcome.take() {
            return Some(outcome);
        }
        slot.wake = match waker {
            Some(w) => Wake::Task(w.clone()),
            None => Wake::Thread(std::thread::current()),
        };
        None
    }

    /// Whether the outcome has come (and is not taken yet).
    #[cfg(not(nodedb_mem_loom))]
    pub(crate) fn has_outcome(&self) -> bool {
        lock(&self.slot).outcome.is_some()
    }

    /// Takes the outcome, if it came.
    pub(crate) fn take_outcome(&self) -> Option<Result<T, MemError>> {
        lock(&self.slot).outcome.take()
    }

    /// Stores the outcome; returns who to wake (woken by the caller, outside every lock).
    fn settle(&self, outcome: Result<T, MemError>) -> Wake {
        let mut slot = lock(&self.slot);
        slot.outcome = Some(outcome);
        std::mem::replace(&mut slot.wake, Wake::Nobody)
    }
}

/// What an attempt for a waiting request says.
pub(crate) enum Attempt<T> {
    Granted(T),
    /// No room yet: the refusal, which names the limit that held it back.
    Wait(MemError),
    /// It can never be granted (its scope was removed, or a limit on its path is now below
    /// what it asks).
    Fail(MemError),
}

/// Per-engine figures of the queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct QueueFigures {
    pub(crate) waiters: u64,
    pub(crate) waiting_bytes: u64,
}

/// A limit a waiting request can be held back by, as the pass compares them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Key {
    Budget(EngineId),
    Scope(crate::ScopeId),
    Ceiling,
}

/// A limit that holds back waiting requests in the pass under way, and how many wait at it.
struct Blocker {
    key: Key,
    limit: Limit,
    ahead: u64,
    ahead_bytes: u64,
}

impl<T> Waiter<T> {
    /// Whether the memory `key` stands for is on this request's path (it competes for it).
    fn needs(&self, key: Key) -> bool {
        match key {
            Key::Budget(e) => e == self.engine,
            Key::Ceiling => true,
            Key::Scope(id) => self
                .scope
                .as_ref()
                .is_some_and(|s| s.node.path_up().any(|n| n.id == id)),
        }
    }

    /// The limit a refusal of this request names.
    fn held_by(&self, refusal: &MemError) -> (Key, Limit) {
        match refusal {
            MemError::ScopeExceeded { scope, .. } => {
                let id = self
                    .scope
                    .as_ref()
                    .and_then(|s| s.node.path_up().find(|n| n.path == *scope).map(|n| n.id));
                match id {
                    Some(id) => (Key::Scope(id), Limit::Scope(scope.clone())),
                    // Not on its path (cannot happen): hold back its whole engine.
                    None => (Key::Budget(self.engine), Limit::Budget(self.engine)),
                }
            }
            MemError::CeilingExceeded { .. } => (Key::Ceiling, Limit::Ceiling),
            _ => (Key::Budget(self.engine), Limit::Budget(self.engine)),
        }
    }
}

/// Every waiting request, in the order they came.
pub(crate) struct Queues<T> {
    queue: Mutex<VecDeque<Arc<Waiter<T>>>>,
    /// Requests queued: read by every release (see the module's rules).
    waiting: crossbeam_utils::CachePadded<AtomicU64>,
    figures: [AtomicU64; EngineId::COUNT],
    bytes: [AtomicU64; EngineId::COUNT],
    pub(crate) granted: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) cancelled: AtomicU64,
}

/// What a pass decided, to act on once the queue's lock is released: whom to wake, and the
/// refusals to report.
struct Settled<R> {
    woken: Vec<Wake>,
    reports: Vec<R>,
    /// The earliest deadline still waiting.
    next: Option<Instant>,
}

impl<R> Settled<R> {
    fn finish(self) -> (Option<Instant>, Vec<R>) {
        self.woken.into_iter().for_each(Wake::wake);
        (self.next, self.reports)
    }
}

impl<T> Queues<T> {
    pub(crate) fn new() -> Queues<T> {
        Queues {
            queue: Mutex::new(VecDeque::new()),
            waiting: crossbeam_utils::CachePadded::new(AtomicU64::new(0)),
            figures: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes: std::array::from_fn(|_| AtomicU64::new(0)),
            granted: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
        }
    }

    /// Whether any request waits, read after a release gave its bytes back (behind a fence:
    /// see the module's rules).
    pub(crate) fn anyone_waiting(&self) -> bool {
        crate::sync::fence(Ordering::SeqCst);
        self.waiting.load(Ordering::Relaxed) > 0
    }

    pub(crate) fn figures(&self, engine: EngineId) -> QueueFigures {
        QueueFigures {
            waiters: self.figures[engine.index()].load(Ordering::Relaxed),
            waiting_bytes: self.bytes[engine.index()].load(Ordering::Relaxed),
        }
    }

    /// Requests waiting in the scope numbered `scope`.
    pub(crate) fn waiting_in(&self, scope: crate::ScopeId) -> u64 {
        let queue = lock(&self.queue);
        let n = queue
            .iter()
            .filter(|w| w.scope.as_ref().is_some_and(|s| s.id() == scope))
            .count();
        n as u64
    }

    fn count(&self, w: &Waiter<T>, joined: bool) {
        let (n, b) = (
            &self.figures[w.engine.index()],
            &self.bytes[w.engine.index()],
        );
        if joined {
            n.fetch_add(1, Ordering::Relaxed);
            b.fetch_add(w.bytes, Ordering::Relaxed);
        } else {
            n.fetch_sub(1, Ordering::Relaxed);
            b.fetch_sub(w.bytes, Ordering::Relaxed);
            self.waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Queues `w` at the back and serves the queue at once (`w` last, after every earlier
    /// request): returns `w`'s outcome if that pass gave it one, with the pass's reports.
    pub(crate) fn join<R>(
        &self,
        w: &Arc<Waiter<T>>,
        now: Option<Instant>,
        attempt: impl FnMut(&Waiter<T>) -> Attempt<T>,
        report_of: impl FnMut(&Waiter<T>, &MemError) -> Option<R>,
    ) -> (Option<Result<T, MemError>>, Vec<R>) {
        let settled = {
            let mut queue = lock(&self.queue);
            self.waiting.fetch_add(1, Ordering::AcqRel);
            crate::sync::fence(Ordering::SeqCst);
            queue.push_back(Arc::clone(w));
            self.count(w, true);
            self.pass(&mut queue, now, attempt, report_of)
        };
        // A request that waits makes its engine busy: rebalancing should look soon. Signalled
        // once the request is counted, so the tick it wakes sees it.
        crate::sync::nudge_background();
        let (_, reports) = settled.finish();
        (w.take_outcome(), reports)
    }

    /// Serves the queue: one pass in the order requests came (see [`pass`](Self::pass)).
    /// Returns the earliest deadline still waiting and the refusals to report.
    pub(crate) fn serve<R>(
        &self,
        now: Option<Instant>,
        attempt: impl FnMut(&Waiter<T>) -> Attempt<T>,
        report_of: impl FnMut(&Waiter<T>, &MemError) -> Option<R>,
    ) -> (Option<Instant>, Vec<R>) {
        let settled = {
            let mut queue = lock(&self.queue);
            self.pass(&mut queue, now, attempt, report_of)
        };
        settled.finish()
    }

    /// One pass over the queue, oldest first, under its lock.
    ///
    /// A request is tried only if no earlier request still waiting competes for the memory
    /// that holds it back: each request tried and refused (it stays) blocks the limit its
    /// refusal names — its engine's budget, a scope on its path, or the ceiling — and a later
    /// request whose path holds a blocked limit is not tried (it waits at that limit too). So a
    /// request is never granted memory an earlier one waits for, and one held back only by
    /// its own scope's limit never holds back requests outside that scope.
    ///
    /// A request whose deadline has passed (`now`; every pass, for a request of one attempt)
    /// leaves the queue: tried, it gets its attempt as the last one (granted, or timed out
    /// with the refusal, which `report_of` turns into a report); blocked, it times out untried
    /// with [`MemError::QueuedBehind`], naming the limit and what waits at it ahead.
    fn pass<R>(
        &self,
        queue: &mut VecDeque<Arc<Waiter<T>>>,
        now: Option<Instant>,
        mut attempt: impl FnMut(&Waiter<T>) -> Attempt<T>,
        mut report_of: impl FnMut(&Waiter<T>, &MemError) -> Option<R>,
    ) -> Settled<R> {
        let mut out = Settled {
            woken: Vec::new(),
            reports: Vec::new(),
            next: None,
        };
        let mut blocked: Vec<Blocker> = Vec::new();
        let mut kept = VecDeque::with_capacity(queue.len());
        while let Some(w) = queue.pop_front() {
            let expired = w.once || now.is_some_and(|n| w.deadline <= n);
            let waited = now.map_or(Duration::ZERO, |n| n.saturating_duration_since(w.since));
            let outcome = if let Some(b) = blocked.iter_mut().find(|b| w.needs(b.key)) {
                if expired {
                    self.timed_out.fetch_add(1, Ordering::Relaxed);
                    Err(MemError::WaitTimedOut {
                        waited,
                        refusal: Box::new(MemError::QueuedBehind {
                            engine: w.engine,
                            limit: b.limit.clone(),
                            ahead: b.ahead,
                            ahead_bytes: b.ahead_bytes,
                        }),
                    })
                } else {
                    b.ahead += 1;
                    b.ahead_bytes = b.ahead_bytes.saturating_add(w.bytes);
                    out.next = Some(out.next.map_or(w.deadline, |n| n.min(w.deadline)));
                    kept.push_back(w);
                    continue;
                }
            } else {
                match attempt(&w) {
                    Attempt::Granted(t) => {
                        self.granted.fetch_add(1, Ordering::Relaxed);
                        Ok(t)
                    }
                    Attempt::Fail(e) => {
                        out.reports.extend(report_of(&w, &e));
                        Err(e)
                    }
                    Attempt::Wait(refusal) if expired => {
                        out.reports.extend(report_of(&w, &refusal));
                        if w.once {
                            Err(refusal)
                        } else {
                            self.timed_out.fetch_add(1, Ordering::Relaxed);
                            Err(MemError::WaitTimedOut {
                                waited,
                                refusal: Box::new(refusal),
                            })
                        }
                    }
                    Attempt::Wait(refusal) => {
                        let (key, limit) = w.held_by(&refusal);
                        match blocked.iter_mut().find(|b| b.key == key) {
                            Some(b) => {
                                b.ahead += 1;
                                b.ahead_bytes = b.ahead_bytes.saturating_add(w.bytes);
                            }
                            None => blocked.push(Blocker {
                                key,
                                limit,
                                ahead: 1,
                                ahead_bytes: w.bytes,
                            }),
                        }
                        out.next = Some(out.next.map_or(w.deadline, |n| n.min(w.deadline)));
                        kept.push_back(w);
                        continue;
                    }
                }
            };
            self.count(&w, false);
            out.woken.push(w.settle(outcome));
        }
        *queue = kept;
        out
    }

    /// Takes `w` out of the queue if it is still there (its owner gave up); returns its
    /// outcome if one came first, for the caller to keep or drop outside every lock.
    pub(crate) fn cancel(&self, w: &Arc<Waiter<T>>) -> Option<Result<T, MemError>> {
        {
            let mut queue = lock(&self.queue);
            if let Some(i) = queue.iter().position(|x| Arc::ptr_eq(x, w)) {
                queue.remove(i);
                self.count(w, false);
                self.cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        w.take_outcome()
    }
}

/// The waiting requests' clock: the thread that retries them (memory freed through the global
/// allocator wakes nobody) and times them out sleeps on this. Plain `std` types: the thread is
/// not part of the loom models.
#[derive(Default)]
pub(crate) struct Ticker {
    state: std::sync::Mutex<TickerState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct TickerState {
    /// The process that started the thread, if one did: a child of `fork` inherits this
    /// state but not the thread, and must start its own.
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models keep no deadlines")
    )]
    started_by: Option<u32>,
    stopped: bool,
    /// Set by `nudge`, cleared by `sleep`: a request joined while the thread was not asleep.
    nudged: bool,
}

impl Ticker {
    fn state(&self) -> std::sync::MutexGuard<'_, TickerState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    #[cfg(not(nodedb_mem_loom))]
    /// Runs `start` (which starts the thread) unless it ran and succeeded before in this
    /// process (a child of `fork` has no thread of its parent's).
    pub(crate) fn start_once<E>(&self, start: impl FnOnce() -> Result<(), E>) -> Result<(), E> {
        let mut s = self.state();
        let me = std::process::id();
        if s.started_by != Some(me) {
            start()?;
            s.started_by = Some(me);
        }
        Ok(())
    }

    /// Wakes the thread (a request joined a queue).
    pub(crate) fn nudge(&self) {
        self.state().nudged = true;
        self.wake.notify_all();
    }

    #[cfg(not(nodedb_mem_loom))]
    /// Sleeps for `timeout` or until nudged or stopped; returns false once stopped.
    pub(crate) fn sleep(&self, timeout: Duration) -> bool {
        let mut s = self.state();
        if !s.nudged && !s.stopped {
            s = match self.wake.wait_timeout(s, timeout) {
                Ok((g, _)) => g,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
        s.nudged = false;
        !s.stopped
    }

    pub(crate) fn stop(&self) {
        self.state().stopped = true;
        self.wake.notify_all();
    }
}
