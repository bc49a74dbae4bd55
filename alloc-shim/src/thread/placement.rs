//! Where a thread's blocks go: its home arena and the move of home, the arenas it visits (on
//! its NUMA node, in its shard), its explicit caches, and its detachment at exit.

use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};

use tikv_jemalloc_sys as jem;

use super::{Cache, HOME_SWITCH_AFTER, HOME_SWITCHES, Phase, TCACHES_CREATED, ThreadState};
use crate::id::{Arena, Node, Slot};
use crate::space::arenas::{MAX_SHARDS, arena_of};
use crate::space::reservation::topology;
use crate::sys::mallctl::keys;

/// The shard the next thread to need one gets (taken once per thread).
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

/// Binds the calling thread to `arena` and flushes its cache (which held the old arena's
/// blocks), returning the arena it was bound to.
fn bind_thread_arena(arena: Arena) -> Option<Arena> {
    let old = keys::THREAD_ARENA.write_read(arena.index()).ok()?;
    // Failure (the thread has no cache) is fine.
    keys::THREAD_TCACHE_FLUSH.run();
    Some(Arena(old))
}

impl ThreadState {
    /// The automatic arena jemalloc gave this thread (arena 0 if never learnt).
    #[inline]
    pub(crate) fn auto_arena(&self) -> Arena {
        self.auto_arena.get().unwrap_or(Arena(0))
    }

    /// The arena to name explicitly when serving `engine` away from home: the engine's arena,
    /// or for `Unattributed` the thread's automatic arena (arena 0 if never learnt).
    #[inline(always)]
    pub(crate) fn visit_arena(&self, engine: Slot) -> Option<Arena> {
        if engine == Slot::UNATTRIBUTED {
            Some(self.auto_arena())
        } else {
            arena_of(engine, self.node(), self.shard())
        }
    }

    /// Which of an engine's arenas on its node this thread uses: threads are dealt out in turn
    /// when they first need one.
    #[inline]
    fn shard(&self) -> usize {
        match self.shard.get() {
            Some(s) => s as usize,
            None => {
                let s = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % MAX_SHARDS;
                self.shard.set(Some(s as u8));
                s
            }
        }
    }

    /// The node this thread's engine memory comes from.
    pub(crate) fn node(&self) -> Node {
        match self.node.get() {
            Some(n) => n,
            None => {
                // SAFETY: sched_getcpu has no preconditions (-1 on failure).
                let cpu = unsafe { libc::sched_getcpu() };
                let node = topology().placement_for_cpu(usize::try_from(cpu).unwrap_or(0));
                let node = Node::at(node).unwrap_or(Node::FIRST);
                self.node.set(Some(node));
                node
            }
        }
    }

    /// Moves this thread's engine memory to `node`'s arenas (rebinding home if it is an
    /// engine).
    pub(crate) fn set_node(&self, node: Node) {
        self.node.set(Some(node));
        let home = self.home.get();
        if !self.is_detached()
            && home.has_arena()
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
        if self.is_detached() {
            return;
        }
        let Some(arena) = self.visit_arena(engine) else {
            return;
        };
        if let Some(old) = bind_thread_arena(arena) {
            if self.home.get() == Slot::UNATTRIBUTED && self.auto_arena.get().is_none() {
                self.auto_arena.set(Some(old));
            }
            self.flush();
            self.home.set(engine);
            self.reroute();
            HOME_SWITCHES.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Flushes, destroys the thread's explicit caches (returning their blocks to their
    /// arenas) and stops batching and caching for good (the thread is exiting).
    pub(super) fn detach(&self) {
        self.flush();
        self.phase.set(Phase::Detached);
        self.reroute();
        for slot in &self.tcaches {
            if let Cache::Made(tc) = slot.replace(Cache::Failed) {
                // A cache this thread created and no longer uses (the slot now says failed, so
                // nothing picks it up). Failure leaves it to jemalloc's own exit.
                let _ = keys::TCACHE_DESTROY.write(tc);
            }
        }
    }

    /// The cache flag for blocks of `engine` handled away from home: this thread's explicit
    /// cache for that engine (created on first use), or no cache at all if one cannot be had.
    /// An explicit cache only ever receives blocks of its engine, allocated from or freed to
    /// that engine's arena, so it never hands one engine's block to another.
    #[inline(always)]
    pub(crate) fn cache_flag(&self, engine: Slot) -> c_int {
        match self.tcaches.get(engine.index()).map(std::cell::Cell::get) {
            Some(Cache::Made(tc)) => jem::MALLOCX_TCACHE(tc as usize),
            Some(Cache::Untried) => self.create_cache(engine),
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
            slot.set(Cache::Failed);
            return jem::MALLOCX_TCACHE_NONE;
        }
        let Ok(tc) = keys::TCACHE_CREATE.read() else {
            slot.set(Cache::Failed);
            return jem::MALLOCX_TCACHE_NONE;
        };
        TCACHES_CREATED.fetch_add(1, Ordering::Relaxed);
        slot.set(Cache::Made(tc));
        jem::MALLOCX_TCACHE(tc as usize)
    }
}
