//! The optional background thread that rebalances on an interval.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{MemError, Result};
use crate::governor::MemoryGovernor;

/// Handle of the background thread started by
/// [`MemoryGovernor::spawn_rebalancer`]. Dropping it stops the thread and waits for it.
///
/// ```
/// use std::time::Duration;
/// use nodedb_mem::MemoryGovernor;
///
/// let gov = MemoryGovernor::builder().global_ceiling(64 << 20).build()?;
/// let bg = gov.spawn_rebalancer(Duration::from_millis(100))?;
/// // ... the engines run; every 100 ms idle ones lend to busy ones ...
/// let steps_run = bg.stop();
/// # let _ = steps_run;
/// # Ok::<(), nodedb_mem::MemError>(())
/// ```
pub struct Rebalancer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<u64>>,
}

struct Shared {
    stop: AtomicBool,
}

impl fmt::Debug for Rebalancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rebalancer")
            .field("running", &self.thread.is_some())
            .finish()
    }
}

impl Rebalancer {
    pub(crate) fn spawn(gov: MemoryGovernor, interval: Duration) -> Result<Rebalancer> {
        if interval.is_zero() {
            return Err(MemError::config(
                "rebalance interval",
                "0 s",
                "must be above zero",
            ));
        }
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
        });
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("nodedb-mem-rebalancer".into())
            .spawn(move || {
                use nodedb_mem_alloc::ctl::wake;
                let mut ticks = 0u64;
                let mut state = crate::tick::TickState::new(interval, gov.inner.background_stretch);
                // Read before a tick looks at anything: a signal from then on ends a stretched
                // sleep at once, even one that came before the thread marked it stretched.
                let mut seen = wake::wake_seq();
                loop {
                    if !state.stretched() {
                        // At the interval, signals during the tick do not cut the sleep short
                        // (a storm of them would keep the thread busy); a stop still does.
                        seen = wake::wake_seq();
                    }
                    if theirs.stop.load(Ordering::Acquire) {
                        return ticks;
                    }
                    // A charge past a mark already: no longer quiet, back to the interval.
                    if state.stretched() && !gov.arm_wake_marks(&state) {
                        state.unstretch();
                    }
                    wake::sleep(seen, state.sleep());
                    if theirs.stop.load(Ordering::Acquire) {
                        return ticks;
                    }
                    seen = wake::wake_seq();
                    // A panic in a step (a `tracing` subscriber's, say; reclaimers are caught
                    // one by one) is reported, and the next tick runs as usual: resident
                    // sampling, push-out and rebalancing must not stop for good.
                    let tick = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        gov.background_tick(&mut state);
                    }));
                    if let Err(payload) = tick {
                        gov.report_background_panic(&*payload);
                    }
                    // What this thread allocated is settled before it sleeps: the ledgers
                    // are exact at rest.
                    nodedb_mem_alloc::ctl::thread::flush_thread();
                    ticks += 1;
                }
            })
            .map_err(|source| MemError::Io {
                what: "spawning the rebalancer thread".into(),
                source,
            })?;
        Ok(Rebalancer {
            shared,
            thread: Some(thread),
        })
    }

    /// Stops the thread, waits for it, and returns how many rebalance steps it ran.
    pub fn stop(mut self) -> u64 {
        self.shutdown()
    }

    fn shutdown(&mut self) -> u64 {
        self.shared.stop.store(true, Ordering::Release);
        nodedb_mem_alloc::ctl::wake::wake();
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(ticks)) => ticks,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => 0,
        }
    }
}

impl Drop for Rebalancer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}
