//! Binding one governor to the global allocator, once per process.

use std::sync::OnceLock;

use crate::config::Config;
use crate::error::{MemError, Result};
use crate::governor::MemoryGovernor;
use crate::{EngineGuard, EngineId};

static INSTALLED: OnceLock<MemoryGovernor> = OnceLock::new();

pub(crate) fn install(config: Config) -> Result<&'static MemoryGovernor> {
    if INSTALLED.get().is_some() {
        return Err(MemError::AlreadyInstalled);
    }
    if !allocator_is_global() {
        return Err(MemError::AllocatorNotGlobal);
    }
    if let Some(why) = nodedb_mem_alloc::arena_failure() {
        if !config.allow_unattributed {
            return Err(MemError::ArenasUnavailable(why));
        }
        tracing::warn!(
            target: "nodedb_mem",
            reason = %why,
            "the engine arenas could not be created: every allocation is unattributed"
        );
    }
    nodedb_mem_alloc::set_numa_policy(config.numa_policy);
    let overflow = config
        .overflow
        .clone()
        .filter(|_| nodedb_mem_alloc::arenas_ready());
    if let Some((c, capacity, explicit)) = overflow {
        let range = nodedb_mem_alloc::range_bytes() as u64;
        if explicit && capacity > range {
            return Err(MemError::config(
                "overflow.capacity",
                crate::ByteSize(capacity),
                format!(
                    "above the {} each engine's overflow range holds in this process (set at \
                     start-up from physical memory and the address-space limit; see \
                     NODEDB_MEM_RANGE_BYTES)",
                    crate::ByteSize(range)
                ),
            ));
        }
        // The default (the ceiling) is capped at what a range holds.
        let capacity = usize::try_from(capacity.min(range)).unwrap_or(usize::MAX);
        match nodedb_mem_alloc::enable_overflow(&c.dir, capacity, c.allow_tmpfs, c.policy) {
            Ok(()) => {}
            Err(e) if !explicit => tracing::warn!(
                target: "nodedb_mem",
                dir = %c.dir.display(),
                error = %e,
                "overflow disabled: the default overflow directory cannot be used; configure one with GovernorBuilder::overflow"
            ),
            Err(e) => return Err(e.into()),
        }
    }
    INSTALLED
        .set(MemoryGovernor::from_config(config, true))
        .map_err(|_| MemError::AlreadyInstalled)?;
    let gov = INSTALLED.get().ok_or(MemError::AlreadyInstalled)?;
    gov.publish_limits();
    Ok(gov)
}

/// The governor bound to the global allocator by
/// [`GovernorBuilder::install`](crate::GovernorBuilder::install), if any.
pub fn installed() -> Option<&'static MemoryGovernor> {
    INSTALLED.get()
}

/// Allocates one block for an engine other than this thread's home: only `GovernedAlloc`
/// notices, so this tells whether it is the global allocator.
fn allocator_is_global() -> bool {
    if nodedb_mem_alloc::is_active() {
        return true;
    }
    let probe = match nodedb_mem_alloc::home_engine() {
        EngineId::Vector => EngineId::Sparse,
        _ => EngineId::Vector,
    };
    let guard = EngineGuard::enter(probe);
    drop(std::hint::black_box(Box::new(0u64)));
    drop(guard);
    // The probe's free may sit in this thread's pending credit: publish it.
    nodedb_mem_alloc::flush_thread();
    nodedb_mem_alloc::is_active()
}
