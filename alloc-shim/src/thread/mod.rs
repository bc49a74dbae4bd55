//! Per-thread state of the allocation path: the current engine (set by [`EngineGuard`]), the
//! *home* engine whose arena the thread is bound to, and what the thread has not yet settled
//! into the ledger (see `accounting/ledger.rs` for the bounds and `events.rs` for jemalloc's
//! counters). The only module that touches the thread-local ([`with`], [`state`]).
//!
//! # Home and visits
//!
//! jemalloc's fast path (`malloc` / `sdallocx` with no flags) serves a thread from the arena it
//! is bound to, through its thread cache. The thread cache is per thread, not per arena, so
//! rebinding a thread to another arena needs a cache flush (~0.4–5.5 µs). So a thread has a
//! *home* engine, whose allocations take the fast path, and *visits* other engines: a visit
//! allocates with `MALLOCX_ARENA(engine) | MALLOCX_TCACHE(this thread's cache for engine)`,
//! and frees of blocks owned by any engine but home go to the owner's explicit cache, never the
//! default one, so the default cache only ever holds home blocks. After [`HOME_SWITCH_AFTER`]
//! allocations visiting the current engine within one guard scope, the thread makes it home
//! (rebind + flush). Entering or leaving a guard is a few thread-local writes.
//!
//! Home-path allocations are home's by construction (the thread's bound arena, through a cache
//! that only ever holds home's blocks) and are settled to home from jemalloc's counters; every
//! other charge, and every credit, goes to the engine that owns the pointer by address, so the
//! ledger stays exact whichever thread frees a block.

pub(crate) mod events;
pub(crate) mod guard;
mod placement;
pub(crate) mod sampling;
mod settle;

pub use guard::{EngineGuard, GUARD_SLOTS};

use std::cell::Cell;
use std::ffi::c_uint;
use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::accounting::bound::FAST_MAX;
use crate::id::{Arena, EngineId, Node, SLOTS, Slot};
use guard::GuardStack;

/// Consecutive allocations visiting one engine after which a thread moves its home there.
pub const HOME_SWITCH_AFTER: u32 = 128;

/// Where a thread stands with jemalloc's counting of its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Not registered yet: every operation charges and credits at once.
    Unregistered,
    /// Registered: its exit flush is set and jemalloc's counters known, so it may hold
    /// headroom and unsettled home bytes. `alloc_armed` / `free_armed`: jemalloc has called
    /// the thread-event hook for an allocation / a free on this thread, so its interval is
    /// armed in that direction and the home path may leave that direction to it.
    Counting { alloc_armed: bool, free_armed: bool },
    /// The exit flush has run (the thread is tearing down): no home, no batching, no caches;
    /// every operation names its arena explicitly and is charged at once.
    Detached,
}

/// This thread's explicit jemalloc cache for one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Cache {
    /// Not needed yet.
    Untried,
    /// Creating one failed (or the thread is detached): go uncached.
    Failed,
    /// The cache's index.
    Made(c_uint),
}

pub(crate) struct ThreadState {
    /// Engine of the most recently entered guard still alive (see [`EngineGuard`]).
    current: Cell<Slot>,
    /// The thread's live guards.
    guards: GuardStack,
    /// Engine whose arena this thread is bound to (meaningless once detached).
    home: Cell<Slot>,
    phase: Cell<Phase>,
    /// Whether the home path may allocate for home without asking (headroom held, hook armed
    /// for allocations).
    fast_open: Cell<bool>,
    /// [`FAST_MAX`] while the home path is open and the current engine is home, else 0; kept
    /// up to date by every change of either. The home path's one test is
    /// `size | align <= alloc_limit`.
    alloc_limit: Cell<usize>,
    /// The home path frees a block at `ptr` without asking when
    /// `ptr - free_start < free_len` (wrapping): the addresses of home's range while the hook
    /// is armed for frees (for `Unattributed`, everything outside the ranges, as a wrapped
    /// range), an empty range (`free_len == 0`) otherwise.
    free_start: Cell<usize>,
    free_len: Cell<usize>,
    /// jemalloc's counters of this thread's allocated and deallocated bytes (null until
    /// registered).
    allocatedp: Cell<*const u64>,
    deallocatedp: Cell<*const u64>,
    /// Bytes of those counters that slower paths charged or credited directly.
    excluded: [Cell<u64>; 2],
    /// Home bytes (counters less `excluded`) already settled into the ledger.
    settled: [Cell<u64>; 2],
    /// The counters when the current slow operation began (valid while `in_slow`).
    slow_start: [Cell<u64>; 2],
    in_slow: Cell<bool>,
    /// Bytes charged to `home` ahead of this thread's allocations as of the last settlement:
    /// `0`, or within the bound's headroom band (see `accounting/ledger.rs`).
    headroom: Cell<u64>,
    /// Hook calls and settlements on this thread (see [`thread_settlements`]).
    events: Cell<u64>,
    settlements: Cell<u64>,
    /// Allocations visiting the current engine since a guard was last entered or left.
    visits: Cell<u32>,
    /// The automatic arena jemalloc gave this thread, learnt at the first move of home.
    auto_arena: Cell<Option<Arena>>,
    /// Which of its engines' arenas per node this thread uses (`None` until first needed).
    shard: Cell<Option<u8>>,
    /// The NUMA node whose arenas serve this thread (`None` until first needed: sampled with
    /// `sched_getcpu` then, and set again when the thread is pinned).
    node: Cell<Option<Node>>,
    /// This thread's explicit jemalloc cache for each slot (engine, or engine's overflow) it
    /// visits or frees foreign blocks of.
    tcaches: [Cell<Cache>; SLOTS],
    /// The heap-profile sampler's gate (see `sampling.rs`): 0, or `GATE_OPEN` while the
    /// allocation in flight is to be sampled.
    sample_gate: Cell<usize>,
    /// jemalloc's allocated counter at which the next sample falls (`u64::MAX`: clock
    /// stopped), and the sampler's random state.
    sample_at: Cell<u64>,
    /// The mean interval `sample_at` was drawn with.
    clock_mean: Cell<u64>,
    /// The allocated counter at the previous thread-event hook, the program's bytes between
    /// the last two hooks, and the sampler's own bytes since the last.
    last_tick: Cell<u64>,
    gap: Cell<u64>,
    own_bytes: Cell<u64>,
    rng: Cell<u64>,
    /// The tag the thread's samples carry (a scope's id in the governor; 0: none).
    sample_tag: Cell<u64>,
}

impl ThreadState {
    const fn new() -> ThreadState {
        ThreadState {
            current: Cell::new(Slot::UNATTRIBUTED),
            guards: GuardStack::new(),
            home: Cell::new(Slot::UNATTRIBUTED),
            phase: Cell::new(Phase::Unregistered),
            fast_open: Cell::new(false),
            alloc_limit: Cell::new(0),
            free_start: Cell::new(0),
            free_len: Cell::new(0),
            allocatedp: Cell::new(ptr::null()),
            deallocatedp: Cell::new(ptr::null()),
            excluded: [const { Cell::new(0) }; 2],
            settled: [const { Cell::new(0) }; 2],
            slow_start: [const { Cell::new(0) }; 2],
            in_slow: Cell::new(false),
            headroom: Cell::new(0),
            events: Cell::new(0),
            settlements: Cell::new(0),
            visits: Cell::new(0),
            auto_arena: Cell::new(None),
            shard: Cell::new(None),
            node: Cell::new(None),
            tcaches: [const { Cell::new(Cache::Untried) }; SLOTS],
            sample_gate: Cell::new(0),
            sample_at: Cell::new(u64::MAX),
            clock_mean: Cell::new(0),
            last_tick: Cell::new(0),
            gap: Cell::new(1),
            own_bytes: Cell::new(0),
            rng: Cell::new(0),
            sample_tag: Cell::new(0),
        }
    }

    /// The engine this thread's allocations are for now.
    #[inline(always)]
    pub(crate) fn current(&self) -> Slot {
        self.current.get()
    }

    /// Whether `slot` is this thread's home (never, once detached).
    #[inline(always)]
    pub(crate) fn is_home(&self, slot: Slot) -> bool {
        slot == self.home.get() && !self.is_detached()
    }

    /// Whether the current engine is home.
    #[inline(always)]
    pub(crate) fn at_home(&self) -> bool {
        self.is_home(self.current())
    }

    /// Whether this thread's exit flush has run (it is tearing down).
    #[inline(always)]
    pub(crate) fn is_detached(&self) -> bool {
        self.phase.get() == Phase::Detached
    }

    /// Whether jemalloc counts for this thread (its exit flush registered, not yet run).
    #[inline(always)]
    pub(crate) fn is_registered(&self) -> bool {
        matches!(self.phase.get(), Phase::Counting { .. })
    }

    /// Whether the home path may allocate for home (the current engine aside).
    #[inline(always)]
    pub(crate) fn fast_alloc_open(&self) -> bool {
        self.fast_open.get()
    }

    /// The largest request (and alignment, in one mask) the home path takes now: `FAST_MAX`
    /// while the current engine is home with headroom, else 0.
    #[inline(always)]
    pub(crate) fn alloc_limit(&self) -> usize {
        self.alloc_limit.get()
    }

    /// Whether the home path may free the block at `ptr` (home's, with the hook armed).
    #[inline(always)]
    pub(crate) fn frees_fast(&self, ptr: *const u8) -> bool {
        (ptr as usize).wrapping_sub(self.free_start.get()) < self.free_len.get()
    }

    /// Makes `engine` current.
    #[inline(always)]
    fn set_current(&self, engine: Slot) {
        self.current.set(engine);
        self.update_alloc_limit();
    }

    /// `alloc_limit` from the home path's state and the current engine.
    #[inline(always)]
    fn update_alloc_limit(&self) {
        let open = self.fast_open.get() && self.current.get() == self.home.get();
        self.alloc_limit.set(if open { FAST_MAX } else { 0 });
    }

    /// Pushes a guard for `engine`; returns its depth and the engine current before it.
    #[inline(always)]
    pub(crate) fn enter_guard(&self, engine: Slot) -> (u32, Slot) {
        self.visits.set(0);
        let depth = self.guards.push(engine);
        let previous = self.current.get();
        self.set_current(engine);
        (depth, previous)
    }

    /// Drops the guard entered at `depth` (see `GuardStack::pop`).
    #[inline(always)]
    pub(crate) fn leave_guard(&self, depth: u32, previous: Slot) {
        self.visits.set(0);
        if let Some(current) = self.guards.pop(depth, previous) {
            self.set_current(current);
        }
    }
}

/// Registered (on a thread's first operation that may leave anything unsettled) to settle
/// when the thread exits. The state itself has no destructor, so reaching it costs nothing on
/// the hot path and it stays usable during the whole of the thread's teardown.
struct ExitFlush;

impl Drop for ExitFlush {
    fn drop(&mut self) {
        let _ = THREAD.try_with(ThreadState::detach);
    }
}

thread_local! {
    static THREAD: ThreadState = const { ThreadState::new() };
    static EXIT_FLUSH: ExitFlush = const { ExitFlush };
}

/// The calling thread's state. It has no destructor, so it is reachable for the whole life of
/// the thread, teardown included; `try_with` cannot fail for it, and `None` (which callers
/// route to the detached path) is only there so no panic path exists. The pointer is valid on
/// this thread for the thread's whole life, and only this thread touches what it points at.
#[inline(always)]
pub(crate) fn state() -> Option<*const ThreadState> {
    THREAD.try_with(|t| t as *const ThreadState).ok()
}

/// Runs `f` on the calling thread's state (`None` where it is unreachable).
#[inline(always)]
pub(crate) fn with<R>(f: impl FnOnce(&ThreadState) -> R) -> Option<R> {
    THREAD.try_with(f).ok()
}

/// Whether the calling thread's exit flush is registered (registering it now if not); false
/// once it has run.
fn exit_flush_alive() -> bool {
    EXIT_FLUSH.try_with(|_| ()).is_ok()
}

/// Settles the calling thread's unsettled bytes and gives back its headroom now, so
/// [`charged`](crate::ctl::ledger::charged) holds exactly the thread's live bytes. Threads do
/// this by themselves when they exit; the next allocation buys headroom again.
pub fn flush_thread() {
    let _ = with(ThreadState::flush);
}

/// How often jemalloc's thread-event hook has fired on the calling thread, and how often the
/// thread has settled its home delta into the ledger (at those calls, at guard changes that
/// move home, at [`flush_thread`], and on the checked path where the hook is not armed).
pub fn thread_settlements() -> (u64, u64) {
    with(|t| (t.events.get(), t.settlements.get())).unwrap_or((0, 0))
}

/// The engine the calling thread's allocations are attributed to now.
pub fn current_engine() -> EngineId {
    with(|t| t.current().engine()).unwrap_or(EngineId::Unattributed)
}

/// The calling thread's home engine (see the module docs of the allocator).
pub fn home_engine() -> EngineId {
    with(|t| {
        if t.is_detached() {
            EngineId::Unattributed
        } else {
            t.home.get().engine()
        }
    })
    .unwrap_or(EngineId::Unattributed)
}

static HOME_SWITCHES: AtomicU64 = AtomicU64::new(0);
static TCACHES_CREATED: AtomicU64 = AtomicU64::new(0);

/// How many times threads have moved their home engine (each costs a cache flush).
pub fn home_switches() -> u64 {
    HOME_SWITCHES.load(Ordering::Relaxed)
}

/// Explicit thread caches created so far (one per thread and engine visited; jemalloc allows
/// about 4,000 per process, after which visits go uncached).
pub fn explicit_caches_created() -> u64 {
    TCACHES_CREATED.load(Ordering::Relaxed)
}
