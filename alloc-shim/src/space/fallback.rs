//! When an engine's range is full: each engine has one more arena, its fallback arena, whose
//! extents come from the shared fallback range after the slots' ranges. Each extent claims
//! whole chunks of that range marked with the engine, so the owner of a block there is still
//! found from its address alone (`owner_of`), a free on any
//! thread credits the engine, and the engine's budget holds whatever the address space.
//! Only when the fallback range is full too does a block go to jemalloc's automatic arenas,
//! as `Unattributed`'s.

use std::sync::atomic::{AtomicU32, Ordering};

use super::chunks;
use super::hooks::{self, Backing};
use crate::id::{ARENA_ENGINES, Arena, Node, Slot};

/// Each engine's fallback arena (0: none).
static ARENAS: [AtomicU32; ARENA_ENGINES] = [const { AtomicU32::new(0) }; ARENA_ENGINES];

/// The fallback arenas' backing: whole chunks of the fallback range claimed for the engine
/// whose arena asks, made readable and writable (not bound to a node); purged with
/// `madvise`, never decommitted.
static FALLBACK_BACKING: Backing = Backing {
    alloc: fallback_extent,
    commit: |_, _, _| true,
    decommit: |_, _, _| false,
    purge_lazy: |_, at, length| hooks::advise(at, length, libc::MADV_FREE),
    purge_forced: |_, at, length| hooks::advise(at, length, libc::MADV_DONTNEED),
};

/// The engine whose fallback arena `arena` is (`Unattributed` for one not known yet: an
/// older jemalloc may take an arena's metadata through its hooks while creating it).
fn engine_of(arena: Arena) -> Slot {
    ARENAS
        .iter()
        .position(|a| a.load(Ordering::Relaxed) == arena.index())
        .map_or(Slot::UNATTRIBUTED, Slot::at)
}

fn fallback_extent(
    _slot: Slot,
    _node: Node,
    arena: Arena,
    size: usize,
    alignment: usize,
) -> Option<usize> {
    let at = chunks::claim(engine_of(arena), size, alignment)?;
    hooks::open_extent(at, size).then_some(at)
}

/// Creates each engine's fallback arena, once the reservation exists; whether all were made
/// (or there is no fallback range, so none is needed). jemalloc's error code otherwise.
pub(crate) fn create_arenas() -> Result<(), i32> {
    if chunks::range_bytes() == 0 {
        return Ok(());
    }
    hooks::register(Slot::FALLBACK, &FALLBACK_BACKING);
    for a in &ARENAS {
        let (arena, _) = hooks::create_arena(Slot::FALLBACK, Node::FIRST)?;
        a.store(arena.index(), Ordering::Relaxed);
    }
    Ok(())
}

/// `engine`'s fallback arena, if it has one.
#[inline]
pub(crate) fn arena(engine: Slot) -> Option<Arena> {
    let a = ARENAS.get(engine.index())?.load(Ordering::Relaxed);
    (a != 0).then_some(Arena(a))
}
