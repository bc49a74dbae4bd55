//! Routing: the `#[global_allocator]` and the paths a block takes to its engine — home,
//! visit, relocation to overflow, fallback out of a full range, and the detached path of an
//! exiting thread — as functions over the thread's state. The top of the allocation path.

mod counters;
mod detached;
mod flags;
mod place;
mod relocate;
mod resize;
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
    unsafe { alloc_slow(t, size, align, zero) }
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
        unsafe { realloc_slow(t, ptr, old_size, align, new_size) }
    }
}
