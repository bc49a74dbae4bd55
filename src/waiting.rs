//! Waiting for memory: reservations that block until a deadline, or futures that are safe to
//! cancel, queued in arrival order and served so that no request takes memory an earlier one
//! waits for (the queue's rules are in `wait`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
#[cfg(not(nodedb_mem_loom))]
use std::time::Instant;

use crate::EngineId;
use crate::error::{MemError, Result};
use crate::governor::MemoryGovernor;
use crate::ledger::{Ledger, Reservation};
use crate::scope::Scope;
use crate::sync::Arc;
use crate::wait::Waiter;

/// How often waiting requests are retried while they wait: memory freed through the global
/// allocator wakes nobody, so the serving thread (and a blocked caller) looks again this often.
/// Reservations released, credits, changed limits and rebalancing serve the queue at once.
pub const WAIT_RETRY: Duration = Duration::from_millis(5);

/// How long the serving thread sleeps when nothing waits (it is woken when a request joins).
#[cfg(not(nodedb_mem_loom))]
const IDLE: Duration = Duration::from_secs(1);

enum Started {
    Done(Result<Reservation>),
    Queued(Arc<Waiter<Reservation>>),
}

impl MemoryGovernor {
    /// Reserves `bytes` for `engine` (in `scope`, if given), waiting up to `timeout` for memory
    /// released by others or lent by rebalancing, instead of refusing at once.
    ///
    /// Requests wait in arrival order. A request is granted before every later request that
    /// competes for the memory it lacks (the limit that refused it: its engine's budget, a
    /// scope on its path, or the ceiling), so a large request is not starved by smaller ones
    /// after it; and it never waits behind a request held back by a limit off its own path,
    /// so one tenant held back by its scope's limit never holds back another tenant. A new
    /// request is tried at once, in its place after every earlier one. (Plain
    /// [`reserve`](Self::reserve) and the allocator do not queue: they take what fits when
    /// they ask.) A waiting engine counts as busy to the rebalancer, with what it waits for as
    /// demand. Reservations dropped, credits, changed limits and rebalancing steps serve the
    /// queue at once; memory freed through the global allocator is noticed within
    /// [`WAIT_RETRY`].
    ///
    /// At the deadline the request gets one last attempt, unless an earlier request still
    /// waits at a limit on its path; then the error is [`MemError::WaitTimedOut`], with how
    /// long it waited and the refusal ([`MemError::BudgetExceeded`],
    /// [`MemError::ScopeExceeded`], [`MemError::CeilingExceeded`], or
    /// [`MemError::QueuedBehind`] naming the limit the earlier requests wait at). Refused
    /// without waiting, with [`MemError::NeverFits`] naming the limit: a request larger than
    /// the engine's cap (the most rebalancing can lend it), the limit of a scope on its path,
    /// or the ceiling (and a waiting request when such a limit is lowered under it). Also
    /// refused: a removed scope ([`MemError::ScopeRemoved`], also given to a request whose
    /// scope is removed while it waits), another governor's scope. A zero `timeout` makes it
    /// one attempt in its place: like `reserve`, or `QueuedBehind`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use nodedb_mem::{EngineId, MemoryGovernor};
    ///
    /// let gov = MemoryGovernor::builder()
    ///     .global_ceiling(64 << 20)
    ///     .budget(EngineId::Query, 8u64 << 20)
    ///     .build()?;
    /// let held = gov.reserve(EngineId::Query, 6 << 20)?;
    /// let g = gov.clone();
    /// let releaser = std::thread::spawn(move || {
    ///     std::thread::sleep(Duration::from_millis(50));
    ///     drop(held);
    ///     g
    /// });
    /// // 6 + 4 > 8: this waits until the other thread drops its 6 MiB.
    /// let r = gov.reserve_blocking(EngineId::Query, None, 4 << 20, Duration::from_secs(10))?;
    /// assert_eq!(r.size(), 4 << 20);
    /// # releaser.join().unwrap();
    /// let err = gov
    ///     .reserve_blocking(EngineId::Query, None, 6 << 20, Duration::from_millis(20))
    ///     .unwrap_err();
    /// assert!(err.to_string().ends_with(
    ///     "cannot reserve 6 MiB for engine query: 4 MiB already used of its 8 MiB limit, 4 MiB available"
    /// ));
    /// # Ok::<(), nodedb_mem::MemError>(())
    /// ```
    #[cfg(not(nodedb_mem_loom))]
    pub fn reserve_blocking(
        &self,
        engine: EngineId,
        scope: Option<&Scope>,
        bytes: u64,
        timeout: Duration,
    ) -> Result<Reservation> {
        let ledger = &self.inner.ledger;
        let w = match self.start_waiting(engine, scope, bytes, timeout)? {
            Started::Done(outcome) => return outcome,
            Started::Queued(w) => w,
        };
        loop {
            if let Some(outcome) = w.outcome_or_wake(None) {
                return outcome;
            }
            // The serving thread retries and times out requests; this caller serves too, so
            // that a late thread cannot keep it past its deadline. If a pass settles it, its
            // outcome comes with an unpark.
            let left = w.deadline.saturating_duration_since(Instant::now());
            std::thread::park_timeout(left.min(WAIT_RETRY));
            if !w.has_outcome() {
                Ledger::serve_waiters(ledger);
            }
        }
    }

    /// [`reserve_blocking`](Self::reserve_blocking) as a future: the request joins the queue
    /// (and is tried in its place) when this is called, and the future resolves to the reservation or to
    /// the same errors. Dropping it cancels the request: it leaves the queue, and a reservation
    /// granted in the meantime is released, so cancelling (a `select!`, a timeout of the
    /// runtime's own) never loses memory. Its deadline is kept by the governor's serving
    /// thread, so it needs no particular runtime.
    ///
    /// ```
    /// use std::time::Duration;
    /// use nodedb_mem::{EngineId, MemoryGovernor};
    ///
    /// let gov = MemoryGovernor::builder()
    ///     .global_ceiling(64 << 20)
    ///     .budget(EngineId::Query, 8u64 << 20)
    ///     .build()?;
    /// let held = gov.reserve(EngineId::Query, 6 << 20)?;
    /// let waiting = gov.reserve_async(EngineId::Query, None, 4 << 20, Duration::from_secs(10));
    /// assert_eq!(gov.snapshot().engine(EngineId::Query).waiters, 1);
    /// drop(held);
    /// let r = futures_lite_block_on(waiting)?;
    /// assert_eq!(gov.usage(EngineId::Query), 4 << 20);
    /// # drop(r);
    /// # fn futures_lite_block_on<F: std::future::Future>(f: F) -> F::Output {
    /// #     let mut f = std::pin::pin!(f);
    /// #     let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    /// #     loop {
    /// #         if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) { return v; }
    /// #         std::thread::sleep(Duration::from_millis(1));
    /// #     }
    /// # }
    /// # Ok::<(), nodedb_mem::MemError>(())
    /// ```
    pub fn reserve_async(
        &self,
        engine: EngineId,
        scope: Option<&Scope>,
        bytes: u64,
        timeout: Duration,
    ) -> Reserving {
        let state = match self.start_waiting(engine, scope, bytes, timeout) {
            Ok(Started::Done(outcome)) => State::Ready(outcome),
            Err(e) => State::Ready(Err(e)),
            Ok(Started::Queued(w)) => State::Queued(w),
        };
        Reserving {
            ledger: Arc::clone(&self.inner.ledger),
            state,
        }
    }

    /// Checks a waiting request and queues it, tried at once in its place (after every earlier
    /// request).
    fn start_waiting(
        &self,
        engine: EngineId,
        scope: Option<&Scope>,
        bytes: u64,
        timeout: Duration,
    ) -> Result<Started> {
        let ledger = &self.inner.ledger;
        if let Some(s) = scope
            && !ledger.scopes.owns(s)
        {
            return Err(MemError::foreign_scope(s.path()));
        }
        if let Some(never) = ledger.never_fits(engine, scope, bytes) {
            // Refused at once, naming the limit: no release can admit it.
            if let Some(r) = ledger.refusal_of(scope, &never) {
                ledger.report(r);
            }
            return Ok(Started::Done(Err(never)));
        }
        #[cfg(not(nodedb_mem_loom))]
        if !timeout.is_zero() {
            start_serving(ledger)?;
        }
        let w = Waiter::new(engine, scope.cloned(), bytes, timeout);
        Ok(match Ledger::join_waiters(ledger, &w) {
            Some(outcome) => Started::Done(outcome),
            None => {
                ledger.ticker.nudge();
                Started::Queued(w)
            }
        })
    }
}

/// Starts the thread that retries waiting requests and keeps their deadlines, once per
/// governor. It holds the ledger only while it works, and ends when the governor is dropped.
#[cfg(not(nodedb_mem_loom))]
fn start_serving(ledger: &Arc<Ledger>) -> Result<()> {
    ledger.ticker.start_once(|| {
        let weak = Arc::downgrade(ledger);
        let ticker = std::sync::Arc::clone(&ledger.ticker);
        std::thread::Builder::new()
            .name("nodedb-mem-waiters".into())
            .spawn(move || {
                loop {
                    let Some(ledger) = weak.upgrade() else { return };
                    let now = Instant::now();
                    let next = Ledger::serve_waiters(&ledger);
                    let busy = ledger.waiters.anyone_waiting();
                    drop(ledger);
                    // What this thread allocated is settled before it sleeps: the ledgers
                    // are exact at rest.
                    nodedb_mem_alloc::ctl::thread::flush_thread();
                    let nap = match (busy, next) {
                        (false, _) => IDLE,
                        (true, None) => WAIT_RETRY,
                        (true, Some(n)) => n.saturating_duration_since(now).min(WAIT_RETRY),
                    };
                    if !ticker.sleep(nap) {
                        return;
                    }
                }
            })
            .map(drop)
            .map_err(|source| MemError::Io {
                what: "starting the thread that serves waiting reservations".into(),
                source,
            })
    })
}

enum State {
    Ready(Result<Reservation>),
    Queued(Arc<Waiter<Reservation>>),
    Finished,
}

/// A reservation being waited for: see
/// [`MemoryGovernor::reserve_async`]. Dropping it cancels the request and releases whatever it
/// was granted.
pub struct Reserving {
    ledger: Arc<Ledger>,
    state: State,
}

impl std::fmt::Debug for Reserving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Ready(_) => "ready",
            State::Queued(_) => "queued",
            State::Finished => "finished",
        };
        f.debug_struct("Reserving")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl Future for Reserving {
    type Output = Result<Reservation>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Reservation>> {
        let this = &mut *self;
        let outcome = match &this.state {
            State::Queued(w) => match w.outcome_or_wake(Some(cx.waker())) {
                Some(outcome) => outcome,
                None => return Poll::Pending,
            },
            State::Ready(_) => match std::mem::replace(&mut this.state, State::Finished) {
                State::Ready(outcome) => outcome,
                _ => unreachable_finished(),
            },
            State::Finished => unreachable_finished(),
        };
        this.state = State::Finished;
        Poll::Ready(outcome)
    }
}

/// What a `Reserving` polled after it returned gives: an error, not a panic.
fn unreachable_finished() -> Result<Reservation> {
    Err(MemError::config(
        "Reserving",
        "polled again",
        "it has already returned its outcome",
    ))
}

impl Drop for Reserving {
    fn drop(&mut self) {
        if let State::Queued(w) = &self.state {
            // A grant that came before the cancel is dropped here, outside the queue's lock,
            // which releases it (and serves the queue again).
            drop(self.ledger.waiters.cancel(w));
        }
    }
}
