//! One tick of the background thread, what a quiet tick leaves out, and how long the thread
//! sleeps after it.
//!
//! Every tick reads what can move the process toward its ceiling: resident memory
//! (`/proc/self/status`, kept open), the cgroup's own limit files, the allocator's ledgers and
//! the budgets (atomic loads); it purges near the ceiling, rebalances, sweeps governed
//! directories and delivers events. What costs more and changes slowly is read only when
//! needed:
//! * jemalloc's statistics (a walk over every arena, taking locks allocating threads also
//!   take; 0.7–1.2 ms of CPU from a cold cache on the VM of `docs/benchmarks.md`) when
//!   resident memory is near the ceiling or an engine's dirty pages may have passed its
//!   allowance by the ledger's bound (see `DirtyWatch`);
//! * the cgroup's stall time once a second ([`SLOW_EVERY`]; the kernel updates `avg10` every
//!   two seconds) and its ancestors' limits every five ([`WALK_EVERY`]; a container resized in
//!   place has its own cgroup's limit moved, read on every tick), both on every tick while
//!   global pressure is at `Warning` or above.
//!
//! # Sleeping longer while quiet
//! A timer wake-up alone costs about 0.1 ms of CPU on that VM: at a 100 ms interval, 0.1 % of
//! a core before any work. So after a *quiet* tick the next sleep doubles, up to
//! [`BACKGROUND_STRETCH_MAX`](crate::BACKGROUND_STRETCH_MAX) intervals (or as set with
//! `GovernorBuilder::background_stretch`); any other tick brings it back to the interval. A tick is quiet
//! when the process is far from its limits and nothing moved: resident memory and global
//! usage, plus what the wake marks below let through, under both half the ceiling and the
//! global warning threshold; every engine and the kernel at `Normal` pressure and within its
//! limit; nobody waiting for memory; nothing in overflow (data read back from it faults pages
//! in without allocating); no governed directory to sweep; no limit moved, nothing reclaimed; resident memory and usage moved by less than one step (a 64th of the ceiling)
//! since the last tick.
//!
//! A stretched sleep ends at once when something moves (`nodedb_mem_alloc::ctl::wake`): the
//! allocator wakes the thread when an engine's charge grows by a step or reaches its warning
//! level, or an overflow region grows by a step; the governor does when it records an event (a
//! refusal, a pressure change, a moved ceiling) or queues a waiting request. So memory handed
//! out by the allocator, and every decision of the governor's, is answered by the first tick
//! after it, never later than at the normal interval. Resident memory the governor does not
//! hand out (a library's own `mmap`, stacks, file pages mapped and read) is seen at the next
//! tick, up to [`BACKGROUND_STRETCH_MAX`](crate::BACKGROUND_STRETCH_MAX) intervals later: it would have to grow from under half the
//! ceiling to the RSS margin in that time to be answered late.

use std::time::{Duration, Instant};

use crate::EngineId;
use crate::governor::MemoryGovernor;
use crate::pressure::PressureLevel;
use crate::resident::Stats;
use crate::sync::{Ordering, lock};

/// How often the cgroup's stall time is read while pressure is low.
pub(crate) const SLOW_EVERY: Duration = Duration::from_secs(1);

/// How often the limits of the cgroup's ancestors are read while pressure is low (its own are
/// read on every tick).
pub(crate) const WALK_EVERY: Duration = Duration::from_secs(5);

/// The ledger slots a stretched sleep arms a mark on: every engine's home, and the overflow
/// region of every engine but `Unattributed` (which never overflows).
const MARKED_SLOTS: u64 = 2 * EngineId::COUNT as u64 - 1;

/// What the background thread carries from one tick to the next.
#[derive(Debug)]
pub(crate) struct TickState {
    interval: Duration,
    /// The longest sleep, in intervals.
    stretch: u32,
    /// The next sleep: the interval, or longer after quiet ticks.
    sleep: Duration,
    last_slow: Option<Instant>,
    last_walk: Option<Instant>,
    /// Resident memory and global usage at the last tick.
    last_resident: u64,
    last_usage: u64,
    /// Each engine's allocator charge, and its overflow's, when the last tick began: the
    /// wake marks of a stretched sleep count from there, so memory charged while the tick ran
    /// ends the sleep at once.
    charged: [u64; EngineId::COUNT],
    overflow: [u64; EngineId::COUNT],
}

impl TickState {
    pub(crate) fn new(interval: Duration, stretch: u32) -> TickState {
        TickState {
            interval,
            stretch: stretch.max(1),
            sleep: interval,
            last_slow: None,
            last_walk: None,
            last_resident: 0,
            last_usage: 0,
            charged: [0; EngineId::COUNT],
            overflow: [0; EngineId::COUNT],
        }
    }

    /// How long to sleep before the next tick.
    pub(crate) fn sleep(&self) -> Duration {
        self.sleep
    }

    /// Makes the next sleep the interval.
    pub(crate) fn unstretch(&mut self) {
        self.sleep = self.interval;
    }

    /// Whether the next sleep is longer than the interval (and so arms the wake marks).
    pub(crate) fn stretched(&self) -> bool {
        self.sleep > self.interval
    }
}

impl MemoryGovernor {
    /// One tick of the background thread (see the module's docs); sets the next sleep.
    pub(crate) fn background_tick(&self, st: &mut TickState) {
        let events = self.inner.ledger.events.recorded();
        st.charged = EngineId::ALL.map(nodedb_mem_alloc::ctl::ledger::charged);
        st.overflow = EngineId::ALL.map(nodedb_mem_alloc::ctl::ledger::overflow_charged);
        let pressed = self.global_pressure() >= PressureLevel::Warning;
        let slow = pressed || st.last_slow.is_none_or(|t| t.elapsed() >= SLOW_EVERY);
        if slow {
            st.last_slow = Some(Instant::now());
        }
        let walk = pressed || st.last_walk.is_none_or(|t| t.elapsed() >= WALK_EVERY);
        if walk {
            st.last_walk = Some(Instant::now());
        }
        // A moved cgroup limit moves the ceiling first; the kernel's stall time sets the
        // floor of the global pressure level.
        let followed = self.follow_cgroup_tick(walk).is_some();
        if slow {
            self.sample_cgroup_pressure();
        }
        // Without /proc (not Linux, a sandbox) there is no resident figure to feed back; the
        // budgets still hold.
        let resident = self.resident_step(Stats::IfNeeded).ok().map(|s| s.resident);
        let swept = {
            let dirs = lock(&self.inner.governed_dirs).len();
            if dirs > 0 {
                self.sweep_governed_dirs();
            }
            dirs > 0
        };
        let report = self.rebalance();
        self.pump_events();
        let g = &self.inner.ledger.global;
        // A tick that recorded an event is not quiet: something happened (and the event's
        // signal would end a stretched sleep at once).
        let quiet = !followed
            && !swept
            && self.inner.ledger.events.recorded() == events
            && report.moves.is_empty()
            && report.reclaimed.is_empty()
            && self.is_quiet(st, resident);
        st.sleep = if quiet {
            (st.sleep * 2).min(st.interval * st.stretch)
        } else {
            st.interval
        };
        g.background_sleep_ns.store(
            u64::try_from(st.sleep.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        g.background_ticks.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the process is far from its limits and nothing moved (see the module's docs);
    /// records this tick's figures for the next.
    fn is_quiet(&self, st: &mut TickState, resident: Option<u64>) -> bool {
        let ceiling = self.ceiling();
        let usage = self.global_usage();
        let resident = resident.unwrap_or(usage);
        let step = wake_step(ceiling);
        let moved =
            resident.abs_diff(st.last_resident) >= step || usage.abs_diff(st.last_usage) >= step;
        (st.last_resident, st.last_usage) = (resident, usage);
        let warning = crate::size::fraction_of(ceiling, self.inner.thresholds.warning);
        let reach = resident
            .max(usage)
            .saturating_add(step.saturating_mul(MARKED_SLOTS));
        !moved
            && reach <= warning.min(ceiling / 2)
            && self.global_pressure() == PressureLevel::Normal
            && self.kernel_pressure() == PressureLevel::Normal
            && EngineId::ALL.into_iter().all(|e| {
                self.pressure(e) == PressureLevel::Normal && self.usage(e) <= self.limit(e)
            })
            && !self.inner.ledger.waiters.anyone_waiting()
            // Overflowed data read back faults pages in without any allocation.
            && EngineId::ALL
                .into_iter()
                .all(|e| nodedb_mem_alloc::ctl::ledger::overflow_charged(e) == 0)
    }

    /// Arms the allocator's wake marks for a stretched sleep: each engine's charge may grow by
    /// one step from where it was when the last tick began, and not to its warning level; its
    /// overflow by one step. Returns `false` when a charge is already past its mark (the thread
    /// should sleep only its interval). A standalone governor, which the allocator does
    /// not charge, leaves the marks (the process's, the installed governor's) alone.
    pub(crate) fn arm_wake_marks(&self, st: &TickState) -> bool {
        if !self.is_installed() {
            nodedb_mem_alloc::ctl::wake::stretch();
            return true;
        }
        let step = wake_step(self.ceiling());
        let warning = self.inner.thresholds.warning;
        let home = EngineId::ALL.map(|e| {
            let b = self.budget(e);
            let warn = crate::size::fraction_of(b.limit(), warning).saturating_sub(b.reserved());
            st.charged[e.index()].saturating_add(step).min(warn.max(1))
        });
        let overflow = st.overflow.map(|o| o.saturating_add(step));
        nodedb_mem_alloc::ctl::wake::arm(&home, &overflow)
    }
}

/// The growth that ends a stretched sleep early: a 64th of the ceiling.
fn wake_step(ceiling: u64) -> u64 {
    (ceiling / 64).max(1)
}
