//! Binding one governor to the global allocator, once per process.

use std::sync::OnceLock;

use crate::config::{Config, GovernorBuilder};
use crate::error::{MemError, Result};
use crate::governor::MemoryGovernor;
use crate::{EngineGuard, EngineId};

static INSTALLED: OnceLock<MemoryGovernor> = OnceLock::new();
/// The background thread of the installed governor, for the life of the process.
static BACKGROUND: OnceLock<crate::Rebalancer> = OnceLock::new();

/// The default overflow capacity of each engine: the free space of `dir`'s filesystem less
/// [`OVERFLOW_DISK_RESERVE`](crate::OVERFLOW_DISK_RESERVE) of it, and at least 1 GiB less.
/// Refused, with the figures, where that leaves nothing.
pub(crate) fn capacity_from_disk(dir: &std::path::Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let refuse = |reason: String| MemError::config("overflow.dir", dir.display(), reason);
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| refuse("the path holds a NUL byte".into()))?;
    // SAFETY: an all-zero statvfs is valid for statvfs to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statvfs to write.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(refuse(format!("cannot read its free space: {e}")));
    }
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let reserve = ((free as f64 * crate::OVERFLOW_DISK_RESERVE) as u64).max(1 << 30);
    match free.saturating_sub(reserve) {
        0 => Err(refuse(format!(
            "its filesystem has {} free, no more than the reserve left to others (10 %, at \
             least 1 GiB); give an explicit overflow capacity or a directory on a larger disk",
            crate::ByteSize(free)
        ))),
        capacity => Ok(capacity),
    }
}

impl GovernorBuilder {
    /// Validates the configuration, builds the governor and binds it to the global allocator:
    /// from now on every heap byte counts against its engine's budget. Once per process; a
    /// second call fails with [`MemError::AlreadyInstalled`], and a process whose
    /// `#[global_allocator]` is not [`GovernedAlloc`](crate::GovernedAlloc) gets
    /// [`MemError::AllocatorNotGlobal`].
    ///
    /// Memory allocated before `install` was attributed already (the allocator keeps its
    /// ledger from the first allocation), so it counts from the first instant.
    pub fn install(self) -> Result<&'static MemoryGovernor> {
        install(self.validate()?)
    }
}

/// Serialises `install` from start to end: the check that no governor is installed, the
/// overflow regions mapped over the allocator's ranges and the governor stored happen as one
/// step, so a second caller never maps its own files over the first one's overflow.
static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn install(config: Config) -> Result<&'static MemoryGovernor> {
    let _one_at_a_time = INSTALLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if INSTALLED.get().is_some() {
        return Err(MemError::AlreadyInstalled);
    }
    if !allocator_is_global() {
        return Err(MemError::AllocatorNotGlobal);
    }
    check_inflight_bound(config.inflight_bound)?;
    if let Some(why) = nodedb_mem_alloc::ctl::arenas::arena_failure() {
        if !config.allow_unattributed {
            return Err(MemError::ArenasUnavailable(why));
        }
        tracing::warn!(
            target: "nodedb_mem",
            reason = %why,
            "the engine arenas could not be created: every allocation is unattributed"
        );
    }
    nodedb_mem_alloc::ctl::numa::set_numa_policy(config.numa_policy);
    if let Some(interval) = config.heap_profile_interval {
        nodedb_mem_alloc::ctl::profile::set_sample_interval(interval);
    }
    if !config.huge_pages && nodedb_mem_alloc::ctl::arenas::arenas_ready() {
        nodedb_mem_alloc::ctl::arenas::prevent_huge_pages().map_err(|errno| MemError::Io {
            what: "keeping transparent huge pages out of the engines' ranges".into(),
            source: std::io::Error::from_raw_os_error(errno),
        })?;
    }
    let overflow = config
        .overflow
        .clone()
        .filter(|_| nodedb_mem_alloc::ctl::arenas::arenas_ready());
    if let Some((c, capacity, explicit)) = overflow {
        let range = nodedb_mem_alloc::ctl::arenas::range_bytes() as u64;
        let capacity = match capacity {
            Some(capacity) if capacity > range => {
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
            Some(capacity) => Ok(capacity),
            None => capacity_from_disk(&c.dir).map(|c| c.min(range)),
        };
        let enabled = capacity.and_then(|capacity| {
            let capacity = usize::try_from(capacity).unwrap_or(usize::MAX);
            nodedb_mem_alloc::ctl::overflow::enable_overflow(
                &c.dir,
                capacity,
                c.allow_tmpfs,
                c.policy,
            )
            .map_err(MemError::from)
        });
        match enabled {
            Ok(()) => {}
            Err(e) if !explicit => tracing::warn!(
                target: "nodedb_mem",
                dir = %c.dir.display(),
                error = %e,
                "overflow disabled: the default overflow directory cannot be used; configure one with GovernorBuilder::overflow"
            ),
            Err(e) => return Err(e),
        }
    }
    let background = config.background;
    INSTALLED
        .set(MemoryGovernor::from_config(config, true))
        .map_err(|_| MemError::AlreadyInstalled)?;
    let gov = INSTALLED.get().ok_or(MemError::AlreadyInstalled)?;
    gov.publish_limits();
    if nodedb_mem_alloc::ctl::overflow::overflow_region(EngineId::Vector).is_some() {
        // The thread that grows overflow holds resident memory under the margin itself.
        let margin = gov.rss_margin();
        nodedb_mem_alloc::ctl::overflow::set_resident_target(
            Some(gov.ceiling() - margin),
            margin / 4,
        );
    }
    if let Some(interval) = background {
        match gov.spawn_rebalancer(interval) {
            Ok(bg) => {
                let _ = BACKGROUND.set(bg);
            }
            // The governor is bound already; without the thread the budgets and the inline
            // push-out still hold, only sampling, rebalancing and event pumping wait for calls.
            Err(e) => tracing::warn!(
                target: "nodedb_mem",
                error = %e,
                "the governor's background thread could not be started"
            ),
        }
    }
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
    if nodedb_mem_alloc::ctl::thread::is_active() {
        return true;
    }
    let probe = match nodedb_mem_alloc::ctl::thread::home_engine() {
        EngineId::Vector => EngineId::Sparse,
        _ => EngineId::Vector,
    };
    let guard = EngineGuard::enter(probe);
    drop(std::hint::black_box(Box::new(0u64)));
    drop(guard);
    // The probe's free may sit in this thread's pending credit: publish it.
    nodedb_mem_alloc::ctl::thread::flush_thread();
    nodedb_mem_alloc::ctl::thread::is_active()
}

/// Refuses an in-flight bound environment variable that does not parse (the allocator fell
/// back to the default), and a bound the builder expects that is not the process's.
fn check_inflight_bound(expected: Option<u64>) -> Result<()> {
    let env = nodedb_mem_alloc::ctl::ledger::INFLIGHT_BOUND_ENV;
    if let Err(why) = nodedb_mem_alloc::ctl::ledger::bound_from_env() {
        let value = std::env::var_os(env).unwrap_or_default();
        return Err(MemError::config(env, value.to_string_lossy(), why));
    }
    let fixed = nodedb_mem_alloc::ctl::ledger::inflight_bound().batch;
    match expected {
        Some(want) if want != fixed => Err(MemError::config(
            "inflight_bound",
            crate::size::ByteSize(want),
            format!(
                "the process's bound is {}, fixed at its first allocation; start it with {env}={}",
                crate::size::ByteSize(fixed),
                crate::size::ByteSize(want).to_string().replace(' ', "")
            ),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_default_capacity_reads_the_disk_or_says_why_not() {
        let here = super::capacity_from_disk(std::path::Path::new(env!("CARGO_MANIFEST_DIR")));
        assert!(matches!(here, Ok(c) if c > 0), "{here:?}");
        let err =
            super::capacity_from_disk(std::path::Path::new("/nonexistent/overflow")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration `overflow.dir` = /nonexistent/overflow: cannot read its free \
             space: No such file or directory (os error 2)"
        );
    }
}
