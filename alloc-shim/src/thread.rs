//! Per-thread state of the allocation path: the current engine (set by [`EngineGuard`]), the
//! *home* engine whose arena the thread is bound to, and what the thread has not yet settled
//! into the ledger (see `ledger.rs` for the bounds and `events.rs` for jemalloc's counters).
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

use std::cell::Cell;
use std::ffi::{c_int, c_uint};
use std::ptr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tikv_jemalloc_sys as jem;

use crate::EngineId;
use crate::arena::{SLOTS, arena_of, topology};
use crate::guard::GuardStack;
use crate::ledger;
use crate::mallctl::{self, Mib};
use crate::slot::Slot;

/// Consecutive allocations visiting one engine after which a thread moves its home there.
pub const HOME_SWITCH_AFTER: u32 = 128;

const UNATTRIBUTED: u8 = EngineId::Unattributed as u8;
/// The home of a thread whose exit flush has run: no engine, so every operation takes the
/// immediate (unbatched) path and names its arena explicitly.
const DETACHED: u8 = u8::MAX;
/// The home path's limit while it is open or closed (see `alloc_limit`).
#[inline(always)]
const fn open_limit(open: bool) -> usize {
    if open { crate::ledger::FAST_MAX } else { 0 }
}

/// No engine: the value of `fast_alloc` while the home path is closed.
pub(crate) const CLOSED: u8 = u8::MAX - 1;

/// `flags`: the exit flush is registered and jemalloc's counters are known.
const REGISTERED: u8 = 1;
/// `flags`: jemalloc has called the hook for an allocation on this thread (its allocation
/// interval is armed).
const ALLOC_SEEN: u8 = 2;
/// `flags`: the same for a free.
const DALLOC_SEEN: u8 = 4;
const NO_ARENA: u32 = u32::MAX;
const NO_NODE: u8 = u8::MAX;
const NO_SHARD: u8 = u8::MAX;
/// The shard the next thread to need one gets (taken once per thread).
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

static THREAD_ARENA: Mib<2> = Mib::new(c"thread.arena");
static TCACHE_FLUSH: Mib<3> = Mib::new(c"thread.tcache.flush");
static HOME_SWITCHES: AtomicU64 = AtomicU64::new(0);

/// Resolves `thread.arena` and `thread.tcache.flush` (once, at initialisation).
pub(crate) fn lookup_mibs() -> bool {
    THREAD_ARENA.resolve() && TCACHE_FLUSH.resolve()
}

/// Binds the calling thread to `arena` and flushes its cache (which held the old arena's
/// blocks), returning the arena it was bound to.
fn bind_thread_arena(arena: c_uint) -> Option<c_uint> {
    // SAFETY: `thread.arena` reads and writes an `unsigned`.
    let old = unsafe { THREAD_ARENA.swap::<c_uint>(arena) }.ok()?;
    // Failure (the thread has no cache) is fine.
    TCACHE_FLUSH.run();
    Some(old)
}

pub(crate) struct ThreadState {
    /// Engine of the most recently entered guard still alive (see [`EngineGuard`]).
    current: Cell<u8>,
    /// The thread's live guards.
    guards: GuardStack,
    /// Engine whose arena this thread is bound to.
    home: Cell<u8>,
    /// `home` while the home path may allocate without asking (headroom held, hook armed),
    /// else [`CLOSED`]: the fast path's one test is `current == fast_alloc`.
    fast_alloc: Cell<u8>,
    /// [`FAST_MAX`](crate::FAST_MAX) while `current == fast_alloc`, else 0; kept up to date
    /// by every change of either. The home path's one test is `size | align <= alloc_limit`.
    alloc_limit: Cell<usize>,
    /// The home path frees a block at `ptr` without asking when
    /// `ptr - free_start < free_len` (wrapping): the addresses of home's range while the hook
    /// is armed for frees (for `Unattributed`, everything outside the ranges, as a wrapped
    /// range), an empty range (`free_len == 0`) otherwise.
    free_start: Cell<usize>,
    free_len: Cell<usize>,
    /// `REGISTERED`, `ALLOC_SEEN`, `DALLOC_SEEN`.
    flags: Cell<u8>,
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
    /// `0`, or in `HEADROOM_MIN..=HEADROOM_MAX` (see `ledger.rs`).
    headroom: Cell<u64>,
    /// Hook calls and settlements on this thread (see [`thread_settlements`]).
    events: Cell<u64>,
    settlements: Cell<u64>,
    /// Allocations visiting the current engine since a guard was last entered or left.
    visits: Cell<u32>,
    /// The automatic arena jemalloc gave this thread, learnt at the first move of home.
    auto_arena: Cell<u32>,
    /// Which of its engines' arenas per node this thread uses (`NO_SHARD` until first needed).
    shard: Cell<u8>,
    /// The NUMA node whose arenas serve this thread (`NO_NODE` until first needed: sampled
    /// with `sched_getcpu` then, and set again when the thread is pinned).
    node: Cell<u8>,
    /// This thread's explicit jemalloc cache for each slot (engine, or engine's overflow) it
    /// visits or frees foreign blocks of (`NO_TCACHE` until first needed, `TCACHE_FAILED` if
    /// creating one failed).
    tcaches: [Cell<u32>; SLOTS],
}

/// The addresses of `home`'s blocks as `(start, length)` for a wrapping range test: its range,
/// or for `Unattributed` everything outside the ranges (all memory when there are none).
/// Empty (the home path closed for frees) while the layout may still change.
fn home_addresses(home: Slot) -> (usize, usize) {
    use crate::arena::{Ranges, SLOTS, slot_range};
    if home == Slot::UNATTRIBUTED {
        match slot_range(SLOTS) {
            // `p - end < 2^64 - len` (wrapping) holds exactly for `p` outside `[start, end)`.
            Ranges::At(start, len) => (start.wrapping_add(len), len.wrapping_neg()),
            Ranges::None => (0, usize::MAX),
            Ranges::NotYet => (0, 0),
        }
    } else {
        match slot_range(home.index()) {
            Ranges::At(start, len) => (start, len),
            Ranges::None | Ranges::NotYet => (0, 0),
        }
    }
}

const NO_TCACHE: u32 = u32::MAX;
const TCACHE_FAILED: u32 = u32::MAX - 1;
static TCACHES_CREATED: AtomicU64 = AtomicU64::new(0);

/// Explicit thread caches created so far (one per thread and engine visited; jemalloc allows
/// about 4,000 per process, after which visits go uncached).
pub fn explicit_caches_created() -> u64 {
    TCACHES_CREATED.load(Ordering::Relaxed)
}

impl ThreadState {
    const fn new() -> ThreadState {
        ThreadState {
            current: Cell::new(UNATTRIBUTED),
            guards: GuardStack::new(),
            home: Cell::new(UNATTRIBUTED),
            fast_alloc: Cell::new(CLOSED),
            alloc_limit: Cell::new(0),
            free_start: Cell::new(0),
            free_len: Cell::new(0),
            flags: Cell::new(0),
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
            auto_arena: Cell::new(NO_ARENA),
            shard: Cell::new(NO_SHARD),
            node: Cell::new(NO_NODE),
            tcaches: [const { Cell::new(NO_TCACHE) }; SLOTS],
        }
    }

    #[inline(always)]
    pub(crate) fn current(&self) -> Slot {
        Slot::from_byte(self.current.get())
    }

    #[inline(always)]
    pub(crate) fn home(&self) -> Slot {
        Slot::from_byte(self.home.get())
    }

    /// The automatic arena jemalloc gave this thread (arena 0 if never learnt).
    #[inline]
    pub(crate) fn auto_arena(&self) -> c_uint {
        match self.auto_arena.get() {
            NO_ARENA => 0,
            a => a,
        }
    }

    /// The arena to name explicitly when serving `engine` away from home: the engine's arena,
    /// or for `Unattributed` the thread's automatic arena (arena 0 if never learnt).
    #[inline(always)]
    pub(crate) fn visit_arena(&self, engine: Slot) -> Option<c_uint> {
        if engine == Slot::UNATTRIBUTED {
            Some(self.auto_arena())
        } else {
            arena_of(engine, self.node(), self.shard())
        }
    }

    /// Which of an engine's arenas on its node this thread uses: threads are dealt out in turn
    /// when they first need one.
    #[inline]
    pub(crate) fn shard(&self) -> usize {
        match self.shard.get() {
            NO_SHARD => {
                let s = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % crate::arena::MAX_SHARDS;
                self.shard.set(s as u8);
                s
            }
            s => s as usize,
        }
    }

    /// The node this thread's engine memory comes from.
    pub(crate) fn node(&self) -> usize {
        match self.node.get() {
            NO_NODE => {
                // SAFETY: sched_getcpu has no preconditions (-1 on failure).
                let cpu = unsafe { libc::sched_getcpu() };
                let node = topology().placement_for_cpu(usize::try_from(cpu).unwrap_or(0));
                self.node.set(node as u8);
                node
            }
            n => n as usize,
        }
    }

    /// Moves this thread's engine memory to `node`'s arenas (rebinding home if it is an
    /// engine).
    pub(crate) fn set_node(&self, node: usize) {
        self.node.set(node as u8);
        let home = self.home();
        if home.has_arena()
            && let Some(arena) = arena_of(home, node, self.shard())
        {
            bind_thread_arena(arena);
        }
    }

    /// Counts a visit to `engine` (the current engine, so the run of visits is reset whenever
    /// a guard is entered or left); after enough of them, moves home there.
    #[inline(always)]
    pub(crate) fn note_visit(&self, engine: Slot) {
        let n = self.visits.get().saturating_add(1);
        self.visits.set(n);
        if n >= HOME_SWITCH_AFTER {
            self.move_home(engine);
        }
    }

    #[cold]
    fn move_home(&self, engine: Slot) {
        self.visits.set(0);
        if self.home.get() == DETACHED {
            return;
        }
        let Some(arena) = self.visit_arena(engine) else {
            return;
        };
        if let Some(old) = bind_thread_arena(arena) {
            if self.home.get() == UNATTRIBUTED && self.auto_arena.get() == NO_ARENA {
                self.auto_arena.set(old);
            }
            self.flush();
            self.home.set(engine.byte());
            self.reroute();
            HOME_SWITCHES.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Charges `bytes` of a block owned by `owner`, placed by a slower path (whose jemalloc
    /// bytes are excluded from the home delta), at once. Returns false, charging nothing, when
    /// the charge would take the owner past the limit published for it (see
    /// [`crate::set_overflow_limit`]): the caller then moves the block to overflow.
    #[inline]
    #[must_use]
    pub(crate) fn on_alloc(&self, owner: Slot, bytes: u64) -> bool {
        ledger::try_charge(owner, bytes, ledger::limit_of(owner))
    }

    /// Credits `bytes` of a block owned by `owner`, freed by a slower path, at once.
    #[inline]
    pub(crate) fn on_free(&self, owner: Slot, bytes: u64) {
        ledger::credit(owner, bytes);
    }

    /// Whether this thread's exit flush has run (it is tearing down).
    #[inline]
    pub(crate) fn is_detached(&self) -> bool {
        self.home.get() == DETACHED
    }

    #[inline(always)]
    pub(crate) fn is_registered(&self) -> bool {
        self.flags.get() & REGISTERED != 0
    }

    /// Whether the home path may allocate for home (the current engine aside).
    #[inline(always)]
    pub(crate) fn fast_alloc_open(&self) -> bool {
        self.fast_alloc.get() != CLOSED
    }

    /// The largest request (and alignment, in one mask) the home path takes now: `FAST_MAX`
    /// while the current engine is home with headroom, else 0.
    #[inline(always)]
    pub(crate) fn alloc_limit(&self) -> usize {
        self.alloc_limit.get()
    }

    /// Makes `engine` current.
    #[inline(always)]
    fn set_current(&self, engine: u8) {
        self.current.set(engine);
        self.alloc_limit
            .set(open_limit(engine == self.fast_alloc.get()));
    }

    /// Whether the home path may free the block at `ptr` (home's, with the hook armed).
    #[inline(always)]
    pub(crate) fn frees_fast(&self, ptr: *const u8) -> bool {
        (ptr as usize).wrapping_sub(self.free_start.get()) < self.free_len.get()
    }

    /// Makes the thread able to hold unsettled bytes: registers its exit flush, learns where
    /// jemalloc counts its bytes, and registers the process's thread-event hook. Returns false
    /// when the thread is tearing down (it is then detached) or jemalloc cannot count for it:
    /// every operation then charges and credits at once.
    #[cold]
    pub(crate) fn register(&self) -> bool {
        if self.is_registered() {
            return true;
        }
        if self.is_detached() || !self.exit_flush_registered() {
            return false;
        }
        let Some((a, d)) = crate::events::thread_counters() else {
            return false;
        };
        // Fix the layout before the home path tests addresses against it.
        crate::arena::settle_layout();
        crate::events::ensure_hook();
        self.allocatedp.set(a);
        self.deallocatedp.set(d);
        // Everything jemalloc counted on this thread so far went through slower paths (the
        // home path stays closed until now) and was charged or credited directly.
        let (ra, rd) = self.counters();
        self.excluded[0].set(ra);
        self.excluded[1].set(rd);
        self.settled[0].set(0);
        self.settled[1].set(0);
        self.flags.set(self.flags.get() | REGISTERED);
        true
    }

    /// jemalloc's counters for this thread now (zero before registration).
    #[inline(always)]
    fn counters(&self) -> (u64, u64) {
        let (a, d) = (self.allocatedp.get(), self.deallocatedp.get());
        if a.is_null() || d.is_null() {
            return (0, 0);
        }
        // SAFETY: both point at this thread's counters in jemalloc's thread-specific data,
        // valid for the thread's whole life (`thread.allocatedp`), written only by jemalloc on
        // this thread, so no other thread races these reads.
        unsafe { (a.read(), d.read()) }
    }

    /// The counters as the home delta sees them: during a slow operation, as they were when it
    /// began (its own bytes are excluded when it ends).
    #[inline]
    fn home_counters(&self) -> (u64, u64) {
        let (a, d) = if self.in_slow.get() {
            (self.slow_start[0].get(), self.slow_start[1].get())
        } else {
            self.counters()
        };
        (
            a.wrapping_sub(self.excluded[0].get()),
            d.wrapping_sub(self.excluded[1].get()),
        )
    }

    /// Begins an operation that charges and credits everything it does directly: its bytes
    /// in jemalloc's counters will be excluded from the home delta. Returns whether it began
    /// one (false inside another, or before registration, when nothing needs excluding).
    #[inline]
    pub(crate) fn begin_slow(&self) -> bool {
        if self.in_slow.get() || !self.is_registered() {
            return false;
        }
        let (a, d) = self.counters();
        self.slow_start[0].set(a);
        self.slow_start[1].set(d);
        self.in_slow.set(true);
        true
    }

    /// Ends the slow operation begun by [`ThreadState::begin_slow`] (if `began`).
    #[inline]
    pub(crate) fn end_slow(&self, began: bool) {
        if !began {
            return;
        }
        let (a, d) = self.counters();
        let e = &self.excluded;
        e[0].set(
            e[0].get()
                .wrapping_add(a.wrapping_sub(self.slow_start[0].get())),
        );
        e[1].set(
            e[1].get()
                .wrapping_add(d.wrapping_sub(self.slow_start[1].get())),
        );
        self.in_slow.set(false);
    }

    /// Settles the home delta into the ledger and gives back the headroom; with `buy`, charges
    /// fresh headroom if the home engine's limit allows. Then reopens or closes the home path.
    fn settle(&self, buy: bool) {
        if !self.is_registered() || self.is_detached() {
            return;
        }
        let (now, added, freed) = self.unsettled();
        self.mark_settled(now);
        let home = self.home();
        let held = self.headroom.replace(0);
        self.headroom
            .set(ledger::settle(home, held, added, freed, buy));
        self.settlements.set(self.settlements.get().wrapping_add(1));
        self.reroute();
    }

    /// Opens each home path whose conditions hold, closes the others.
    #[inline]
    fn reroute(&self) {
        let f = self.flags.get();
        let open = f & REGISTERED != 0 && !self.is_detached();
        let home = self.home.get();
        let fast = if open && f & ALLOC_SEEN != 0 && self.headroom.get() > 0 {
            home
        } else {
            CLOSED
        };
        self.fast_alloc.set(fast);
        self.alloc_limit.set(open_limit(self.current.get() == fast));
        let (start, len) = if open && f & DALLOC_SEEN != 0 {
            home_addresses(Slot::from_byte(home))
        } else {
            (0, 0)
        };
        self.free_start.set(start);
        self.free_len.set(len);
    }

    /// The thread-event hook fired on this thread (see `events.rs`). Most calls find the
    /// headroom left within the band and touch nothing but this thread's state.
    pub(crate) fn on_event(&self, is_alloc: bool) {
        if !self.is_registered() || self.is_detached() {
            return;
        }
        self.events.set(self.events.get().wrapping_add(1));
        let seen = if is_alloc { ALLOC_SEEN } else { DALLOC_SEEN };
        let flags = self.flags.get();
        if flags & seen != 0 && self.headroom.get() > 0 {
            let (now, added, freed) = self.unsettled();
            if let ledger::Plan::Keep(left) = ledger::plan(self.headroom.get(), added, freed, true)
            {
                self.mark_settled(now);
                self.headroom.set(left);
                self.settlements.set(self.settlements.get().wrapping_add(1));
                return;
            }
        }
        self.flags.set(flags | seen);
        self.settle(true);
    }

    /// The home path's bookkeeping where jemalloc does not (yet) call the hook for this thread:
    /// settles once either counter has moved by the bound's interval since the last
    /// settlement, as the hook would have.
    #[inline]
    pub(crate) fn check(&self) {
        let (_, added, freed) = self.unsettled();
        let interval = ledger::inflight_bound().interval;
        if added >= interval || freed >= interval {
            self.settle(true);
        }
    }

    /// The home counters now, and the bytes allocated and freed on the home path since the
    /// last settlement.
    #[inline]
    fn unsettled(&self) -> ((u64, u64), u64, u64) {
        let (a, d) = self.home_counters();
        let added = a.wrapping_sub(self.settled[0].get());
        let freed = d.wrapping_sub(self.settled[1].get());
        ((a, d), added, freed)
    }

    /// Records `now` (from [`ThreadState::unsettled`]) as settled.
    #[inline]
    fn mark_settled(&self, (a, d): (u64, u64)) {
        self.settled[0].set(a);
        self.settled[1].set(d);
    }

    /// Before a home allocation off the fast path: registers the thread if need be and buys
    /// headroom if it has none. Returns whether the allocation may go to jemalloc as a home
    /// allocation (counted, settled later); false when the home engine is at its limit (or the
    /// thread cannot count), so the allocation must be charged directly.
    #[inline]
    pub(crate) fn home_ready(&self) -> bool {
        if !self.register() {
            return false;
        }
        if self.headroom.get() == 0 {
            self.settle(true);
        }
        self.headroom.get() > 0
    }

    /// Registers the thread's exit flush (before the thread may hold headroom, unsettled bytes or caches) and says
    /// whether that worked; if it has already run, the thread is tearing down: detach it.
    fn exit_flush_registered(&self) -> bool {
        if EXIT_FLUSH.try_with(|_| ()).is_ok() {
            return true;
        }
        self.detach();
        false
    }

    /// Flushes, destroys the thread's explicit caches (returning their blocks to their
    /// arenas) and stops batching and caching for good (the thread is exiting).
    fn detach(&self) {
        self.flush();
        self.home.set(DETACHED);
        self.reroute();
        for slot in &self.tcaches {
            let tc = slot.replace(TCACHE_FAILED);
            if tc < TCACHE_FAILED {
                // SAFETY: `tcache.destroy` takes the `unsigned` index of a cache this thread
                // created and no longer uses (the slot now says failed, so nothing picks it up).
                let _ = unsafe { mallctl::write(c"tcache.destroy", tc) };
            }
        }
    }

    /// The cache flag for blocks of `engine` handled away from home: this thread's explicit
    /// cache for that engine (created on first use), or no cache at all if one cannot be had.
    /// An explicit cache only ever receives blocks of its engine, allocated from or freed to
    /// that engine's arena, so it never hands one engine's block to another.
    #[inline(always)]
    pub(crate) fn cache_flag(&self, engine: Slot) -> c_int {
        match self.tcaches.get(engine.index()).map(Cell::get) {
            Some(tc) if tc < TCACHE_FAILED => jem::MALLOCX_TCACHE(tc as usize),
            Some(NO_TCACHE) => self.create_cache(engine),
            _ => jem::MALLOCX_TCACHE_NONE,
        }
    }

    #[cold]
    fn create_cache(&self, engine: Slot) -> c_int {
        let Some(slot) = self.tcaches.get(engine.index()) else {
            return jem::MALLOCX_TCACHE_NONE;
        };
        // The exit flush destroys the caches: it must be registered before one exists.
        if self.is_detached() || !self.exit_flush_registered() {
            slot.set(TCACHE_FAILED);
            return jem::MALLOCX_TCACHE_NONE;
        }
        // SAFETY: `tcache.create` returns an `unsigned`.
        let tc = match unsafe { mallctl::read::<c_uint>(c"tcache.create") } {
            Ok(tc) if tc < TCACHE_FAILED => tc,
            _ => {
                slot.set(TCACHE_FAILED);
                return jem::MALLOCX_TCACHE_NONE;
            }
        };
        TCACHES_CREATED.fetch_add(1, Ordering::Relaxed);
        slot.set(tc);
        jem::MALLOCX_TCACHE(tc as usize)
    }

    /// Settles the home delta and gives the headroom back: afterwards the ledger holds nothing
    /// of this thread's beyond its live blocks.
    pub(crate) fn flush(&self) {
        self.settle(false);
    }
}

/// Registered (on a thread's first operation that may leave anything unsettled) to settle
/// when the thread exits. The state itself has no destructor, so reaching it costs nothing on the hot path and
/// it stays usable during the whole of the thread's teardown.
struct ExitFlush;

impl Drop for ExitFlush {
    fn drop(&mut self) {
        let _ = THREAD.try_with(ThreadState::detach);
    }
}

thread_local! {
    pub(crate) static THREAD: ThreadState = const { ThreadState::new() };
    static EXIT_FLUSH: ExitFlush = const { ExitFlush };
}

/// Settles the calling thread's unsettled bytes and gives back its headroom now, so [`charged`](crate::charged) holds exactly the thread's live bytes. Threads
/// do this by themselves when they exit; the next allocation buys headroom again.
pub fn flush_thread() {
    let _ = THREAD.try_with(ThreadState::flush);
}

/// How often jemalloc's thread-event hook has fired on the calling thread, and how often the
/// thread has settled its home delta into the ledger (at those calls, at guard changes that
/// move home, at [`flush_thread`], and on the checked path where the hook is not armed).
pub fn thread_settlements() -> (u64, u64) {
    THREAD
        .try_with(|t| (t.events.get(), t.settlements.get()))
        .unwrap_or((0, 0))
}

/// The engine the calling thread's allocations are attributed to now.
pub fn current_engine() -> EngineId {
    THREAD
        .try_with(|t| EngineId::from_index(t.current().index()))
        .ok()
        .flatten()
        .unwrap_or(EngineId::Unattributed)
}

/// The calling thread's home engine (see the module docs of the allocator).
pub fn home_engine() -> EngineId {
    THREAD
        .try_with(|t| EngineId::from_index(t.home().index()))
        .ok()
        .flatten()
        .unwrap_or(EngineId::Unattributed)
}

/// How many times threads have moved their home engine (each costs a cache flush).
pub fn home_switches() -> u64 {
    HOME_SWITCHES.load(Ordering::Relaxed)
}

impl ThreadState {
    /// Pushes a guard for `engine`; returns its depth and the engine current before it.
    #[inline(always)]
    pub(crate) fn enter_guard(&self, engine: u8) -> (u32, u8) {
        self.visits.set(0);
        let depth = self.guards.push(engine);
        let previous = self.current.get();
        self.set_current(engine);
        (depth, previous)
    }

    /// Drops the guard entered at `depth` (see `GuardStack::pop`).
    #[inline(always)]
    pub(crate) fn leave_guard(&self, depth: u32, previous: u8) {
        self.visits.set(0);
        if let Some(current) = self.guards.pop(depth, previous) {
            self.set_current(current);
        }
    }
}
