//! The one place every atomic, lock and shared pointer of the policy core comes from.
//!
//! Built normally, these are `std`'s. Built with `RUSTFLAGS="--cfg nodedb_mem_loom"`, they are
//! loom's, so the `loom-tests` crate can model-check the ledger, reservations and rebalancing
//! through the public API (the shape of crossbeam-epoch's `primitive` module and tokio's
//! `src/loom/`).

#[cfg(not(nodedb_mem_loom))]
pub(crate) use std::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering, fence},
};

#[cfg(nodedb_mem_loom)]
pub(crate) use loom::sync::{
    Arc, Mutex, MutexGuard,
    atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering, fence},
};

/// Locks `m`, recovering the data if a panicking thread poisoned it.
///
/// Every structure guarded by our mutexes is kept consistent at each step (the guarded state is
/// updated only after the fallible work is done), so a poisoned lock holds valid data.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Wakes the background thread at once if it sleeps past its interval because nothing moved
/// (see `crate::tick`): something did.
#[inline]
pub(crate) fn nudge_background() {
    #[cfg(not(nodedb_mem_loom))]
    nodedb_mem_alloc::ctl::wake::nudge();
}
