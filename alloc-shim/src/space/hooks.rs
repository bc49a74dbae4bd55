//! One extent-hook table for every arena the allocator creates: an entry per (slot, node),
//! whose hooks dispatch by slot to the [`Backing`] registered for it. The engine arenas
//! (`arenas.rs`) and the overflow arenas (`crate::overflow`) each register theirs, so neither
//! calls the other, and jemalloc never sees anything but this table.
//!
//! Everything here runs inside jemalloc: lock-free, allocation-free, and it cannot panic.

use std::ffi::{c_uint, c_void};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use tikv_jemalloc_sys::extent_hooks_t;

use crate::id::{Arena, HOOKED_SLOTS, Node, SLOTS, Slot};
use crate::sys::mallctl::{ArenaConfig, keys};
use crate::sys::numa::MAX_NODES;

/// How one kind of slot gets and gives back its memory. Each function answers for the extent
/// `[at, at + length)` of a slot it was registered for; `true` means done, `false` refused
/// (jemalloc then does without: it retains the extent, or tries another).
pub(crate) struct Backing {
    /// A fresh extent of `size` bytes aligned to `alignment` for `slot` on `node`, readable,
    /// writable and reading as zeros: its address, or `None`.
    /// `arena` is the arena asking.
    pub(crate) alloc:
        fn(slot: Slot, node: Node, arena: Arena, size: usize, alignment: usize) -> Option<usize>,
    /// Makes the extent's pages usable again after a decommit.
    pub(crate) commit: fn(slot: Slot, at: usize, length: usize) -> bool,
    /// Gives the extent's pages (and whatever backs them) back; they read as zeros after a
    /// commit.
    pub(crate) decommit: fn(slot: Slot, at: usize, length: usize) -> bool,
    /// Lets the system take the pages when it wants them (contents undefined after).
    pub(crate) purge_lazy: fn(slot: Slot, at: usize, length: usize) -> bool,
    /// Drops the pages now; they read as zeros after.
    pub(crate) purge_forced: fn(slot: Slot, at: usize, length: usize) -> bool,
}

/// The backing registered for each slot (null: none yet; every hook then refuses).
static BACKING: [AtomicPtr<Backing>; HOOKED_SLOTS] =
    [const { AtomicPtr::new(ptr::null_mut()) }; HOOKED_SLOTS];

/// Registers `backing` for `slot`'s arenas. Before any arena of the slot is created.
pub(crate) fn register(slot: Slot, backing: &'static Backing) {
    if let Some(b) = BACKING.get(slot.index()) {
        b.store(ptr::from_ref(backing).cast_mut(), Ordering::Release);
    }
}

#[inline(always)]
fn backing(slot: Slot) -> Option<&'static Backing> {
    let p = BACKING.get(slot.index())?.load(Ordering::Acquire);
    // SAFETY: only `register` stores here, and only pointers to `'static` backings.
    unsafe { p.as_ref() }
}

/// The hooks of one (slot, node); jemalloc passes a pointer to `hooks` back to every hook,
/// and `repr(C)` with `hooks` first lets the hook recover the slot and node from it.
#[repr(C)]
struct Entry {
    hooks: extent_hooks_t,
    slot: Slot,
    node: Node,
}

const fn entry(slot: usize, node: usize) -> Entry {
    Entry {
        hooks: extent_hooks_t {
            alloc: Some(hook_alloc),
            dalloc: Some(hook_dalloc),
            destroy: Some(hook_destroy),
            commit: Some(hook_commit),
            decommit: Some(hook_decommit),
            purge_lazy: Some(hook_purge_lazy),
            purge_forced: Some(hook_purge_forced),
            split: Some(hook_split),
            merge: Some(hook_merge),
        },
        slot: if slot < SLOTS {
            Slot::at(slot)
        } else {
            Slot::FALLBACK
        },
        // The table's loop stays below `MAX_NODES`, so `at` always answers.
        node: match Node::at(node) {
            Some(n) => n,
            None => Node::FIRST,
        },
    }
}

/// jemalloc reads these but never writes through the pointer it is given.
static TABLE: [[Entry; MAX_NODES]; HOOKED_SLOTS] = {
    let mut all = [const { [const { entry(0, 0) }; MAX_NODES] }; HOOKED_SLOTS];
    let mut s = 0;
    while s < HOOKED_SLOTS {
        let mut n = 0;
        while n < MAX_NODES {
            all[s][n] = entry(s, n);
            n += 1;
        }
        s += 1;
    }
    all
};

/// Creates one jemalloc arena over `slot`'s range on `node`, with its own metadata in
/// jemalloc's default memory rather than in our ranges (`metadata_use_hooks = false`): a forked
/// child does not inherit the overflow mappings (`MADV_DONTFORK`), and jemalloc walks every
/// arena's metadata in the child after `fork`. Where this jemalloc lacks the experimental
/// control, falls back to `arenas.create` (metadata through the hooks) and says so in the
/// second value. Returns the arena, or jemalloc's error code.
pub(crate) fn create_arena(slot: Slot, node: Node) -> Result<(Arena, bool), i32> {
    let entry = TABLE
        .get(slot.index())
        .and_then(|row| row.get(node.index()))
        .ok_or(libc::EINVAL)?;
    let extent_hooks = ptr::from_ref(&entry.hooks).cast_mut();
    let config = ArenaConfig {
        extent_hooks,
        metadata_use_hooks: false,
    };
    match keys::ARENAS_CREATE_EXT.write_read(config) {
        Ok(arena) => return Ok((Arena(arena), false)),
        Err(libc::ENOENT) => {}
        Err(rc) => return Err(rc),
    }
    keys::ARENAS_CREATE
        .write_read(extent_hooks)
        .map(|arena| (Arena(arena), true))
}

/// The slot and node of the entry whose hooks jemalloc passed back.
///
/// # Safety
/// `hooks` is a pointer jemalloc got from [`create_arena`]: the `hooks` field of an entry of
/// `TABLE`.
#[inline(always)]
unsafe fn entry_of(hooks: *mut extent_hooks_t) -> (Slot, Node) {
    // SAFETY: per the contract, `hooks` points at the first field of a `repr(C)` `Entry` in a
    // static, so the cast pointer is valid to read for the life of the process.
    let e = unsafe { &*hooks.cast::<Entry>() };
    (e.slot, e.node)
}

/// `extent_alloc_t`: a fresh extent from the slot's backing.
///
/// # Safety
/// Called by jemalloc only: `hooks` as for [`entry_of`]; `zero` and `commit` valid pointers to
/// `bool`s jemalloc reads after the call.
unsafe extern "C" fn hook_alloc(
    hooks: *mut extent_hooks_t,
    new_addr: *mut c_void,
    size: usize,
    alignment: usize,
    zero: *mut bool,
    commit: *mut bool,
    arena: c_uint,
) -> *mut c_void {
    // Growing an extent in place at a given address is optional; refusing is always correct.
    if !new_addr.is_null() || alignment == 0 {
        return ptr::null_mut();
    }
    // SAFETY: jemalloc passes back the hooks pointer it was given at creation.
    let (slot, node) = unsafe { entry_of(hooks) };
    let asking = Arena(arena);
    let Some(at) = backing(slot).and_then(|b| (b.alloc)(slot, node, asking, size, alignment))
    else {
        return ptr::null_mut();
    };
    // SAFETY: valid pointers per the contract. Every backing hands out never-touched
    // anonymous pages or fresh file blocks: they read as zeros, readable and writable.
    unsafe {
        *zero = true;
        *commit = true;
    }
    at as *mut c_void
}

/// `extent_dalloc_t`: opt out; the range stays ours and jemalloc retains the extent for reuse.
///
/// # Safety
/// Called by jemalloc only; it touches none of its arguments.
unsafe extern "C" fn hook_dalloc(
    _hooks: *mut extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    true
}

/// `extent_destroy_t`: arenas are never destroyed; nothing to give back beyond purging.
///
/// # Safety
/// Called by jemalloc only; it touches none of its arguments.
unsafe extern "C" fn hook_destroy(
    _hooks: *mut extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _committed: bool,
    _arena: c_uint,
) {
}

/// `madvise` over a span of an extent jemalloc owns in our reservation; whether it worked.
pub(crate) fn advise(at: usize, length: usize, advice: libc::c_int) -> bool {
    // SAFETY: jemalloc passes a page-aligned span of an extent it owns inside our private
    // anonymous mapping; MADV_FREE / MADV_DONTNEED only drop page contents of that range, and
    // private anonymous memory reads back as zeros after MADV_DONTNEED, as a forced purge
    // promises.
    unsafe { libc::madvise(at as *mut c_void, length, advice) == 0 }
}

/// Makes a fresh extent of our `PROT_NONE` reservation readable and writable; whether it
/// worked.
pub(crate) fn open_extent(at: usize, size: usize) -> bool {
    // SAFETY: `[at, at + size)` lies inside our reservation and was handed out to nobody
    // before (every backing's claim only moves forward), so changing its protection affects
    // no live memory.
    unsafe { libc::mprotect(at as *mut c_void, size, libc::PROT_READ | libc::PROT_WRITE) == 0 }
}

/// One of a backing's span functions.
type SpanFn = fn(Slot, usize, usize) -> bool;

/// Calls `pick(backing)` for the extent's span `[addr + offset, + length)`; jemalloc's answer
/// (`true`: failed or opted out).
///
/// # Safety
/// `hooks` as for [`entry_of`].
#[inline(always)]
unsafe fn dispatch(
    hooks: *mut extent_hooks_t,
    addr: *mut c_void,
    offset: usize,
    length: usize,
    pick: fn(&Backing) -> SpanFn,
) -> bool {
    // SAFETY: the caller's contract.
    let (slot, _) = unsafe { entry_of(hooks) };
    match backing(slot) {
        Some(b) => !pick(b)(slot, (addr as usize).wrapping_add(offset), length),
        None => true,
    }
}

/// `extent_commit_t`.
///
/// # Safety
/// Called by jemalloc only: `hooks` as for [`entry_of`], `[addr + offset, + length)` a span of
/// an extent of that arena.
unsafe extern "C" fn hook_commit(
    hooks: *mut extent_hooks_t,
    addr: *mut c_void,
    _size: usize,
    offset: usize,
    length: usize,
    _arena: c_uint,
) -> bool {
    // SAFETY: the contract, passed on.
    unsafe { dispatch(hooks, addr, offset, length, |b| b.commit) }
}

/// `extent_decommit_t`.
///
/// # Safety
/// As for [`hook_commit`].
unsafe extern "C" fn hook_decommit(
    hooks: *mut extent_hooks_t,
    addr: *mut c_void,
    _size: usize,
    offset: usize,
    length: usize,
    _arena: c_uint,
) -> bool {
    // SAFETY: the contract, passed on.
    unsafe { dispatch(hooks, addr, offset, length, |b| b.decommit) }
}

/// `extent_purge_t` (lazy).
///
/// # Safety
/// As for [`hook_commit`].
unsafe extern "C" fn hook_purge_lazy(
    hooks: *mut extent_hooks_t,
    addr: *mut c_void,
    _size: usize,
    offset: usize,
    length: usize,
    _arena: c_uint,
) -> bool {
    // SAFETY: the contract, passed on.
    unsafe { dispatch(hooks, addr, offset, length, |b| b.purge_lazy) }
}

/// `extent_purge_t` (forced).
///
/// # Safety
/// As for [`hook_commit`].
unsafe extern "C" fn hook_purge_forced(
    hooks: *mut extent_hooks_t,
    addr: *mut c_void,
    _size: usize,
    offset: usize,
    length: usize,
    _arena: c_uint,
) -> bool {
    // SAFETY: the contract, passed on.
    unsafe { dispatch(hooks, addr, offset, length, |b| b.purge_forced) }
}

/// `extent_split_t`: extents of one arena all lie in one mapping; splitting needs nothing.
///
/// # Safety
/// Called by jemalloc only; it touches none of its arguments.
unsafe extern "C" fn hook_split(
    _hooks: *mut extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _size_a: usize,
    _size_b: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    false
}

/// `extent_merge_t`: as for splitting.
///
/// # Safety
/// Called by jemalloc only; it touches none of its arguments.
unsafe extern "C" fn hook_merge(
    _hooks: *mut extent_hooks_t,
    _addr_a: *mut c_void,
    _size_a: usize,
    _addr_b: *mut c_void,
    _size_b: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    false
}
