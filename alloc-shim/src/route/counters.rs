//! What the routing counts: whether it ever served an engine, what it could not route, what it
//! served for detached threads, and each engine's blocks served outside its full range.

use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tikv_jemalloc_sys as jem;

use crate::id::{Arena, EngineId, Slot};

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

/// Allocations of one engine served outside its range because the range was full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeFallbacks {
    /// Allocations (and reallocations) so served.
    pub count: u64,
    /// Their usable bytes, in total (not net of frees: once outside the range, a block is
    /// charged to, and credited from, `Unattributed`).
    pub bytes: u64,
}

/// How often `engine`'s allocations fell back to the automatic arenas because its range
/// ([`range_bytes`](crate::ctl::arenas::range_bytes)) was exhausted. Such blocks are counted, but by
/// address, as `Unattributed`'s: the engine's own figures no longer see them. A breach of the
/// engine's attribution, which the governor's snapshot reports.
pub fn range_fallbacks(engine: EngineId) -> RangeFallbacks {
    let i = engine.index();
    RangeFallbacks {
        count: FALLBACKS[i].load(Ordering::Relaxed),
        bytes: FALLBACK_BYTES[i].load(Ordering::Relaxed),
    }
}

/// Serves `size` bytes from automatic arena `auto` (outside every engine range), uncached,
/// after `engine`'s arena could not (its range is full), and counts the fallback. The caller
/// charges the block by its address (to `Unattributed`). Null if even that fails.
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
    let f = flags | z | jem::MALLOCX_TCACHE_NONE | auto.flag();
    // SAFETY: size > 0; the flags name an existing (automatic) arena, no cache, an alignment
    // and maybe zeroing.
    let p = unsafe { jem::mallocx(size, f) }.cast::<u8>();
    if !p.is_null()
        && let (Some(n), Some(b)) = (
            FALLBACKS.get(engine.index()),
            FALLBACK_BYTES.get(engine.index()),
        )
    {
        n.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(usable, Ordering::Relaxed);
    }
    p
}
