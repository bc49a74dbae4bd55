//! A spin lock for the sampler's tables: taken only when a sample is taken, forgotten or read
//! (once per sampling interval per thread, not per allocation), never while allocating.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};

/// `T` behind a flag; `with` runs a closure on it while holding the flag.
pub(super) struct SpinLock<T> {
    held: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is reached only through `with`, which holds the flag for the whole
// closure: one thread at a time.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    pub(super) const fn new(value: T) -> SpinLock<T> {
        SpinLock {
            held: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Takes the flag (spinning, then yielding) without a closure: for `fork`, whose handlers
    /// hold every lock across the call. Paired with [`SpinLock::release`].
    pub(super) fn acquire(&self) {
        let mut spins = 0u32;
        while self
            .held
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Gives back the flag taken by [`SpinLock::acquire`].
    pub(super) fn release(&self) {
        self.held.store(false, Ordering::Release);
    }

    /// Runs `f` with the value, the flag held; spins, then yields, while another thread holds
    /// it. `f` must not allocate (an allocation can come back here for the same lock).
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        self.acquire();
        // SAFETY: the flag is ours until `release` below, so no other reference to the value
        // exists while `f` runs.
        let r = f(unsafe { &mut *self.value.get() });
        self.release();
        r
    }
}
