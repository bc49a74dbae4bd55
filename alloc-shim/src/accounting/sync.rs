//! The atomics the allocator's ledger algorithms run on, behind one small trait, so that the
//! same code serves the process's static ledgers (`std`'s atomics, which can live in a
//! `static`) and the loom models (`loom`'s, with `RUSTFLAGS="--cfg nodedb_mem_loom"`; see
//! `crate::model` and `loom-tests/tests/allocator.rs`).

use std::sync::atomic::Ordering;

/// A 64-bit atomic counter: the operations the ledger algorithms use.
pub(crate) trait Word {
    fn load(&self, order: Ordering) -> u64;
    fn compare_exchange_weak(
        &self,
        current: u64,
        new: u64,
        success: Ordering,
        failure: Ordering,
    ) -> Result<u64, u64>;
    fn fetch_add(&self, v: u64, order: Ordering) -> u64;
    fn fetch_sub(&self, v: u64, order: Ordering) -> u64;
}

macro_rules! word {
    ($t:ty) => {
        impl Word for $t {
            #[inline(always)]
            fn load(&self, order: Ordering) -> u64 {
                <$t>::load(self, order)
            }
            #[inline(always)]
            fn compare_exchange_weak(
                &self,
                current: u64,
                new: u64,
                success: Ordering,
                failure: Ordering,
            ) -> Result<u64, u64> {
                <$t>::compare_exchange_weak(self, current, new, success, failure)
            }
            #[inline(always)]
            fn fetch_add(&self, v: u64, order: Ordering) -> u64 {
                <$t>::fetch_add(self, v, order)
            }
            #[inline(always)]
            fn fetch_sub(&self, v: u64, order: Ordering) -> u64 {
                <$t>::fetch_sub(self, v, order)
            }
        }
    };
}

word!(std::sync::atomic::AtomicU64);
#[cfg(nodedb_mem_loom)]
word!(loom::sync::atomic::AtomicU64);
