//! `GovernedAlloc`: the `#[global_allocator]`.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tikv_jemalloc_sys as jem;

use crate::arena::owner_of;
use crate::ledger::{self, DIRECT_THRESHOLD, FAST_MAX};
use crate::overflow;
use crate::size_class::usable_size;
use crate::slot::Slot;
use crate::thread::{THREAD, ThreadState};

/// jemalloc guarantees this alignment for every allocation of at least this size
/// (`MALLOC_ALIGNMENT` on x86-64 and aarch64 Linux).
const MIN_ALIGN: usize = 16;

static ACTIVE: AtomicBool = AtomicBool::new(false);
static UNROUTED: AtomicU64 = AtomicU64::new(0);
static DETACHED: AtomicU64 = AtomicU64::new(0);

/// The global allocator: jemalloc, with every allocation charged to the engine that owns it.
///
/// ```no_run
/// #[global_allocator]
/// static ALLOC: nodedb_mem_alloc::GovernedAlloc = nodedb_mem_alloc::GovernedAlloc::new();
/// ```
///
/// See the crate documentation for how allocations are routed and charged.
#[derive(Debug, Default)]
pub struct GovernedAlloc {
    _private: (),
}

impl GovernedAlloc {
    /// The allocator, for a `#[global_allocator]` static.
    pub const fn new() -> GovernedAlloc {
        GovernedAlloc { _private: () }
    }
}

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

static FALLBACKS: [AtomicU64; crate::EngineId::COUNT] =
    [const { AtomicU64::new(0) }; crate::EngineId::COUNT];
static FALLBACK_BYTES: [AtomicU64; crate::EngineId::COUNT] =
    [const { AtomicU64::new(0) }; crate::EngineId::COUNT];

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
/// ([`range_bytes`](crate::range_bytes)) was exhausted. Such blocks are counted, but by
/// address, as `Unattributed`'s: the engine's own figures no longer see them. A breach of the
/// engine's attribution, which the governor's snapshot reports.
pub fn range_fallbacks(engine: crate::EngineId) -> RangeFallbacks {
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
unsafe fn range_fallback(
    engine: Slot,
    auto: std::ffi::c_uint,
    size: usize,
    flags: c_int,
    usable: u64,
    zero: bool,
) -> *mut u8 {
    let z = if zero { jem::MALLOCX_ZERO } else { 0 };
    let f = flags | z | jem::MALLOCX_TCACHE_NONE | jem::MALLOCX_ARENA(auto as usize);
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

/// The alignment flags jemalloc needs for `layout` (none when its natural alignment suffices).
#[inline(always)]
fn align_flags(size: usize, align: usize) -> c_int {
    if align <= MIN_ALIGN && align <= size {
        0
    } else {
        jem::MALLOCX_LG_ALIGN(align.trailing_zeros() as usize)
    }
}

/// Allocates on the fast path: the thread's arena and cache.
///
/// # Safety
/// `size > 0`; `flags` holds at most a power-of-two alignment (`MALLOCX_LG_ALIGN`).
#[inline(always)]
unsafe fn fast_alloc(size: usize, flags: c_int, zero: bool) -> *mut c_void {
    // SAFETY: size > 0 (GlobalAlloc callers guarantee it), and `flags` only holds an
    // alignment that is a power of two, which is all malloc, calloc and mallocx require.
    unsafe {
        match (flags, zero) {
            (0, false) => jem::malloc(size),
            (0, true) => jem::calloc(1, size),
            (f, false) => jem::mallocx(size, f),
            (f, true) => jem::mallocx(size, f | jem::MALLOCX_ZERO),
        }
    }
}

impl ThreadState {
    #[inline(always)]
    fn count_detached(&self) {
        if self.is_detached() {
            DETACHED.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An allocation off the fast path: for an engine over its limit (its overflow arena), or
    /// for an engine other than home (a visit).
    ///
    /// # Safety
    /// `size > 0`; `flags` holds at most the alignment; `usable` is the block's usable size.
    #[inline(never)]
    unsafe fn slow_alloc(&self, size: usize, flags: c_int, usable: u64, zero: bool) -> *mut u8 {
        let engine = self.current();
        let mut fell_back = false;
        if overflow::wants_overflow(engine, usable)
            && let Some(overflow) = overflow::overflow_arena(engine)
        {
            ACTIVE.store(true, Ordering::Relaxed);
            // SAFETY: size > 0 (GlobalAlloc contract); `overflow` is the engine's overflow arena.
            let p = unsafe { self.overflow_alloc(engine, overflow, size, flags, zero) };
            if !p.is_null() {
                // SAFETY: `p` was just allocated with `size` and alignment flags `flags`.
                return unsafe { self.account(p, owner_of(p), size, flags, usable, zero, 0) };
            }
            match overflow::overflow_policy() {
                overflow::OverflowPolicy::FailAllocation => {
                    overflow::count_refusal(engine, usable);
                    return p;
                }
                overflow::OverflowPolicy::FallBack => {
                    overflow::count_breach(engine, usable);
                    fell_back = true;
                }
            }
        }
        if engine == self.home() {
            // SAFETY: as in `alloc_impl`.
            let p = unsafe { fast_alloc(size, flags, zero) }.cast::<u8>();
            // SAFETY: `p` (unless null) was just allocated with `size` and alignment `flags`.
            return unsafe { self.placed(p, size, flags, usable, zero, fell_back) };
        }
        // SAFETY: as in `alloc_impl`.
        unsafe { self.visit_alloc(size, flags, usable, zero, fell_back) }
    }

    /// An engine arena returned null for `engine`: its range is full (or the request is
    /// impossible). Serve the block from this thread's automatic arena instead, charged by
    /// address, rather than fail an infallible allocation; null only if that fails too.
    ///
    /// # Safety
    /// `size > 0`; `flags` holds only an alignment.
    #[cold]
    #[inline(never)]
    unsafe fn failed(
        &self,
        engine: Slot,
        size: usize,
        flags: c_int,
        usable: u64,
        zero: bool,
    ) -> *mut u8 {
        if !engine.has_arena() {
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's contract; the thread's automatic arena (or arena 0).
        let p = unsafe { range_fallback(engine, self.auto_arena(), size, flags, usable, zero) };
        if !p.is_null() {
            self.charge_where_it_is(owner_of(p), usable);
        }
        p
    }

    /// Charges a block that overflow could not take (a breach, already counted) where it is,
    /// past the owner's limit if need be.
    fn charge_where_it_is(&self, owner: Slot, usable: u64) {
        if !self.on_alloc(owner, usable) {
            ledger::charge(owner, usable);
        }
    }

    /// Allocates `size` bytes in `engine`'s overflow arena `overflow`, through this thread's
    /// cache for that overflow slot. Null if the region cannot take it.
    ///
    /// # Safety
    /// `size > 0`; `overflow` is `engine`'s overflow arena; `flags` holds only an alignment.
    #[inline(always)]
    unsafe fn overflow_alloc(
        &self,
        engine: Slot,
        overflow: std::ffi::c_uint,
        size: usize,
        flags: c_int,
        zero: bool,
    ) -> *mut u8 {
        let z = if zero { jem::MALLOCX_ZERO } else { 0 };
        let cache = self.cache_flag(engine.overflow().unwrap_or(Slot::UNATTRIBUTED));
        let f = flags | z | cache | jem::MALLOCX_ARENA(overflow as usize);
        // SAFETY: size > 0; flags name an existing arena, this thread's cache for its slot (or
        // none), an alignment and maybe zeroing.
        let p = unsafe { jem::mallocx(size, f) }.cast::<u8>();
        if !p.is_null() {
            crate::pushout::note(engine.index(), size as u64, p);
        }
        p
    }

    /// Charges a block just placed in an engine arena off the fast path. After overflow has
    /// already failed to take it (`fell_back`, a breach counted), it is charged where it is
    /// even past the limit; otherwise as [`ThreadState::account`] decides.
    ///
    /// # Safety
    /// `p` is null, or as for [`ThreadState::account`] with `keep = 0`.
    #[inline(always)]
    unsafe fn placed(
        &self,
        p: *mut u8,
        size: usize,
        flags: c_int,
        usable: u64,
        zero: bool,
        fell_back: bool,
    ) -> *mut u8 {
        if p.is_null() {
            // SAFETY: the caller's contract (size > 0, alignment flags only).
            return unsafe { self.failed(self.current(), size, flags, usable, zero) };
        }
        let owner = owner_of(p);
        if fell_back {
            self.charge_where_it_is(owner, usable);
            return p;
        }
        // SAFETY: the caller's contract.
        unsafe { self.account(p, owner, size, flags, usable, zero, 0) }
    }

    /// An allocation for an engine other than home: that engine's arena (on this thread's
    /// node), through this thread's explicit cache for it.
    #[inline(never)]
    unsafe fn visit_alloc(
        &self,
        size: usize,
        flags: c_int,
        usable: u64,
        zero: bool,
        fell_back: bool,
    ) -> *mut u8 {
        self.count_detached();
        let engine = self.current();
        ACTIVE.store(true, Ordering::Relaxed);
        self.note_visit(engine);
        let p = match self.visit_arena(engine) {
            Some(arena) => {
                let zero = if zero { jem::MALLOCX_ZERO } else { 0 };
                let flags =
                    flags | zero | self.cache_flag(engine) | jem::MALLOCX_ARENA(arena as usize);
                // SAFETY: size > 0; flags name an existing arena, this thread's cache for that
                // engine (or none), and an alignment.
                unsafe { jem::mallocx(size, flags) }
            }
            None => {
                // The engine arenas could not be created: serve it like home (the block lies
                // outside every range, so it is charged to Unattributed by address).
                UNROUTED.fetch_add(1, Ordering::Relaxed);
                // SAFETY: size > 0 and `flags` holds only an alignment.
                unsafe { fast_alloc(size, flags, zero) }
            }
        }
        .cast::<u8>();
        // SAFETY: `p` (unless null) was just allocated with `size` and alignment flags `flags`.
        unsafe { self.placed(p, size, flags, usable, zero, fell_back) }
    }

    /// A free of a block owned by an engine other than home: into this thread's explicit cache
    /// for the owner, never into the default cache.
    ///
    /// # Safety
    /// `ptr` is a live block of this allocator, owned by `owner`, allocated with `size` and
    /// alignment flags `flags`, of `usable` bytes.
    #[inline(never)]
    unsafe fn foreign_free(
        &self,
        ptr: *mut u8,
        owner: Slot,
        size: usize,
        flags: c_int,
        usable: u64,
    ) {
        self.count_detached();
        // SAFETY: as in `GlobalAlloc::dealloc`.
        unsafe { jem::sdallocx(ptr.cast(), size, flags | self.cache_flag(owner)) };
        self.on_free(owner, usable);
    }

    /// Frees a live block owned by `owner` (`size` bytes, alignment flags `flags`, `usable`
    /// bytes charged), through the cache its owner's blocks go to, and credits the owner.
    ///
    /// # Safety
    /// `ptr` is a live block of this allocator with that size and alignment, owned by `owner`.
    unsafe fn free_owned(&self, ptr: *mut u8, owner: Slot, size: usize, flags: c_int, usable: u64) {
        if owner == self.home() {
            // SAFETY: the caller's contract.
            unsafe { jem::sdallocx(ptr.cast(), size, flags) };
            self.on_free(owner, usable);
        } else {
            // SAFETY: the caller's contract.
            unsafe { self.foreign_free(ptr, owner, size, flags, usable) };
        }
    }

    /// Resizes a block. `old` is its size and alignment flags, `new_size`/`flags` the new
    /// size and its alignment flags.
    #[inline(never)]
    unsafe fn realloc(
        &self,
        ptr: *mut u8,
        old: (usize, c_int),
        new_size: usize,
        flags: c_int,
        old_usable: u64,
        new_usable: u64,
    ) -> *mut u8 {
        self.count_detached();
        let owner = owner_of(ptr);
        let mut fell_back = false;
        // A large block growing past its engine's limit moves to the engine's overflow region,
        // as a new block of that size would go there.
        if new_usable > old_usable
            && new_usable >= DIRECT_THRESHOLD
            && owner.has_arena()
            && (ledger::is_over(owner) || ledger::would_cross(owner, new_usable - old_usable))
            && let Some(overflow) = overflow::overflow_arena(owner)
        {
            // SAFETY: new_size > 0 (GlobalAlloc contract); `overflow` is the owner's overflow
            // arena.
            let q = unsafe { self.overflow_alloc(owner, overflow, new_size, flags, false) };
            if !q.is_null() {
                // SAFETY: `ptr` is live for `old.0` bytes (GlobalAlloc contract), `q` is a
                // fresh block of `new_size > old_usable >= old.0` bytes: both ranges are
                // valid and cannot overlap.
                unsafe { std::ptr::copy_nonoverlapping(ptr, q, old.0) };
                // SAFETY: `ptr` is live with size `old.0` and alignment flags `old.1`.
                unsafe { self.free_owned(ptr, owner, old.0, old.1, old_usable) };
                // SAFETY: `q` was just allocated with `new_size` and alignment flags `flags`,
                // and holds `old.0` bytes of data.
                return unsafe {
                    self.account(q, owner_of(q), new_size, flags, new_usable, false, old.0)
                };
            }
            match overflow::overflow_policy() {
                overflow::OverflowPolicy::FailAllocation => {
                    overflow::count_refusal(owner, new_usable);
                    // The old block stays valid, as a failed realloc requires.
                    return std::ptr::null_mut();
                }
                overflow::OverflowPolicy::FallBack => {
                    overflow::count_breach(owner, new_usable);
                    fell_back = true;
                }
            }
        }
        // The new block keeps the owner: away from home, name the owner's arena explicitly.
        let align = flags;
        let flags = if owner == self.home() {
            flags
        } else {
            match self.visit_arena(owner) {
                Some(arena) => flags | self.cache_flag(owner) | jem::MALLOCX_ARENA(arena as usize),
                None => flags | jem::MALLOCX_TCACHE_NONE,
            }
        };
        // SAFETY: `ptr` is live and from this allocator; new_size > 0 (GlobalAlloc contract).
        let q = unsafe { jem::rallocx(ptr.cast(), new_size, flags) }.cast::<u8>();
        if q.is_null() {
            if !owner.has_arena() {
                return q;
            }
            // The owner's range is full: move the block out of it, as a new block would go.
            // SAFETY: new_size > 0; `align` holds only an alignment.
            let q = unsafe {
                range_fallback(owner, self.auto_arena(), new_size, align, new_usable, false)
            };
            if q.is_null() {
                return q;
            }
            // SAFETY: `ptr` is live for `old.0` bytes, `q` for `new_size`; distinct blocks.
            unsafe { std::ptr::copy_nonoverlapping(ptr, q, old.0.min(new_size)) };
            // SAFETY: `ptr` is live with size `old.0` and alignment flags `old.1`.
            unsafe { self.free_owned(ptr, owner, old.0, old.1, old_usable) };
            self.charge_where_it_is(owner_of(q), new_usable);
            return q;
        }
        self.on_free(owner, old_usable);
        if owner.is_overflow() && new_usable > old_usable {
            crate::pushout::note(owner.engine().index(), new_usable - old_usable, q);
        }
        if fell_back {
            self.charge_where_it_is(owner_of(q), new_usable);
            return q;
        }
        // SAFETY: `q` is live with `new_size` bytes and alignment flags `align`, and holds
        // `min(old, new)` bytes of data.
        unsafe {
            self.account(
                q,
                owner_of(q),
                new_size,
                align,
                new_usable,
                false,
                old.0.min(new_size),
            )
        }
    }

    /// Charges a block just placed at `p` (`size` bytes asked, `usable` bytes, alignment flags
    /// `flags`, owned by `owner`, its first `keep` bytes data) and returns where it lives: `p`,
    /// or, when the owner's limit refuses the charge, a block in the owner's overflow region.
    ///
    /// # Safety
    /// `p` is a live block of this allocator with exactly that size and alignment, not yet
    /// charged, and `keep <= size`.
    #[inline(always)]
    #[expect(
        clippy::too_many_arguments,
        reason = "the block's whole description, on the hot path"
    )]
    unsafe fn account(
        &self,
        p: *mut u8,
        owner: Slot,
        size: usize,
        flags: c_int,
        usable: u64,
        zero: bool,
        keep: usize,
    ) -> *mut u8 {
        if self.on_alloc(owner, usable) {
            return p;
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { self.relocate(p, owner, size, flags, usable, zero, keep) }
    }

    /// The owner's limit refused a block just placed in its arena: move it to the owner's
    /// overflow region (or, where overflow cannot take it, keep it and count a breach; under
    /// `FailAllocation`, free it and fail, unless it already holds data).
    ///
    /// # Safety
    /// As for [`ThreadState::account`].
    #[cold]
    #[inline(never)]
    #[expect(clippy::too_many_arguments, reason = "as for `account`")]
    unsafe fn relocate(
        &self,
        p: *mut u8,
        owner: Slot,
        size: usize,
        flags: c_int,
        usable: u64,
        zero: bool,
        keep: usize,
    ) -> *mut u8 {
        // The block was never charged: give it back without crediting anything.
        let release = |ptr: *mut u8| {
            let cache = if owner == self.home() {
                0
            } else {
                self.cache_flag(owner)
            };
            // SAFETY: `ptr` is live with `size` and alignment flags `flags`; the cache flag
            // names this thread's cache for the owner (or none, or the default for home).
            unsafe { jem::sdallocx(ptr.cast(), size, flags | cache) };
        };
        if owner.has_arena()
            && let Some(overflow) = overflow::overflow_arena(owner)
        {
            // SAFETY: size > 0 (the caller's block has it); `overflow` is the owner's overflow
            // arena.
            let q = unsafe { self.overflow_alloc(owner, overflow, size, flags, zero) };
            if !q.is_null() {
                // SAFETY: both blocks are live with at least `size >= keep` bytes and distinct.
                unsafe { std::ptr::copy_nonoverlapping(p, q, keep) };
                release(p);
                // Overflow ledgers have no limit: this charge always succeeds.
                if !self.on_alloc(owner_of(q), usable) {
                    ledger::charge(owner_of(q), usable);
                }
                return q;
            }
            if keep == 0 && overflow::overflow_policy() == overflow::OverflowPolicy::FailAllocation
            {
                overflow::count_refusal(owner, usable);
                release(p);
                return std::ptr::null_mut();
            }
        }
        overflow::count_breach(owner, usable);
        ledger::charge(owner, usable);
        p
    }
}

/// The calling thread's state. It has no destructor, so it is reachable for the whole life of
/// the thread, teardown included; `try_with` cannot fail for it, and the `None` arm (routed to
/// the detached path) is only there so no panic path exists.
#[inline(always)]
fn thread_state() -> Option<*const ThreadState> {
    THREAD.try_with(|t| t as *const ThreadState).ok()
}

/// `GlobalAlloc::alloc` and `alloc_zeroed`.
///
/// # Safety
/// As for [`GlobalAlloc::alloc`]: `layout` has a non-zero size.
#[inline(always)]
unsafe fn alloc_impl(layout: Layout, zero: bool) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    let Some(t) = thread_state() else {
        // SAFETY: the caller's `Layout` has a non-zero size (GlobalAlloc contract).
        return unsafe { detached_entry(size, align, zero) };
    };
    // SAFETY: the pointer is to this thread's own state, alive for the thread's whole life and
    // only ever touched by this thread.
    let t = unsafe { &*t };
    // The home path: jemalloc's own fast path, its counters our only bookkeeping. It serves
    // home's arena through a cache that only ever holds home's blocks (foreign frees bypass
    // it, and moving home flushes it), so the owner is home without looking.
    if size | align <= t.alloc_limit() {
        let p = if align <= MIN_ALIGN && align <= size {
            // SAFETY: size > 0 (GlobalAlloc contract); jemalloc's natural alignment suffices.
            unsafe {
                if zero {
                    jem::calloc(1, size)
                } else {
                    jem::malloc(size)
                }
            }
        } else {
            // SAFETY: size > 0; the flags hold only a power-of-two alignment.
            unsafe { fast_alloc(size, align_flags(size, align), zero) }
        }
        .cast::<u8>();
        if !p.is_null() {
            return p;
        }
    }
    // SAFETY: as above.
    unsafe { t.alloc_slow(size, align, zero) }
}

impl ThreadState {
    /// Every allocation the home path did not take.
    ///
    /// # Safety
    /// `size > 0`; `align` is a power of two (a `Layout`'s).
    #[inline(never)]
    unsafe fn alloc_slow(&self, size: usize, align: usize, zero: bool) -> *mut u8 {
        let Some(usable) = usable(size, align) else {
            return std::ptr::null_mut();
        };
        let flags = align_flags(size, align);
        if self.current() == self.home() && size | align <= FAST_MAX && self.home_ready() {
            // A home allocation counted by jemalloc, as on the home path, with the check the
            // hook would make (it is not armed for this thread yet, or not available).
            // SAFETY: as in `alloc_impl`.
            let p = unsafe { fast_alloc(size, flags, zero) }.cast::<u8>();
            if !p.is_null() {
                self.check();
                return p;
            }
        }
        let began = self.begin_slow();
        // SAFETY: the caller's contract; `flags` holds only the alignment.
        let p = unsafe { self.slow_alloc(size, flags, usable, zero) };
        self.end_slow(began);
        p
    }

    /// Every free the home path did not take.
    ///
    /// # Safety
    /// `ptr` is live, allocated by this allocator with `size` and `align`.
    #[inline(never)]
    unsafe fn dealloc_slow(&self, ptr: *mut u8, size: usize, align: usize) {
        // The allocation succeeded with this layout, so its usable size exists.
        let usable = usable(size, align).unwrap_or(0);
        let flags = align_flags(size, align);
        if self.is_detached() {
            // SAFETY: the caller's contract.
            return unsafe { detached_dealloc(ptr, size, flags, usable) };
        }
        let owner = owner_of(ptr);
        if owner == self.home() && size | align <= FAST_MAX && self.register() {
            // A home free counted by jemalloc, as on the home path, checked as in `alloc_slow`.
            // SAFETY: the caller's contract: `size` lies within the block's usable range.
            unsafe { jem::sdallocx(ptr.cast(), size, flags) };
            self.check();
            return;
        }
        let began = self.begin_slow();
        // SAFETY: the caller's contract.
        unsafe { self.free_owned(ptr, owner, size, flags, usable) };
        self.end_slow(began);
    }

    /// Every `realloc` the home path did not take.
    ///
    /// # Safety
    /// As for [`GlobalAlloc::realloc`], with `layout`'s size and alignment as `old_size` and
    /// `align`.
    #[inline(never)]
    unsafe fn realloc_slow(
        &self,
        ptr: *mut u8,
        old_size: usize,
        align: usize,
        new_size: usize,
    ) -> *mut u8 {
        let old_usable = usable(old_size, align).unwrap_or(0);
        let Some(new_usable) = usable(new_size, align) else {
            return std::ptr::null_mut();
        };
        let flags = align_flags(new_size, align);
        let old = (old_size, align_flags(old_size, align));
        let began = self.begin_slow();
        // SAFETY: the caller's contract.
        let q = unsafe { self.realloc(ptr, old, new_size, flags, old_usable, new_usable) };
        self.end_slow(began);
        q
    }
}

/// An allocation on a thread without usable state (tearing down).
///
/// # Safety
/// `size > 0`; `align` is a power of two.
#[cold]
unsafe fn detached_entry(size: usize, align: usize, zero: bool) -> *mut u8 {
    let Some(usable) = usable(size, align) else {
        return std::ptr::null_mut();
    };
    // SAFETY: the caller's contract.
    unsafe { detached_alloc(size, align_flags(size, align), usable, zero) }
}

// Without the thread's state (during its teardown, after our thread-local is destroyed): no
// batching, no cache for foreign objects, the ledger updated at once, owner by address.

/// An allocation on a thread past its exit flush.
///
/// # Safety
/// `size > 0`; `flags` holds at most the alignment; `usable` is the block's usable size.
#[cold]
unsafe fn detached_alloc(size: usize, flags: c_int, usable: u64, zero: bool) -> *mut u8 {
    DETACHED.fetch_add(1, Ordering::Relaxed);
    let zero = if zero { jem::MALLOCX_ZERO } else { 0 };
    // SAFETY: size > 0 and `flags` holds only an alignment and the zero flag.
    let mut p = unsafe { jem::mallocx(size, flags | zero | jem::MALLOCX_TCACHE_NONE) }.cast::<u8>();
    if p.is_null() {
        // The thread may still be bound to an engine arena whose range is full.
        // SAFETY: as above; arena 0 is automatic.
        p = unsafe { range_fallback(Slot::UNATTRIBUTED, 0, size, flags, usable, zero != 0) };
    }
    if !p.is_null() {
        ledger::charge(owner_of(p), usable);
    }
    p
}

/// A free on a thread past its exit flush.
///
/// # Safety
/// `ptr` is a live block of this allocator allocated with `size` and alignment flags `flags`,
/// of `usable` bytes.
#[cold]
unsafe fn detached_dealloc(ptr: *mut u8, size: usize, flags: c_int, usable: u64) {
    DETACHED.fetch_add(1, Ordering::Relaxed);
    let owner = owner_of(ptr);
    // SAFETY: as in `ThreadState::dealloc`.
    unsafe { jem::sdallocx(ptr.cast(), size, flags | jem::MALLOCX_TCACHE_NONE) };
    ledger::credit(owner, usable);
}

/// A `realloc` on a thread past its exit flush.
///
/// # Safety
/// As for [`GlobalAlloc::realloc`], with `flags` the new size's alignment flags and the two
/// usable sizes those of the old and new layouts.
#[cold]
unsafe fn detached_realloc(
    ptr: *mut u8,
    new_size: usize,
    flags: c_int,
    old_usable: u64,
    new_usable: u64,
) -> *mut u8 {
    DETACHED.fetch_add(1, Ordering::Relaxed);
    let owner = owner_of(ptr);
    // SAFETY: as in `ThreadState::realloc`.
    let q = unsafe { jem::rallocx(ptr.cast(), new_size, flags | jem::MALLOCX_TCACHE_NONE) }
        .cast::<u8>();
    if !q.is_null() {
        ledger::credit(owner, old_usable);
        ledger::charge(owner_of(q), new_usable);
    }
    q
}

#[inline(always)]
fn usable(size: usize, align: usize) -> Option<u64> {
    usable_size(size, align).map(|u| u as u64)
}

// SAFETY: every method returns memory from jemalloc with the requested size and alignment
// (the flags carry the alignment whenever jemalloc's natural one is not enough), or null; no
// method unwinds (no panicking operations: thread-local access goes through `try_with`,
// arithmetic is on bounded values, `usable_size` returns `None` instead of overflowing).
unsafe impl GlobalAlloc for GovernedAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller (non-zero size).
        unsafe { alloc_impl(layout, false) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded from the caller (non-zero size).
        unsafe { alloc_impl(layout, true) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let (size, align) = (layout.size(), layout.align());
        let Some(t) = thread_state() else {
            let usable = usable(size, align).unwrap_or(0);
            // SAFETY: `ptr` was returned by this allocator for `layout` (GlobalAlloc contract).
            return unsafe { detached_dealloc(ptr, size, align_flags(size, align), usable) };
        };
        // SAFETY: this thread's own state, as in `alloc_impl`.
        let t = unsafe { &*t };
        if t.frees_fast(ptr) {
            // The home path: a home block of any size, counted by jemalloc, settled later (a
            // free of more than the interval makes jemalloc call the hook inside it, so it is
            // settled before this call returns).
            let flags = if align <= MIN_ALIGN && align <= size {
                0
            } else {
                align_flags(size, align)
            };
            // SAFETY: `ptr` was allocated by this allocator with this layout (GlobalAlloc
            // contract), so `size` lies within its usable range, as `sdallocx` requires.
            unsafe { jem::sdallocx(ptr.cast(), size, flags) };
            return;
        }
        // SAFETY: as above.
        unsafe { t.dealloc_slow(ptr, size, align) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old_size, align) = (layout.size(), layout.align());
        let Some(t) = thread_state() else {
            let old_usable = usable(old_size, align).unwrap_or(0);
            let Some(new_usable) = usable(new_size, align) else {
                return std::ptr::null_mut();
            };
            let flags = align_flags(new_size, align);
            // SAFETY: `ptr` is live for `layout`; `new_size` is non-zero and, rounded to
            // `align`, does not overflow (GlobalAlloc contract).
            return unsafe { detached_realloc(ptr, new_size, flags, old_usable, new_usable) };
        };
        // SAFETY: this thread's own state, as in `alloc_impl`.
        let t = unsafe { &*t };
        if old_size | new_size | align <= FAST_MAX && t.frees_fast(ptr) && t.fast_alloc_open() {
            // The home path: a home block staying home (a moved block comes from this thread's
            // arena, home's), both sides counted by jemalloc.
            let flags = align_flags(new_size, align);
            // SAFETY: `ptr` is live and from this allocator; `new_size > 0`; the flags hold only
            // an alignment.
            let q = unsafe {
                if flags == 0 {
                    jem::realloc(ptr.cast(), new_size)
                } else {
                    jem::rallocx(ptr.cast(), new_size, flags)
                }
            }
            .cast::<u8>();
            if !q.is_null() {
                return q;
            }
        }
        // SAFETY: forwarded from the caller.
        unsafe { t.realloc_slow(ptr, old_size, align, new_size) }
    }
}
