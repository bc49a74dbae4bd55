//! Accounting: the allocator's ledger of bytes per slot ([`ledger`]), the in-flight bound its
//! settlements keep ([`bound`]), the limits the governor publishes ([`limits`]), the atomics
//! the algorithms run on ([`sync`], so loom can run them too) and the marks that wake the
//! governor's background thread ([`wake`]). Above `id` and `sys`; knows nothing of threads.

pub(crate) mod bound;
pub(crate) mod ledger;
pub(crate) mod limits;
pub(crate) mod sync;
pub(crate) mod wake;
