//! What the governor drives and reads, one submodule per concern: the ledger and its limits
//! ([`ledger`]), the arenas and the address space ([`arenas`]), overflow ([`overflow`]), NUMA
//! placement ([`numa`]), heap-profile sampling ([`profile`]), the calling thread ([`thread`]) and the background thread's wake-ups
//! ([`wake`]). The top of the crate: it may use every layer below, and nothing uses it.

pub mod arenas;
pub mod ledger;
pub mod numa;
pub mod overflow;
pub mod profile;
pub mod thread;
pub mod wake;
