//! A limit and its admission word: the pattern the engine budgets, the scopes and the global
//! ceiling share.
//!
//! `headroom == limit − own usage` whenever no operation is in flight ("own": what is charged
//! through this word; usage counted elsewhere, such as the allocator's ledger, is passed to
//! [`Headroom::take`] as `ext`). Admission is one compare-and-swap that refuses to take the
//! word below `ext`, so admissions alone never pass the limit whatever runs concurrently,
//! including a limit moved through the same word. The word is signed: implicit charges
//! ([`Headroom::force`]) and a limit lowered under usage take it below zero, which is what
//! "over the limit" means. Its magnitude is bounded by the limit (at most 2^50, see the
//! builder) plus the bytes charged (at most the address space), far from `i64`'s range.

use crate::sync::{AtomicI64, AtomicU64, Ordering};

/// A refused admission: the usage (own plus `ext`) and the limit the refused
/// compare-and-swap saw.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Refused {
    pub(crate) usage: u64,
    pub(crate) limit: u64,
}

/// A limit and the word `limit − own usage` admission decides on.
#[derive(Debug)]
pub(crate) struct Headroom {
    limit: AtomicU64,
    word: AtomicI64,
}

impl Headroom {
    pub(crate) fn new(limit: u64) -> Headroom {
        Headroom {
            limit: AtomicU64::new(limit),
            word: AtomicI64::new(to_i64(limit)),
        }
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// The word as stored, for consistency checks.
    pub(crate) fn raw(&self) -> i64 {
        self.word.load(Ordering::Acquire)
    }

    /// What admission would still accept with `ext` counted besides: `limit − usage`, or
    /// zero when over the limit.
    pub(crate) fn available(&self, ext: u64) -> u64 {
        u64::try_from(i128::from(self.raw()) - i128::from(ext)).unwrap_or(0)
    }

    /// The admission decision: takes `bytes` by one compare-and-swap if what is left still
    /// covers `ext`; on refusal changes nothing and says what the refused compare-and-swap
    /// saw (the usage from the same word, not a second read).
    pub(crate) fn take(&self, bytes: u64, ext: u64) -> Result<(), Refused> {
        let want = to_i64(bytes).saturating_add(to_i64(ext));
        let mut h = self.word.load(Ordering::Acquire);
        loop {
            if h < want {
                let limit = self.limit();
                let own = u64::try_from(i128::from(limit) - i128::from(h)).unwrap_or(0);
                return Err(Refused {
                    usage: own + ext,
                    limit,
                });
            }
            match self.word.compare_exchange_weak(
                h,
                h - to_i64(bytes),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => h = seen,
            }
        }
    }

    /// Gives back `bytes` taken or forced before (a release, a credit, an admission not
    /// committed).
    pub(crate) fn give(&self, bytes: u64) {
        self.word.fetch_add(to_i64(bytes), Ordering::AcqRel);
    }

    /// Takes `bytes` whatever is left (an implicit charge): may go below zero.
    pub(crate) fn force(&self, bytes: u64) {
        self.word.fetch_sub(to_i64(bytes), Ordering::AcqRel);
    }

    /// Sets the limit and moves the word by as much (below zero where usage is above the new
    /// limit); returns the old limit. Callers serialise limit changes.
    pub(crate) fn set_limit(&self, limit: u64) -> u64 {
        let old = self.limit.swap(limit, Ordering::AcqRel);
        // Both limits are at most 2^50, so the difference fits.
        self.word
            .fetch_add(to_i64(limit) - to_i64(old), Ordering::AcqRel);
        old
    }

    /// Raises the limit by `bytes` (the limit first: admission may use the room only once the
    /// limit holds it).
    pub(crate) fn raise_limit(&self, bytes: u64) {
        self.limit.fetch_add(bytes, Ordering::AcqRel);
        self.give(bytes);
    }

    /// Lowers the limit by `bytes` whatever the usage (the word first: admission stops using
    /// the room before the limit drops).
    pub(crate) fn lower_limit(&self, bytes: u64) {
        self.force(bytes);
        self.limit.fetch_sub(bytes, Ordering::AcqRel);
    }

    /// Lowers the limit by `bytes` only if that much is free beyond `ext` (taken by one
    /// admission, so concurrent reservations cannot be squeezed); returns whether it did.
    pub(crate) fn lower_limit_if_free(&self, bytes: u64, ext: u64) -> bool {
        if self.take(bytes, ext).is_err() {
            return false;
        }
        self.limit.fetch_sub(bytes, Ordering::AcqRel);
        true
    }
}

/// Bytes as a signed amount; saturates (never reached: see the module docs).
pub(crate) fn to_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}
