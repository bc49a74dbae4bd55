//! Routing: the `#[global_allocator]` and the paths a block takes to its engine — home,
//! visit, relocation to overflow, fallback out of a full range, and the detached path of an
//! exiting thread — as functions over the thread's state. The top of the allocation path.

mod counters;
mod detached;
mod flags;
mod place;
mod relocate;
mod resize;
mod sample;
mod slow;

pub use counters::{
    RangeFallbacks, detached_operations, is_active, range_fallbacks, unrouted_allocations,
};

use std::alloc::{GlobalAlloc, Layout};

use tikv_jemalloc_sys as jem;

use crate::accounting::bound::FAST_MAX;
use crate::thread;
use detached::{detached_dealloc, detached_entry, detached_realloc};
use flags::{MIN_ALIGN, align_flags, fast_alloc, usable};
use resize::realloc_slow;
use sample::after;
use slow::{alloc_slow, dealloc_slow};

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

/// `GlobalAlloc::alloc` and `alloc_zeroed`.
///
/// # Safety
/// As for [`GlobalAlloc::alloc`]: `layout` has a non-zero size.
#[inline(always)]
unsafe fn alloc_impl(layout: Layout, zero: bool) -> *mut u8 {
    let (size, align) = (layout.size(), layout.align());
    let Some(t) = thread::state() else {
        // SAFETY: `detached_entry` needs
        // 1. `size > 0`: the caller's contract (`GlobalAlloc::alloc`);
        // 2. `align` a power of two: it is a `Layout`'s.
        return unsafe { detached_entry(size, align, zero) };
    };
    // SAFETY: a shared reference needs
    // 1. a live, aligned `ThreadState`: `thread::state` returns the address of this thread's
    //    own thread-local state, which has no destructor and so lives for the thread's whole
    //    life, teardown included;
    // 2. no `&mut` to it while the reference lives: the state is only ever reached through
    //    shared references (its fields are `Cell`s), and only by this thread.
    let t = unsafe { &*t };
    // The home path: jemalloc's own fast path, its counters our only bookkeeping. It serves
    // home's arena through a cache that only ever holds home's blocks (foreign frees bypass
    // it, and moving home flushes it), so the owner is home without looking.
    if size | align <= t.alloc_limit() {
        let p = if align <= MIN_ALIGN && align <= size {
            // SAFETY: `malloc` and `calloc` need
            // 1. nothing of the size (zero is allowed), and `size > 0` here anyway;
            // 2. for `Layout`'s promise, `align <= MIN_ALIGN` and `align <= size`: jemalloc
            //    aligns every block of at least `MIN_ALIGN` bytes to `MIN_ALIGN`, and smaller
            //    blocks to their size class, a multiple of `align` (a power of two <= size).
            unsafe {
                if zero {
                    jem::calloc(1, size)
                } else {
                    jem::malloc(size)
                }
            }
        } else {
            // SAFETY: `fast_alloc` needs
            // 1. `size > 0`: the caller's contract;
            // 2. flags holding at most a power-of-two alignment: `align_flags` builds only
            //    `MALLOCX_LG_ALIGN` of a `Layout`'s alignment.
            unsafe { fast_alloc(size, align_flags(size, align), zero) }
        }
        .cast::<u8>();
        // The null test, folded with the sampler's: a sample due makes every block fail it.
        if p as usize > t.sample_gate() {
            return p;
        }
        // SAFETY: `home_missed` needs `size > 0` and a power-of-two `align` (the caller's
        // contract, a `Layout`'s), and `p` null or a fresh home block of that layout: the
        // home path's answer.
        return unsafe { home_missed(t, p, size, align, zero) };
    }
    // SAFETY: `alloc_slow` needs
    // 1. `size > 0`: the caller's contract;
    // 2. `align` a power of two: a `Layout`'s.
    unsafe { alloc_slow(t, size, align, zero) }
}

/// The home path's answer `p` failed its test: null (the slow path then serves the request)
/// or chosen by the sampling clock.
///
/// # Safety
/// `size > 0`; `align` is a power of two; `p` is null or a fresh home block, not yet handed
/// out, of `size` bytes asked with alignment `align`.
#[cold]
#[inline(never)]
unsafe fn home_missed(
    t: &thread::ThreadState,
    p: *mut u8,
    size: usize,
    align: usize,
    zero: bool,
) -> *mut u8 {
    if p.is_null() {
        // SAFETY: `alloc_slow` needs `size > 0` and a power-of-two `align`: this function's
        // contract.
        return unsafe { alloc_slow(t, size, align, zero) };
    }
    let flags = align_flags(size, align);
    let usable = usable(size, align).unwrap_or(0);
    // SAFETY: `after` needs `p` live with `size` and `flags` (the home path allocated it
    // with exactly those: `align_flags` is none when natural alignment suffices), of
    // `usable` bytes, and nothing to keep (`data` 0): it was never handed out.
    unsafe { after(t, p, size, flags, usable, zero, 0) }
}

/// The home path's `realloc` answer `q` failed its test: null (the block at `ptr` is intact
/// and the slow path resizes it) or chosen by the sampling clock.
///
/// # Safety
/// If `q` is null, `GlobalAlloc::realloc`'s contract for `ptr`, `old_size`, `align` and
/// `new_size`; otherwise `q` is the live block `realloc` just returned for `new_size` bytes
/// with alignment flags `flags`.
#[cold]
#[inline(never)]
unsafe fn realloc_missed(
    t: &thread::ThreadState,
    ptr: *mut u8,
    q: *mut u8,
    old_size: usize,
    align: usize,
    new_size: usize,
    flags: std::ffi::c_int,
) -> *mut u8 {
    if q.is_null() {
        // SAFETY: `realloc_slow` needs the caller's `realloc` contract: this function's.
        return unsafe { realloc_slow(t, ptr, old_size, align, new_size) };
    }
    let usable = usable(new_size, align).unwrap_or(0);
    // SAFETY: `after` needs `q` live with `new_size` bytes asked and alignment flags
    // `flags`, of `usable` bytes, its first `new_size` bytes kept: this function's contract.
    unsafe { after(t, q, new_size, flags, usable, false, new_size) }
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
        let Some(t) = thread::state() else {
            let usable = usable(size, align).unwrap_or(0);
            // SAFETY: `detached_dealloc` needs
            // 1. `ptr` a live block of this allocator: the caller's contract
            //    (`GlobalAlloc::dealloc`);
            // 2. allocated with `size` and these alignment flags: `layout` is the one it was
            //    allocated with, and `align_flags` is the function every path allocated with;
            // 3. `usable` its usable bytes: `usable` of that layout, which exists because the
            //    allocation succeeded (so the `0` fallback is never taken).
            return unsafe { detached_dealloc(ptr, size, align_flags(size, align), usable) };
        };
        // SAFETY: a shared reference needs
        // 1. a live, aligned `ThreadState`: this thread's own thread-local state, which has no
        //    destructor and so lives for the thread's whole life;
        // 2. no `&mut` to it: the state is only reached through shared references.
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
            // SAFETY: `sdallocx` needs
            // 1. `ptr` returned by jemalloc and not yet freed: the caller's contract, and every
            //    path of this allocator returns jemalloc's blocks unchanged;
            // 2. `size` within `[requested, usable]` of the block: it is the requested size;
            // 3. the alignment flags it was allocated with: `flags` is what `alloc_impl` and
            //    the slow paths derive from the same layout (none when natural alignment
            //    suffices, `MALLOCX_LG_ALIGN` otherwise).
            unsafe { jem::sdallocx(ptr.cast(), size, flags) };
            return;
        }
        // SAFETY: `dealloc_slow` needs `ptr` live and allocated by this allocator with
        // `size` and `align`: the caller's contract.
        unsafe { dealloc_slow(t, ptr, size, align) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old_size, align) = (layout.size(), layout.align());
        let Some(t) = thread::state() else {
            let old_usable = usable(old_size, align).unwrap_or(0);
            let Some(new_usable) = usable(new_size, align) else {
                return std::ptr::null_mut();
            };
            let flags = align_flags(new_size, align);
            // SAFETY: `detached_realloc` needs
            // 1. `GlobalAlloc::realloc`'s contract: the caller's (`ptr` live for `layout`,
            //    `new_size > 0` and not overflowing when rounded to `align`);
            // 2. `flags` the new size's alignment flags: `align_flags(new_size, align)`;
            // 3. the usable sizes of the old and new layouts: computed just above.
            return unsafe { detached_realloc(ptr, new_size, flags, old_usable, new_usable) };
        };
        // SAFETY: a shared reference needs
        // 1. a live, aligned `ThreadState`: this thread's own thread-local state, which has no
        //    destructor and so lives for the thread's whole life;
        // 2. no `&mut` to it: the state is only reached through shared references.
        let t = unsafe { &*t };
        if old_size | new_size | align <= FAST_MAX && t.frees_fast(ptr) && t.fast_alloc_open() {
            // The home path: a home block staying home (a moved block comes from this thread's
            // arena, home's), both sides counted by jemalloc.
            let flags = align_flags(new_size, align);
            // SAFETY: `realloc` and `rallocx` need
            // 1. `ptr` live and from jemalloc: the caller's contract;
            // 2. `new_size > 0`: the caller's contract;
            // 3. flags holding only a power-of-two alignment: `align_flags` of the new size,
            //    0 exactly when jemalloc's natural alignment for `new_size` meets `align`.
            let q = unsafe {
                if flags == 0 {
                    jem::realloc(ptr.cast(), new_size)
                } else {
                    jem::rallocx(ptr.cast(), new_size, flags)
                }
            }
            .cast::<u8>();
            if q as usize > t.sample_gate() {
                return q;
            }
            // SAFETY: `realloc_missed` needs `GlobalAlloc::realloc`'s contract for `ptr`
            // (the caller's) unless `q` is non-null, and then `q` the block `realloc` just
            // returned for `new_size` with these flags.
            return unsafe { realloc_missed(t, ptr, q, old_size, align, new_size, flags) };
        }
        // SAFETY: `realloc_slow` needs `GlobalAlloc::realloc`'s contract with `layout`'s
        // size and alignment as `old_size` and `align`: the caller's, passed on.
        unsafe { realloc_slow(t, ptr, old_size, align, new_size) }
    }
}
