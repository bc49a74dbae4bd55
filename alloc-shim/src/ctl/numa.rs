//! NUMA: the machine's topology as the allocator uses it, how engine extents are bound to
//! their node, and pinning threads to CPUs and their engine memory to nodes (for
//! thread-per-core runtimes).

use std::mem::size_of;

pub use crate::space::arenas::{NumaPolicy, mbind_failures, set_numa_policy};
pub use crate::sys::numa::{MAX_CPUS, MAX_NODES, Topology};

use crate::id::Node;
use crate::space::arenas::ensure_arenas;
use crate::space::reservation::topology;
use crate::thread::{self, ThreadState};

/// Why a thread could not be pinned. The thread is left as it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumaError {
    /// The machine has no such CPU.
    NoSuchCore {
        /// The CPU asked for.
        core: usize,
        /// CPUs the machine has.
        cores: usize,
    },
    /// A system call failed (`EPERM`: not allowed to run there; `EINVAL`: outside the
    /// thread's allowed CPUs, e.g. a container's cpuset).
    Os {
        /// What was being done.
        op: &'static str,
        /// `errno`.
        errno: i32,
    },
}

impl std::fmt::Display for NumaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NumaError::NoSuchCore { core, cores } => {
                write!(
                    f,
                    "no CPU {core}: this machine has {cores} (0 to {})",
                    cores.saturating_sub(1)
                )
            }
            NumaError::Os { op, errno } => write!(
                f,
                "{op} failed: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

impl std::error::Error for NumaError {}

fn set_affinity(cpus: impl Iterator<Item = usize>) -> Result<(), NumaError> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in cpus {
        // SAFETY: CPU_SET bounds-checks against the set's size.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(NumaError::Os {
            op: "sched_setaffinity",
            errno: std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL),
        });
    }
    Ok(())
}

fn configured_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    usize::try_from(n).unwrap_or(1).max(1)
}

/// Pins the calling thread to CPU `core` and its engine allocations to that core's NUMA node's
/// arenas (for thread-per-core runtimes). Returns the node. On error the thread keeps its
/// affinity and arenas.
pub fn pin_thread_arena(core: usize) -> Result<usize, NumaError> {
    let cores = configured_cpus();
    if core >= cores || core >= MAX_CPUS {
        return Err(NumaError::NoSuchCore { core, cores });
    }
    set_affinity(std::iter::once(core))?;
    let node = Node::at(topology().placement_for_cpu(core)).unwrap_or(Node::FIRST);
    let _ = thread::with(|t| t.set_node(node));
    Ok(node.index())
}

/// Restricts the calling thread to the CPUs of the NUMA node it runs on now, and its engine
/// allocations to that node's arenas. Returns the node. On error the thread is unchanged.
pub fn bind_thread_to_local_numa() -> Result<usize, NumaError> {
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    let cpu = usize::try_from(cpu).map_err(|_| NumaError::Os {
        op: "sched_getcpu",
        errno: std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::ENOSYS),
    })?;
    let topo = topology();
    let node = topo.node_of_cpu(cpu);
    set_affinity(topo.cpus_of(node).filter(|&c| c < configured_cpus()))?;
    let place = Node::at(topo.memory_node_for(node)).unwrap_or(Node::FIRST);
    let _ = thread::with(|t| t.set_node(place));
    Ok(place.index())
}

/// The NUMA node the calling thread's engine allocations come from.
pub fn thread_node() -> usize {
    thread::with(ThreadState::node).map_or(0, Node::index)
}

/// The machine's NUMA topology as the allocator uses it.
pub fn machine_topology() -> Topology {
    ensure_arenas();
    *topology()
}
