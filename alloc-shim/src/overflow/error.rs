//! Why overflow could not do something: `Copy`, allocation-free.

use std::fmt;

/// Why an overflow region could not be created, grown or paged out. `Copy`, allocation-free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OverflowError {
    /// The capacity was zero.
    ZeroCapacity,
    /// Growing past the configured capacity.
    Exhausted {
        /// Bytes asked for in total.
        requested: usize,
        /// The region's capacity.
        capacity: usize,
    },
    /// The directory is on tmpfs: its pages cannot be evicted without swap, so overflow there
    /// would still be resident memory.
    Tmpfs,
    /// A system call failed.
    Os {
        /// What was being done.
        op: &'static str,
        /// `errno`.
        errno: i32,
    },
}

impl fmt::Display for OverflowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OverflowError::ZeroCapacity => f.write_str("overflow capacity must be above zero"),
            OverflowError::Exhausted {
                requested,
                capacity,
            } => write!(
                f,
                "overflow region exhausted: {requested} bytes requested, capacity {capacity}"
            ),
            OverflowError::Tmpfs => f.write_str(
                "the overflow directory is on tmpfs, whose pages cannot be evicted without swap; \
                 choose a directory on a disk-backed filesystem",
            ),
            OverflowError::Os { op, errno } => write!(
                f,
                "{op} failed: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
        }
    }
}

impl std::error::Error for OverflowError {}

pub(crate) fn last_errno(op: &'static str) -> OverflowError {
    OverflowError::Os {
        op,
        errno: std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    }
}
