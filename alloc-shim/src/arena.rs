//! Per-engine jemalloc arenas whose extents come from one reserved virtual range per engine,
//! so the owner of any pointer is `(ptr - base) >> shift`: O(1), no header, no lookup table.
//!
//! Everything here that runs inside jemalloc (the extent hooks) or on the allocation path
//! (`owner_of`, `arena_of`) is lock-free, allocation-free and cannot panic.

use std::ffi::{c_uint, c_void};
use std::mem::size_of;
use std::ptr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use tikv_jemalloc_sys as jem;
use tikv_jemalloc_sys::extent_hooks_t;

use crate::EngineId;

/// Engines with an arena of their own: every engine but `Unattributed`, which is served by
/// jemalloc's automatic arenas (its memory is whatever lies outside the engines' ranges).
pub(crate) const ARENA_ENGINES: usize = EngineId::COUNT - 1;

/// log2 of the virtual range reserved per engine: 64 GiB. A constant, so finding a pointer's
/// owner is one load, a subtraction, a shift and a compare.
const RANGE_SHIFT: u32 = 36;

const UNINIT: u8 = 0;
const RUNNING: u8 = 1;
const READY: u8 = 2;
const FAILED: u8 = 3;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);
/// Start of the reservation; 0 until it exists, so `owner_of` finds nothing before then.
static BASE: AtomicUsize = AtomicUsize::new(0);
/// Bump offset of each engine's range.
static NEXT: [AtomicUsize; ARENA_ENGINES] = [const { AtomicUsize::new(0) }; ARENA_ENGINES];
/// Arena index of each engine (valid once `STATE` is `READY`).
static ARENA: [AtomicU32; ARENA_ENGINES] = [const { AtomicU32::new(0) }; ARENA_ENGINES];
/// Extents refused because an engine's range was exhausted.
static RANGE_EXHAUSTED: AtomicU64 = AtomicU64::new(0);

/// The hooks of one engine's arena; jemalloc passes a pointer to `hooks` back to every hook,
/// and `repr(C)` with `hooks` first lets the hook recover `engine` from it.
#[repr(C)]
struct EngineHooks {
    hooks: extent_hooks_t,
    engine: usize,
}

const fn engine_hooks(engine: usize) -> EngineHooks {
    EngineHooks {
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
        engine,
    }
}

/// jemalloc reads these but never writes through the pointer it is given.
static HOOKS: [EngineHooks; ARENA_ENGINES] = [
    engine_hooks(0),
    engine_hooks(1),
    engine_hooks(2),
    engine_hooks(3),
    engine_hooks(4),
];

/// The engine that owns `ptr`: the engine whose range holds it, else `Unattributed`.
#[inline(always)]
pub(crate) fn owner_of(ptr: *const u8) -> usize {
    let base = BASE.load(Ordering::Relaxed);
    let engine = (ptr as usize).wrapping_sub(base) >> RANGE_SHIFT;
    // Before the ranges exist `base` is 0 and a heap pointer's "engine" is far above the count.
    if engine < ARENA_ENGINES && base != 0 {
        engine
    } else {
        EngineId::Unattributed as usize
    }
}

/// The arena of `engine`, once the arenas exist; `None` for `Unattributed`, before
/// initialisation, and if it failed.
#[inline(always)]
pub(crate) fn arena_of(engine: usize) -> Option<c_uint> {
    if engine >= ARENA_ENGINES {
        return None;
    }
    match STATE.load(Ordering::Acquire) {
        READY => ARENA.get(engine).map(|a| a.load(Ordering::Relaxed)),
        UNINIT | RUNNING => {
            init();
            if STATE.load(Ordering::Acquire) == READY {
                ARENA.get(engine).map(|a| a.load(Ordering::Relaxed))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Whether the engine arenas exist.
pub fn arenas_ready() -> bool {
    STATE.load(Ordering::Acquire) == READY
}

/// Extents refused because an engine's virtual range was full.
pub fn range_exhaustions() -> u64 {
    RANGE_EXHAUSTED.load(Ordering::Relaxed)
}

/// Bytes of virtual address space reserved for each engine's range (0 before the arenas exist).
pub fn range_bytes() -> usize {
    if arenas_ready() {
        1usize << RANGE_SHIFT
    } else {
        0
    }
}

/// Reserves the ranges and creates the arenas, once. Concurrent callers wait for the thread
/// doing it (it takes well under a millisecond and allocates nothing through the global
/// allocator, so it cannot wait on itself); after a bounded number of yields they give up and
/// are served from the automatic arenas.
#[cold]
fn init() {
    if let Err(seen) = STATE.compare_exchange(UNINIT, RUNNING, Ordering::AcqRel, Ordering::Acquire)
    {
        let mut spins = 0u32;
        let mut state = seen;
        while state == RUNNING && spins < 1_000_000 {
            std::thread::yield_now();
            spins += 1;
            state = STATE.load(Ordering::Acquire);
        }
        return;
    }
    let ok = reserve_ranges() && create_arenas() && crate::thread::lookup_mibs();
    STATE.store(if ok { READY } else { FAILED }, Ordering::Release);
}

/// Reserves address space only: `PROT_NONE` private mappings cost no commit charge even under
/// `vm.overcommit_memory = 2`; the extent hook makes each extent readable and writable when it
/// hands it out.
fn reserve_ranges() -> bool {
    let len = ARENA_ENGINES << RANGE_SHIFT;
    // SAFETY: a fresh anonymous private mapping at an address of the kernel's choice: no
    // existing memory is affected.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return false;
    }
    BASE.store(p as usize, Ordering::Release);
    true
}

fn create_arenas() -> bool {
    for (engine, hooks) in HOOKS.iter().enumerate() {
        let mut arena: c_uint = 0;
        let mut len = size_of::<c_uint>();
        let mut new_hooks = ptr::from_ref(&hooks.hooks).cast_mut();
        // SAFETY: `arenas.create` reads an `extent_hooks_t *` from `newp` (size matches) and
        // writes an `unsigned` to `oldp` (`len` is its size). The hooks are a `static`, valid
        // for the life of the process as jemalloc requires, and never written through.
        let rc = unsafe {
            jem::mallctl(
                c"arenas.create".as_ptr(),
                ptr::from_mut(&mut arena).cast(),
                &mut len,
                ptr::from_mut(&mut new_hooks).cast(),
                size_of::<*mut extent_hooks_t>(),
            )
        };
        if rc != 0 {
            return false;
        }
        ARENA[engine].store(arena, Ordering::Relaxed);
    }
    true
}

/// # Safety
/// `hooks` must be a pointer jemalloc got from `create_arenas`, i.e. into `HOOKS`.
#[inline(always)]
unsafe fn engine_of(hooks: *mut extent_hooks_t) -> usize {
    // SAFETY: per the contract, `hooks` points at the `hooks` field, the first field of a
    // `repr(C)` `EngineHooks` in the `HOOKS` static, so the cast pointer is valid to read.
    unsafe { (*hooks.cast::<EngineHooks>()).engine }
}

unsafe extern "C" fn hook_alloc(
    hooks: *mut extent_hooks_t,
    new_addr: *mut c_void,
    size: usize,
    alignment: usize,
    zero: *mut bool,
    commit: *mut bool,
    _arena: c_uint,
) -> *mut c_void {
    // Growing an extent in place at a given address is optional; refusing is always correct.
    if !new_addr.is_null() || alignment == 0 {
        return ptr::null_mut();
    }
    // SAFETY: jemalloc passes back the hooks pointer it was given at `arenas.create`.
    let engine = unsafe { engine_of(hooks) };
    let base = BASE.load(Ordering::Acquire);
    let range = 1usize << RANGE_SHIFT;
    let Some(next) = NEXT.get(engine) else {
        return ptr::null_mut();
    };
    let start_of_range = base + engine * range;
    let mut cur = next.load(Ordering::Relaxed);
    loop {
        // Align the absolute address (the range start is page-aligned, alignment may be more).
        let addr = (start_of_range + cur).next_multiple_of(alignment);
        let end = (addr - start_of_range).saturating_add(size);
        if end > range {
            RANGE_EXHAUSTED.fetch_add(1, Ordering::Relaxed);
            return ptr::null_mut();
        }
        match next.compare_exchange_weak(cur, end, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                // SAFETY: `[addr, addr + size)` lies inside our reservation (checked above) and
                // was handed out to nobody before (the bump pointer never goes back), so
                // changing its protection affects no live memory.
                let rc = unsafe {
                    libc::mprotect(
                        addr as *mut c_void,
                        size,
                        libc::PROT_READ | libc::PROT_WRITE,
                    )
                };
                if rc != 0 {
                    return ptr::null_mut();
                }
                // SAFETY: jemalloc passes valid pointers to two bools. The pages have never been
                // touched: anonymous memory reads as zeros; it is now readable and writable.
                unsafe {
                    *zero = true;
                    *commit = true;
                }
                return addr as *mut c_void;
            }
            Err(seen) => cur = seen,
        }
    }
}

/// Opt out: the range stays ours and jemalloc retains the extent for reuse.
unsafe extern "C" fn hook_dalloc(
    _hooks: *mut extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    true
}

/// Arenas are never destroyed; nothing to give back to the system beyond purging.
unsafe extern "C" fn hook_destroy(
    _hooks: *mut extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _committed: bool,
    _arena: c_uint,
) {
}

/// Extents are readable and writable from the moment they are handed out: nothing to commit.
unsafe extern "C" fn hook_commit(
    _hooks: *mut extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _offset: usize,
    _length: usize,
    _arena: c_uint,
) -> bool {
    false
}

/// Opt out: jemalloc purges instead.
unsafe extern "C" fn hook_decommit(
    _hooks: *mut extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _offset: usize,
    _length: usize,
    _arena: c_uint,
) -> bool {
    true
}

fn madvise(addr: *mut c_void, offset: usize, length: usize, advice: libc::c_int) -> bool {
    // SAFETY: jemalloc passes an extent it owns (page-aligned `addr`, `offset` and `length`
    // within it) inside our private anonymous mapping; MADV_FREE / MADV_DONTNEED only drop
    // page contents of that range. Returns true on failure, as the hook protocol wants.
    unsafe { libc::madvise(addr.cast::<u8>().add(offset).cast(), length, advice) != 0 }
}

unsafe extern "C" fn hook_purge_lazy(
    _hooks: *mut extent_hooks_t,
    addr: *mut c_void,
    _size: usize,
    offset: usize,
    length: usize,
    _arena: c_uint,
) -> bool {
    madvise(addr, offset, length, libc::MADV_FREE)
}

/// Private anonymous memory reads back as zeros after `MADV_DONTNEED`, as a forced purge
/// promises.
unsafe extern "C" fn hook_purge_forced(
    _hooks: *mut extent_hooks_t,
    addr: *mut c_void,
    _size: usize,
    offset: usize,
    length: usize,
    _arena: c_uint,
) -> bool {
    madvise(addr, offset, length, libc::MADV_DONTNEED)
}

/// Extents of one arena all lie in one mapping: splitting and merging them needs nothing.
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

/// jemalloc's view of one engine's arena, from `stats.arenas.<i>.*`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArenaStats {
    /// Bytes of physical memory the arena's pages occupy (`resident`).
    pub resident: u64,
    /// Bytes in active pages, i.e. backing live allocations (`pactive` × page size).
    pub active: u64,
    /// Bytes in dirty pages, freed but not yet returned to the system (`pdirty` × page size).
    pub dirty: u64,
    /// Bytes mapped by the arena (`mapped`).
    pub mapped: u64,
}

/// MIBs of the per-arena statistics, looked up once; element 2 is the arena index.
struct StatMibs {
    resident: [usize; 4],
    pactive: [usize; 4],
    pdirty: [usize; 4],
    mapped: [usize; 4],
}

fn name_to_mib(name: &std::ffi::CStr) -> Option<[usize; 4]> {
    let mut mib = [0usize; 4];
    let mut len = mib.len();
    // SAFETY: `mib` has room for `len` elements; jemalloc writes at most that many and stores
    // the count back in `len`.
    let rc = unsafe { jem::mallctlnametomib(name.as_ptr(), mib.as_mut_ptr(), &mut len) };
    (rc == 0 && len == 4).then_some(mib)
}

fn stat_mibs() -> Option<&'static StatMibs> {
    static MIBS: std::sync::OnceLock<Option<StatMibs>> = std::sync::OnceLock::new();
    MIBS.get_or_init(|| {
        Some(StatMibs {
            resident: name_to_mib(c"stats.arenas.0.resident")?,
            pactive: name_to_mib(c"stats.arenas.0.pactive")?,
            pdirty: name_to_mib(c"stats.arenas.0.pdirty")?,
            mapped: name_to_mib(c"stats.arenas.0.mapped")?,
        })
    })
    .as_ref()
}

fn read_mib(mib: &[usize; 4], arena: usize) -> u64 {
    let mut m = *mib;
    m[2] = arena;
    let mut value: usize = 0;
    let mut len = size_of::<usize>();
    // SAFETY: these statistics are `size_t`; `value` and `len` describe a buffer of that size.
    let rc = unsafe {
        jem::mallctlbymib(
            m.as_ptr(),
            m.len(),
            ptr::from_mut(&mut value).cast(),
            &mut len,
            ptr::null_mut(),
            0,
        )
    };
    if rc == 0 { value as u64 } else { 0 }
}

/// Refreshes jemalloc's statistics (`epoch`) and reads every engine's arena figures.
/// `Unattributed` gets the automatic arenas' share: all arenas minus the engines'. All zero
/// before the engine arenas exist. Costs tens of microseconds: sample it, never call it per
/// allocation.
pub fn arena_stats() -> [ArenaStats; EngineId::COUNT] {
    let mut out = [ArenaStats::default(); EngineId::COUNT];
    let Some(mibs) = stat_mibs().filter(|_| arenas_ready()) else {
        return out;
    };
    let mut epoch: u64 = 1;
    // SAFETY: writing `epoch` takes a u64; we pass one and its size, and read nothing back.
    unsafe {
        jem::mallctl(
            c"epoch".as_ptr(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::from_mut(&mut epoch).cast(),
            size_of::<u64>(),
        );
    }
    let page = 4096u64;
    let read = |arena: usize| ArenaStats {
        resident: read_mib(&mibs.resident, arena),
        active: read_mib(&mibs.pactive, arena) * page,
        dirty: read_mib(&mibs.pdirty, arena) * page,
        mapped: read_mib(&mibs.mapped, arena),
    };
    /// `MALLCTL_ARENAS_ALL`: statistics merged over every arena.
    const ALL_ARENAS: usize = 4096;
    let all = read(ALL_ARENAS);
    let mut rest = all;
    for (engine, arena) in ARENA.iter().enumerate() {
        let s = read(arena.load(Ordering::Relaxed) as usize);
        out[engine] = s;
        rest.resident = rest.resident.saturating_sub(s.resident);
        rest.active = rest.active.saturating_sub(s.active);
        rest.dirty = rest.dirty.saturating_sub(s.dirty);
        rest.mapped = rest.mapped.saturating_sub(s.mapped);
    }
    out[EngineId::Unattributed.index()] = rest;
    out
}

/// The engine that owns the heap block at `ptr`, judged by its address alone: the engine
/// whose range holds it, or `Unattributed` for memory outside every engine's range.
pub fn owner(ptr: *const u8) -> EngineId {
    EngineId::from_index(owner_of(ptr)).unwrap_or(EngineId::Unattributed)
}

/// The arena index of `engine`, for callers that want to inspect it with `mallctl`.
pub fn arena_index(engine: EngineId) -> Option<u32> {
    arena_of(engine.index())
}

/// Returns every arena's dirty and muzzy pages to the system now (`arena.<all>.purge`).
/// Takes milliseconds when there is much to purge; call it from a background thread.
pub fn purge_all_arenas() -> bool {
    // SAFETY: `arena.4096.purge` (MALLCTL_ARENAS_ALL) takes and returns nothing.
    let rc = unsafe {
        jem::mallctl(
            c"arena.4096.purge".as_ptr(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null_mut(),
            0,
        )
    };
    rc == 0
}

/// jemalloc's `stats.resident` after refreshing its statistics: bytes of physical memory in
/// pages jemalloc holds (data, metadata, dirty pages). `None` if statistics are unavailable.
pub fn allocator_resident() -> Option<u64> {
    let mut epoch: u64 = 1;
    let mut value: usize = 0;
    let mut len = size_of::<usize>();
    // SAFETY: `epoch` takes a u64; `stats.resident` returns a size_t into `value` (`len` is its
    // size).
    let rc = unsafe {
        jem::mallctl(
            c"epoch".as_ptr(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::from_mut(&mut epoch).cast(),
            size_of::<u64>(),
        );
        jem::mallctl(
            c"stats.resident".as_ptr(),
            ptr::from_mut(&mut value).cast(),
            &mut len,
            ptr::null_mut(),
            0,
        )
    };
    (rc == 0).then_some(value as u64)
}
