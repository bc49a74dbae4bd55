//! The process's global allocator: `GovernedAlloc`, or plain jemalloc for `--no-governor`.
//!
//! Which one serves the process is decided at its first allocation, from the environment
//! variable [`PLAIN_ENV`], and never changes afterwards, so no block is ever freed by the
//! other allocator. `--no-governor` re-executes the binary with the variable set: the
//! comparison run uses jemalloc exactly as `tikv-jemallocator` gives it, with no engine arenas,
//! no ledgers and no budgets.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::CStr;
use std::sync::atomic::{AtomicU8, Ordering};

use nodedb_mem::GovernedAlloc;
use tikv_jemallocator::Jemalloc;

/// Set (to anything) in the environment of a process that must use plain jemalloc.
pub(crate) const PLAIN_ENV: &CStr = c"NODEDB_VALIDATION_PLAIN_JEMALLOC";

const UNDECIDED: u8 = 0;
const GOVERNED: u8 = 1;
const PLAIN: u8 = 2;

static MODE: AtomicU8 = AtomicU8::new(UNDECIDED);

/// `GovernedAlloc` or `Jemalloc`, chosen once per process.
#[derive(Debug)]
pub(crate) struct SwitchAlloc {
    governed: GovernedAlloc,
    plain: Jemalloc,
}

impl SwitchAlloc {
    pub(crate) const fn new() -> SwitchAlloc {
        SwitchAlloc {
            governed: GovernedAlloc::new(),
            plain: Jemalloc,
        }
    }
}

/// Whether this process runs on plain jemalloc.
pub(crate) fn is_plain() -> bool {
    mode() == PLAIN
}

#[inline(always)]
fn mode() -> u8 {
    match MODE.load(Ordering::Relaxed) {
        UNDECIDED => decide(),
        m => m,
    }
}

#[cold]
fn decide() -> u8 {
    // SAFETY: the name is NUL-terminated; this program never changes its own environment
    // (children get theirs through `Command::env`), so no concurrent `setenv` can invalidate
    // the returned pointer, which is only compared with null.
    let plain = !unsafe { libc::getenv(PLAIN_ENV.as_ptr()) }.is_null();
    let m = if plain { PLAIN } else { GOVERNED };
    // Racing first allocations on several threads all read the same environment: they store
    // the same value.
    MODE.store(m, Ordering::Relaxed);
    m
}

// SAFETY: every method forwards to the one allocator chosen for the whole process (the mode
// never changes once decided), so each block is freed and resized by the allocator that
// allocated it, under the caller's `GlobalAlloc` contract unchanged.
unsafe impl GlobalAlloc for SwitchAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if mode() == PLAIN {
            // SAFETY: the caller's contract for `alloc` is passed on unchanged.
            unsafe { self.plain.alloc(layout) }
        } else {
            // SAFETY: as above.
            unsafe { self.governed.alloc(layout) }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mode() == PLAIN {
            // SAFETY: the caller's contract for `alloc_zeroed` is passed on unchanged.
            unsafe { self.plain.alloc_zeroed(layout) }
        } else {
            // SAFETY: as above.
            unsafe { self.governed.alloc_zeroed(layout) }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if mode() == PLAIN {
            // SAFETY: `ptr` came from `self.plain` (the mode never changes) with `layout`.
            unsafe { self.plain.dealloc(ptr, layout) }
        } else {
            // SAFETY: `ptr` came from `self.governed` with `layout`.
            unsafe { self.governed.dealloc(ptr, layout) }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if mode() == PLAIN {
            // SAFETY: `ptr` came from `self.plain` with `layout`; the caller guarantees
            // `new_size` is non-zero and does not overflow when rounded to the alignment.
            unsafe { self.plain.realloc(ptr, layout, new_size) }
        } else {
            // SAFETY: as above, for `self.governed`.
            unsafe { self.governed.realloc(ptr, layout, new_size) }
        }
    }
}
