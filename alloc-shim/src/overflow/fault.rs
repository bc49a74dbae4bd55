//! Fault injection for tests: make the overflow region's next steps (creating a region maps
//! it; growing one allocates file blocks) fail with a chosen `errno`. Public with the
//! `testing` feature; without it nothing is ever injected.

#[cfg(feature = "testing")]
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};

#[cfg(feature = "testing")]
static SKIP: AtomicU32 = AtomicU32::new(0);
#[cfg(feature = "testing")]
static ERRNO: AtomicI32 = AtomicI32::new(0);
#[cfg(feature = "testing")]
static STICKY: AtomicBool = AtomicBool::new(false);

#[cfg(feature = "testing")]
/// After `skip` more steps succeed (creating a region maps it; growing one allocates file
/// blocks), the next one fails with `errno` (`ENOSPC`, `EIO`, `ENOMEM`, ...), once.
pub fn fail_after(skip: u32, errno: i32) {
    STICKY.store(false, Ordering::SeqCst);
    SKIP.store(skip, Ordering::SeqCst);
    ERRNO.store(errno, Ordering::SeqCst);
}

#[cfg(feature = "testing")]
/// Every step from now on fails with `errno` until [`clear`]: a disk that stays full.
pub fn fail_always(errno: i32) {
    STICKY.store(true, Ordering::SeqCst);
    SKIP.store(0, Ordering::SeqCst);
    ERRNO.store(errno, Ordering::SeqCst);
}

#[cfg(feature = "testing")]
/// Cancels a pending injected failure.
pub fn clear() {
    ERRNO.store(0, Ordering::SeqCst);
    STICKY.store(false, Ordering::SeqCst);
}

/// The `errno` the step about to be taken must fail with, if one is injected.
#[cfg(feature = "testing")]
pub(crate) fn check() -> Option<i32> {
    if ERRNO.load(Ordering::Relaxed) == 0 {
        return None;
    }
    if SKIP
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| s.checked_sub(1))
        .is_ok()
    {
        return None;
    }
    let errno = if STICKY.load(Ordering::SeqCst) {
        ERRNO.load(Ordering::SeqCst)
    } else {
        ERRNO.swap(0, Ordering::SeqCst)
    };
    (errno != 0).then_some(errno)
}

/// Without the `testing` feature no failure is ever injected.
#[cfg(not(feature = "testing"))]
#[inline(always)]
pub(crate) fn check() -> Option<i32> {
    None
}
