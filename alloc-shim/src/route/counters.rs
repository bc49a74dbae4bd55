//! What the routing counts: whether it ever served an engine, what it could not route, what it
//! served for detached threads, and each engine's blocks served outside its full range.

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tikv_jemalloc_sys as jem;

use crate::id::{Arena, EngineId, Slot};
use crate::space::fallback;

pub(super) static ACTIVE: AtomicBool = AtomicBool::new(false);
pub(super) static UNROUTED: AtomicU64 = AtomicU64::new(0);
pub(super) static DETACHED: AtomicU64 = AtomicU64::new(0);

/// Whether `GovernedAlloc` has served an allocation for an engine in this process, i.e.
/// whether it is the global allocator (the check `install` uses).
pub fn is_active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// Allocations for an engine that had to be served from the automatic arenas because the
/// engine arenas could not be created (they are then charged to `Unattributed`).
pub fn unrouted_allocations() -> u64 {
    UNROUTED.load(Ordering::Relaxed)
}

/// Operations served for threads past their exit flush (allocations and frees in thread-local
/// destructors that run after ours): unbatched, charged and credited directly by address.
pub fn detached_operations() -> u64 {
    DETACHED.load(Ordering::Relaxed)
}

static FALLBACKS: [AtomicU64; EngineId::COUNT] = [const { AtomicU64::new(0) }; EngineId::COUNT];
static FALLBACK_BYTES: [AtomicU64; EngineId::COUNT] =
    [const { AtomicU64::new(0) }; EngineId::COUNT];
static OUTSIDE_BYTES: [AtomicU64; EngineId::COUNT] = [const { AtomicU64::new(0) }; EngineId::COUNT];

/// Allocations of one engine served outside its range because the range was full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeFallbacks {
    /// Allocations (and reallocations) so served.
    pub count: u64,
    /// Their usable bytes, in total (not net of frees).
    pub bytes: u64,
    /// Of those bytes, the ones served outside the shared fallback range too (it was full, or
    /// there is none), in jemalloc's automatic arenas: charged to, and credited from,
    /// `Unattributed`, so the engine's own figures do not see them. The rest lie in the
    /// fallback range and are the engine's, as any of its blocks.
    pub unattributed_bytes: u64,
}

/// How often `engine`'s allocations fell back out of its range
/// ([`range_bytes`](crate::ctl::arenas::range_bytes)) because it was full: into the engine's
/// fallback arena (the shared [fallback range](crate::ctl::arenas::fallback_range_bytes),
/// still the engine's), or, once that is full too, into the automatic arenas as
/// `Unattributed`'s: a breach of the engine's attribution, which the governor's snapshot
/// reports.
pub fn range_fallbacks(engine: EngineId) -> RangeFallbacks {
    let i = engine.index();
    RangeFallbacks {
        count: FALLBACKS[i].load(Ordering::Relaxed),
        bytes: FALLBACK_BYTES[i].load(Ordering::Relaxed),
        unattributed_bytes: OUTSIDE_BYTES[i].load(Ordering::Relaxed),
    }
}

/// Serves `size` bytes, uncached, after `engine`'s arena could not (its range is full): from
/// the engine's fallback arena, else from automatic arena `auto` (outside every range), and
/// counts the fallback. The caller charges the block by its address (the engine's in the
/// fallback range, `Unattributed`'s outside). Null if all of that fails.
///
/// # Safety
/// `size > 0`; `flags` holds only an alignment; `auto` is an automatic arena.
#[cold]
#[inline(never)]
pub(super) unsafe fn range_fallback(
    engine: Slot,
    auto: Arena,
    size: usize,
    flags: c_int,
    usable: u64,
    zero: bool,
) -> *mut u8 {
    let z = if zero { jem::MALLOCX_ZERO } else { 0 };
    let f = flags | z | jem::MALLOCX_TCACHE_NONE;
    let mut p = std::ptr::null_mut::<u8>();
    if let Some(own) = fallback::arena(engine) {
        // SAFETY: `mallocx` needs
        // 1. `size > 0`: this function's contract;
        // 2. an existing arena: `fallback::arena` returns only arenas created;
        // 3. otherwise only an alignment (this function's contract), `MALLOCX_ZERO` and
        //    `MALLOCX_TCACHE_NONE`.
        p = unsafe { jem::mallocx(size, f | own.flag()) }.cast::<u8>();
    }
    let outside = p.is_null();
    if outside {
        // SAFETY: as above, with `auto`, an automatic arena (this function's contract).
        p = unsafe { jem::mallocx(size, f | auto.flag()) }.cast::<u8>();
    }
    let i = engine.index();
    if !p.is_null()
        && let (Some(n), Some(b), Some(o)) = (
            FALLBACKS.get(i),
            FALLBACK_BYTES.get(i),
            OUTSIDE_BYTES.get(i),
        )
    {
        n.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(usable, Ordering::Relaxed);
        if outside {
            o.fetch_add(usable, Ordering::Relaxed);
        }
    }
    p
}
