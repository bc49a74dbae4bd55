//! The engine arenas: [`shards`] jemalloc arenas per engine and NUMA node, whose extents are
//! carved (bump pointer, `mprotect`, `mbind`) from the engine's range; their creation, which
//! thread uses which, their statistics and purges.

use std::ffi::{c_uint, c_void};
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::fallback;
use super::hooks::{self, Backing};
use super::reservation::{self, ArenaFailure, Stage, topology};
use crate::id::{ARENA_ENGINES, Arena, Node, Slot};
use crate::sys::mallctl::keys;
use crate::sys::numa::MAX_NODES;

/// Bump offset of each (engine, node) sub-range.
static NEXT: [[AtomicUsize; MAX_NODES]; ARENA_ENGINES] =
    [const { [const { AtomicUsize::new(0) }; MAX_NODES] }; ARENA_ENGINES];
/// Arenas per engine and node at most. Threads of one engine on one node are spread over
/// [`shards`] of them (one per CPU of the node, up to this many), all carving from the
/// engine's range on that node, so two threads do not contend on one arena's locks where
/// plain jemalloc would have given them two (it gives a thread one of `4 × CPUs` arenas).
pub(crate) const MAX_SHARDS: usize = 4;

/// Arena index of each (engine, node, shard) (valid once the stage is `Ready`; 0, an automatic
/// arena and so never ours, where there is no such arena).
static ARENA: [[[AtomicU32; MAX_SHARDS]; MAX_NODES]; ARENA_ENGINES] =
    [const { [const { [const { AtomicU32::new(0) }; MAX_SHARDS] }; MAX_NODES] }; ARENA_ENGINES];
/// Shards created per engine and node (`1..=MAX_SHARDS` once the arenas exist).
static SHARDS: AtomicUsize = AtomicUsize::new(1);

/// How many arenas each engine has per node: the largest node's CPU count, at most four.
pub fn shards() -> usize {
    SHARDS.load(Ordering::Relaxed)
}

/// `MPOL_PREFERRED` (1, the default) or `MPOL_BIND` (2) for engine extents.
static MBIND_MODE: AtomicU8 = AtomicU8::new(MPOL_PREFERRED);
const MPOL_PREFERRED: u8 = 1;
const MPOL_BIND: u8 = 2;
/// Extents whose `mbind` failed (they are used anyway, unbound).
static MBIND_FAILURES: AtomicU64 = AtomicU64::new(0);
/// Extents refused because an engine's range was exhausted.
static RANGE_EXHAUSTED: AtomicU64 = AtomicU64::new(0);

/// How engine extents are bound to their node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NumaPolicy {
    /// `MPOL_PREFERRED`: the node first, others when it is full (the default).
    #[default]
    Preferred,
    /// `MPOL_BIND`: only the node; allocation faults fail when it is full.
    Strict,
}

/// Sets how extents created from now on are bound to their node.
pub fn set_numa_policy(policy: NumaPolicy) {
    let mode = match policy {
        NumaPolicy::Preferred => MPOL_PREFERRED,
        NumaPolicy::Strict => MPOL_BIND,
    };
    MBIND_MODE.store(mode, Ordering::Relaxed);
}

/// Extents whose `mbind` failed (they are used anyway, unbound).
pub fn mbind_failures() -> u64 {
    MBIND_FAILURES.load(Ordering::Relaxed)
}

/// Extents refused because an engine's virtual range was full.
pub fn range_exhaustions() -> u64 {
    RANGE_EXHAUSTED.load(Ordering::Relaxed)
}

/// Binds `[addr, addr + len)` to `node` with the configured policy.
fn bind_to_node(addr: usize, len: usize, node: Node) {
    let mask: u64 = 1 << node.index();
    let mode = libc::c_long::from(MBIND_MODE.load(Ordering::Relaxed));
    // SAFETY: mbind only sets the memory policy of our own mapping `[addr, addr + len)`;
    // `mask` outlives the call and `maxnode` (64) is its size in bits.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as *mut c_void,
            len,
            mode,
            &mask as *const u64,
            64 as libc::c_ulong,
            0 as libc::c_uint,
        )
    };
    if rc != 0 {
        MBIND_FAILURES.fetch_add(1, Ordering::Relaxed);
    }
}

/// The engine arenas' backing: extents bumped off the engine's range on the node, made
/// readable and writable and bound to the node; purged with `madvise`, never decommitted.
static ENGINE_BACKING: Backing = Backing {
    alloc: engine_extent,
    commit: |_, _, _| true,
    decommit: |_, _, _| false,
    purge_lazy: |_, at, length| hooks::advise(at, length, libc::MADV_FREE),
    purge_forced: |_, at, length| hooks::advise(at, length, libc::MADV_DONTNEED),
};

fn engine_extent(
    slot: Slot,
    node: Node,
    _arena: Arena,
    size: usize,
    alignment: usize,
) -> Option<usize> {
    let next = NEXT.get(slot.index())?.get(node.index())?;
    let range = 1usize << reservation::layout().2;
    let start_of_range = reservation::range_start(slot, node);
    let mut cur = next.load(Ordering::Relaxed);
    loop {
        // Align the absolute address (the range start is page-aligned, alignment may be more).
        let addr = (start_of_range + cur).next_multiple_of(alignment);
        let end = (addr - start_of_range).saturating_add(size);
        if end > range {
            RANGE_EXHAUSTED.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match next.compare_exchange_weak(cur, end, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                // Inside the range (checked above), and the bump pointer never goes back.
                if !hooks::open_extent(addr, size) {
                    return None;
                }
                bind_to_node(addr, size, node);
                return Some(addr);
            }
            Err(seen) => cur = seen,
        }
    }
}

/// The arena of `engine` on `node` (the node a thread's memory should come from) for a thread
/// of shard `shard` (any number: taken modulo the shards created), once the arenas exist;
/// `None` for `Unattributed`, overflow slots, before initialisation, and if it failed.
#[inline(always)]
pub(crate) fn arena_of(engine: Slot, node: Node, shard: usize) -> Option<Arena> {
    if !engine.has_arena() || !ensure_arenas() {
        return None;
    }
    let row = ARENA.get(engine.index())?;
    let shard = shard % shards().max(1);
    let at = |node: Node| {
        row.get(node.index())
            .and_then(|shards| shards.get(shard))
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|&a| a != 0)
            .map(Arena)
    };
    // A node without an arena of its own (no memory): its nearest node's, which `create_arenas`
    // always creates for node `topology().memory_node_for(node)`.
    at(node).or_else(|| Node::at(topology().memory_node_for(node.index())).and_then(at))
}

/// Every arena of `engine` (all nodes and shards) with its node, for statistics and purging.
pub(crate) fn arenas_of(engine: Slot) -> impl Iterator<Item = (Node, Arena)> {
    let own = ARENA.get(engine.index()).into_iter().flat_map(|row| {
        Node::all().zip(row).flat_map(|(node, shards)| {
            shards
                .iter()
                .map(move |a| (node, a.load(Ordering::Relaxed)))
                .filter(|&(_, a)| a != 0)
                .map(|(node, a)| (node, Arena(a)))
        })
    });
    // The fallback arena's extents are not bound to a node; counted with the first.
    own.chain(fallback::arena(engine).map(|a| (Node::FIRST, a)))
}

/// Creates the ranges and arenas if nobody has yet (see `init`); whether they exist.
#[inline]
pub(crate) fn ensure_arenas() -> bool {
    if reservation::stage() != Stage::Ready {
        init();
    }
    reservation::stage() == Stage::Ready
}

/// Creates the ranges and arenas if nobody has tried yet, waiting for a thread doing it, so
/// the layout is final afterwards (on the allocation path, never inside jemalloc).
pub(crate) fn settle_layout() {
    if reservation::stage() == Stage::Untried {
        init();
    }
}

/// Why the engine arenas do not exist, once creating them failed (`None` while they exist or
/// have not been tried).
pub fn arena_failure() -> Option<ArenaFailure> {
    ensure_arenas();
    reservation::failure()
}

/// Whether the engine arenas exist.
pub fn arenas_ready() -> bool {
    reservation::stage() == Stage::Ready
}

/// Reserves the ranges and creates the arenas, once. Concurrent callers wait for the thread
/// doing it (it takes well under a millisecond and allocates nothing through the global
/// allocator, so it cannot wait on itself); after a bounded number of yields they give up and
/// are served from the automatic arenas.
#[cold]
fn init() {
    if let Err(seen) = reservation::claim() {
        let mut spins = 0u32;
        let mut stage = seen;
        while stage == Stage::Running && spins < 1_000_000 {
            std::thread::yield_now();
            spins += 1;
            stage = reservation::stage();
        }
        return;
    }
    reservation::read_topology();
    let ok = reservation::reserve()
        && create_arenas()
        && fallback::create_arenas().map_or_else(
            |rc| reservation::fail(ArenaFailure::CreateArena { rc }),
            |()| true,
        )
        && ((keys::THREAD_ARENA.resolve() && keys::THREAD_TCACHE_FLUSH.resolve())
            || reservation::fail(ArenaFailure::Mallctl));
    reservation::finish(ok);
}

/// [`shards`] arenas per engine and node with memory (the node threads of a memoryless node
/// use), sharing the (engine, node) hooks and so the same part of the engine's range.
fn create_arenas() -> bool {
    let topo = topology();
    let widest = (0..MAX_NODES)
        .filter(|&n| topo.has_node(n))
        .map(|n| topo.cpus_of(n).count())
        .max()
        .unwrap_or(1);
    let shards = widest.clamp(1, MAX_SHARDS);
    for (e, row) in ARENA.iter().enumerate() {
        let slot = Slot::at(e);
        hooks::register(slot, &ENGINE_BACKING);
        for (node, arenas) in Node::all().zip(row) {
            let n = node.index();
            if !topo.has_node(n) || topo.memory_node_for(n) != n {
                continue;
            }
            for at in &arenas[..shards] {
                match hooks::create_arena(slot, node) {
                    Ok((arena, _)) => at.store(arena.index(), Ordering::Relaxed),
                    Err(rc) => return reservation::fail(ArenaFailure::CreateArena { rc }),
                }
            }
        }
    }
    SHARDS.store(shards, Ordering::Relaxed);
    true
}

/// Purges arena `arena` (`arena.<i>.purge`); whether jemalloc did.
pub(crate) fn purge_arena(arena: c_uint) -> bool {
    keys::ARENA_PURGE.at(keys::ARENA_PART, arena).run()
}
