//! [`EngineGuard`]: which engine the calling thread's allocations are attributed to, and the
//! per-thread stack of live guards that decides it whatever order guards are dropped in.

use std::cell::Cell;
use std::marker::PhantomData;

use super::with;
use crate::id::{EngineId, Slot};

/// Guards per thread whose drops may come in any order (deeper ones must drop in reverse).
pub const GUARD_SLOTS: usize = 64;

/// A thread's live guards, in the order entered: the first [`GUARD_SLOTS`] engines with an
/// alive bit each, and the stack's height.
pub(crate) struct GuardStack {
    /// Engines of the live guards, in the order entered.
    engines: [Cell<Slot>; GUARD_SLOTS],
    /// Bit `i` set: the guard entered at depth `i` is alive.
    alive: Cell<u64>,
    /// Guards entered and not yet known dropped: the stack's height.
    depth: Cell<u32>,
}

impl GuardStack {
    pub(crate) const fn new() -> GuardStack {
        GuardStack {
            engines: [const { Cell::new(Slot::UNATTRIBUTED) }; GUARD_SLOTS],
            alive: Cell::new(0),
            depth: Cell::new(0),
        }
    }

    /// Pushes a guard for `engine`; returns its depth.
    #[inline(always)]
    pub(crate) fn push(&self, engine: Slot) -> u32 {
        let depth = self.depth.get();
        if let Some(slot) = self.engines.get(depth as usize) {
            slot.set(engine);
            self.alive.set(self.alive.get() | 1u64.wrapping_shl(depth));
        }
        self.depth.set(depth.saturating_add(1));
        depth
    }

    /// Drops the guard entered at `depth` (`previous`: the engine current when it was entered):
    /// marks it dead and pops the dead guards off the top. Returns the engine now current —
    /// the top live guard's, `Unattributed` when none is left, `previous` beyond the tracked
    /// slots (strict nesting) — or `None` when a deeper guard is still alive and stays current.
    #[inline(always)]
    pub(crate) fn pop(&self, depth: u32, previous: Slot) -> Option<Slot> {
        let slots = GUARD_SLOTS as u32;
        if depth >= slots {
            // Beyond the tracked slots: strictly nested guards only.
            if self.depth.get() == depth + 1 {
                self.depth.set(depth);
            }
            return Some(previous);
        }
        self.alive.set(self.alive.get() & !1u64.wrapping_shl(depth));
        let mut top = self.depth.get();
        if top > slots {
            // Deeper guards are still alive above this one: they stay current.
            return None;
        }
        while top > 0 && self.alive.get() & 1u64.wrapping_shl(top - 1) == 0 {
            top -= 1;
        }
        self.depth.set(top);
        Some(match top.checked_sub(1) {
            Some(i) => self
                .engines
                .get(i as usize)
                .map_or(Slot::UNATTRIBUTED, Cell::get),
            None => Slot::UNATTRIBUTED,
        })
    }
}

/// Attributes the calling thread's allocations to an engine until dropped.
///
/// # Overlapping guards
///
/// A thread's guards form a stack in the order they were entered, and **the current engine is
/// that of the most recently entered guard still alive** (`Unattributed` when none is). So
/// guards may be dropped in any order: dropping an inner guard first restores the outer one's
/// engine, as usual; dropping an outer guard first changes nothing until the inner one goes
/// too; once every guard is gone the thread is back in `Unattributed`, where it started. The
/// rule holds for the first [`GUARD_SLOTS`] (64) guards alive at once on a thread; a guard
/// entered deeper than that restores, when dropped, the engine that was current when it was
/// entered (the rule for strictly nested guards).
///
/// ```
/// use nodedb_mem_alloc::{EngineGuard, EngineId, ctl::thread::current_engine};
///
/// assert_eq!(current_engine(), EngineId::Unattributed);
/// {
///     let _q = EngineGuard::enter(EngineId::Query);
///     assert_eq!(current_engine(), EngineId::Query);
///     {
///         let _v = EngineGuard::enter(EngineId::Vector);
///         assert_eq!(current_engine(), EngineId::Vector);
///     }
///     assert_eq!(current_engine(), EngineId::Query);
/// }
/// assert_eq!(current_engine(), EngineId::Unattributed);
///
/// // Out of order: a `Vec` drops its guards front to back.
/// let guards = vec![EngineGuard::enter(EngineId::Query), EngineGuard::enter(EngineId::Vector)];
/// assert_eq!(current_engine(), EngineId::Vector);
/// drop(guards);
/// assert_eq!(current_engine(), EngineId::Unattributed);
/// ```
///
/// A guard belongs to its thread: it cannot be sent to another one.
///
/// ```compile_fail
/// use nodedb_mem_alloc::{EngineGuard, EngineId};
/// let g = EngineGuard::enter(EngineId::Query);
/// std::thread::spawn(move || drop(g));
/// ```
#[derive(Debug)]
#[must_use = "the engine is current only while the guard lives"]
pub struct EngineGuard {
    /// The guard's depth on its thread's stack, and the engine current before it (`None`:
    /// entered during teardown, when the thread state was unreachable; dropping does nothing).
    entered: Option<(u32, Slot)>,
    _not_send: PhantomData<*const ()>,
}

impl EngineGuard {
    /// Makes `engine` the calling thread's current engine. During thread teardown (after the
    /// thread's state is gone) this does nothing, and allocations stay attributed by address.
    #[inline(always)]
    pub fn enter(engine: EngineId) -> EngineGuard {
        let entered = with(|t| t.enter_guard(Slot::of(engine)));
        EngineGuard {
            entered,
            _not_send: PhantomData,
        }
    }
}

impl Drop for EngineGuard {
    #[inline(always)]
    fn drop(&mut self) {
        if let Some((depth, previous)) = self.entered {
            let _ = with(|t| t.leave_guard(depth, previous));
        }
    }
}
