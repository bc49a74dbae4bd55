//! Helpers shared by the allocator's test binaries (each includes this with `mod common;`
//! and uses what it needs).
#![allow(dead_code)]

use std::sync::{Mutex, MutexGuard};

use nodedb_mem_alloc::{EngineId, ctl::ledger::charged, ctl::thread::flush_thread};

/// Tests share the process-wide ledger (and fault injection): one at a time. nextest runs one
/// per process anyway; `cargo test` runs them on threads.
static SERIAL: Mutex<()> = Mutex::new(());

pub(crate) fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// `charged(engine)` once this thread has settled what it holds unsettled.
pub(crate) fn settled(engine: EngineId) -> u64 {
    flush_thread();
    charged(engine)
}
