//! Waiting admission: requests queued per engine, first come first served, granted as memory is
//! released or lent.
//!
//! # Rules
//!
//! * One queue per engine. Only the head of a queue is tried: a large request is not passed by
//!   smaller ones behind it. A new request joins the back of its engine's queue, and tries for
//!   memory at once only when the queue is empty.
//! * A request leaves its queue exactly once, under the queue's lock: granted (its reservation
//!   is stored in its slot), failed (its scope was removed), timed out, or cancelled by its
//!   owner. At its deadline a request gets one last attempt only if no earlier request of its
//!   queue still waits; behind one, it times out untried (`QueuedBehind`), so no request ever
//!   takes memory ahead of an earlier one, deadlines included. A grant the owner no longer
//!   wants (a future dropped just after) is taken back out of the slot and dropped, which
//!   releases it: memory is never both granted and lost.
//! * No wake-up is lost: a request counts itself in `waiting` and then, after a sequentially
//!   consistent fence, makes its first attempt; every release gives its bytes back and then,
//!   after a fence of its own, reads `waiting`. The two fences are ordered, so either the
//!   request's attempt sees the released bytes, or the release sees the request and serves
//!   the queues. (A release writes nothing shared for this: `waiting` is only read.)
//!
//! The grant type is generic so that this module needs nothing from the ledger.

use std::collections::VecDeque;
use std::task::Waker;
use std::time::{Duration, Instant};

use crate::EngineId;
use crate::error::MemError;
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
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models keep no deadlines")
    )]
    pub(crate) since: Instant,
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models keep no deadlines")
    )]
    pub(crate) deadline: Instant,
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

/// What an attempt for the head of a queue says.
pub(crate) enum Attempt<T> {
    Granted(T),
    /// No room yet: the request stays at the head.
    Wait,
    /// It can never be granted (its scope was removed).
    Fail(MemError),
}

/// Per-engine figures of the queues.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct QueueFigures {
    pub(crate) waiters: u64,
    pub(crate) waiting_bytes: u64,
}

/// Every engine's queue of waiting requests.
pub(crate) struct Queues<T> {
    queues: Mutex<[VecDeque<Arc<Waiter<T>>>; EngineId::COUNT]>,
    /// Requests queued, in all queues: read by every release (see the module's rules).
    waiting: crossbeam_utils::CachePadded<AtomicU64>,
    figures: [AtomicU64; EngineId::COUNT],
    bytes: [AtomicU64; EngineId::COUNT],
    pub(crate) granted: AtomicU64,
    pub(crate) timed_out: AtomicU64,
    pub(crate) cancelled: AtomicU64,
}

impl<T> Queues<T> {
    pub(crate) fn new() -> Queues<T> {
        Queues {
            queues: Mutex::new(Default::default()),
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
        let queues = lock(&self.queues);
        let n = queues
            .iter()
            .flatten()
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

    /// Queues `w`, unless its engine's queue is empty and `try_now` grants it at once (then
    /// returns the grant, and `w` never joined).
    pub(crate) fn join(
        &self,
        w: &Arc<Waiter<T>>,
        try_now: impl FnOnce() -> Attempt<T>,
    ) -> Option<Result<T, MemError>> {
        let mut queues = lock(&self.queues);
        let q = &mut queues[w.engine.index()];
        self.waiting.fetch_add(1, Ordering::AcqRel);
        crate::sync::fence(Ordering::SeqCst);
        if q.is_empty() {
            match try_now() {
                Attempt::Granted(t) => {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Some(Ok(t));
                }
                Attempt::Fail(e) => {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    return Some(Err(e));
                }
                Attempt::Wait => {}
            }
        }
        q.push_back(Arc::clone(w));
        self.count(w, true);
        None
    }

    /// Tries the head of every queue, and the next while heads are granted.
    pub(crate) fn serve(&self, mut attempt: impl FnMut(&Waiter<T>) -> Attempt<T>) {
        let mut woken = Vec::new();
        {
            let mut queues = lock(&self.queues);
            for q in queues.iter_mut() {
                while let Some(head) = q.front() {
                    let outcome = match attempt(head) {
                        Attempt::Wait => break,
                        Attempt::Granted(t) => {
                            self.granted.fetch_add(1, Ordering::Relaxed);
                            Ok(t)
                        }
                        Attempt::Fail(e) => Err(e),
                    };
                    let Some(head) = q.pop_front() else { break };
                    self.count(&head, false);
                    woken.push(head.settle(outcome));
                }
            }
        }
        woken.into_iter().for_each(Wake::wake);
    }

    #[cfg(not(nodedb_mem_loom))]
    /// Takes every request whose deadline has passed out of its queue, under the queues' lock
    /// and in queue order; returns the earliest deadline still waiting, and what `report_of`
    /// made of the refusals (to report outside the lock, where a `tracing` subscriber may run).
    ///
    /// First come first served holds at deadlines: a request with no earlier request still
    /// waiting in its queue gets one last attempt (`last`, quiet), granted or refused; one
    /// behind an earlier request still waiting is not tried at all, and times out with
    /// [`MemError::QueuedBehind`], so it never takes memory an earlier request waits for. An
    /// owner that cancels meanwhile finds no outcome; a grant that comes after is dropped
    /// (released) with the request.
    pub(crate) fn expire<R>(
        &self,
        now: Instant,
        mut last: impl FnMut(&Waiter<T>) -> Result<T, MemError>,
        mut report_of: impl FnMut(&Waiter<T>, &MemError) -> Option<R>,
    ) -> (Option<Instant>, Vec<R>) {
        let mut woken = Vec::new();
        let mut reports = Vec::new();
        let mut next: Option<Instant> = None;
        {
            let mut queues = lock(&self.queues);
            for q in queues.iter_mut() {
                if !q.iter().any(|w| w.deadline <= now) {
                    for w in q.iter() {
                        next = Some(next.map_or(w.deadline, |n| n.min(w.deadline)));
                    }
                    continue;
                }
                let (mut ahead, mut ahead_bytes) = (0u64, 0u64);
                let mut kept = VecDeque::with_capacity(q.len());
                while let Some(w) = q.pop_front() {
                    if w.deadline > now {
                        next = Some(next.map_or(w.deadline, |n| n.min(w.deadline)));
                        ahead += 1;
                        ahead_bytes += w.bytes;
                        kept.push_back(w);
                        continue;
                    }
                    self.count(&w, false);
                    let waited = now.saturating_duration_since(w.since);
                    let refusal = if ahead == 0 {
                        match last(&w) {
                            Ok(t) => {
                                self.granted.fetch_add(1, Ordering::Relaxed);
                                woken.push(w.settle(Ok(t)));
                                continue;
                            }
                            // Not a lack of memory (its scope was removed): that error as it is.
                            Err(e) if !e.is_over_budget() => {
                                woken.push(w.settle(Err(e)));
                                continue;
                            }
                            Err(refusal) => {
                                reports.extend(report_of(&w, &refusal));
                                refusal
                            }
                        }
                    } else {
                        MemError::QueuedBehind {
                            engine: w.engine,
                            ahead,
                            ahead_bytes,
                        }
                    };
                    self.timed_out.fetch_add(1, Ordering::Relaxed);
                    woken.push(w.settle(Err(MemError::WaitTimedOut {
                        waited,
                        refusal: Box::new(refusal),
                    })));
                }
                *q = kept;
            }
        }
        woken.into_iter().for_each(Wake::wake);
        (next, reports)
    }

    /// How many requests wait in `engine`'s queue, and for how many bytes.
    pub(crate) fn ahead_of_new(&self, engine: EngineId) -> (u64, u64) {
        let queues = lock(&self.queues);
        let q = &queues[engine.index()];
        (q.len() as u64, q.iter().map(|w| w.bytes).sum())
    }

    /// Takes `w` out of its queue if it is still there (its owner gave up); returns its
    /// outcome if one came first, for the caller to keep or drop outside every lock.
    pub(crate) fn cancel(&self, w: &Arc<Waiter<T>>) -> Option<Result<T, MemError>> {
        {
            let mut queues = lock(&self.queues);
            let q = &mut queues[w.engine.index()];
            if let Some(i) = q.iter().position(|x| Arc::ptr_eq(x, w)) {
                q.remove(i);
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
