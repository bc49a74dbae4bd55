//! Finding the default global ceiling: `NODEDB_MEMORY_LIMIT`, else the cgroup's memory limit,
//! else a fraction of physical memory.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{MemError, Result};
use crate::size::{ByteSize, Size, fraction_of};

/// The environment variable that sets the global ceiling (`512MiB`, `2GiB`, a byte count).
pub const MEMORY_LIMIT_ENV: &str = "NODEDB_MEMORY_LIMIT";

/// Share of physical memory used as the ceiling when no limit is configured or inherited.
pub const DEFAULT_RAM_FRACTION: f64 = 0.80;

/// Where the global ceiling came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CeilingSource {
    /// Set on the builder.
    Explicit,
    /// Parsed from `NODEDB_MEMORY_LIMIT`.
    Environment,
    /// The memory limit of the process's cgroup (the tightest `memory.max` or `memory.high`
    /// on the path to the root; v1 `memory.limit_in_bytes`), less the cgroup margin (see
    /// [`GovernorBuilder::cgroup_margin`](crate::GovernorBuilder::cgroup_margin)); followed
    /// while the governor runs.
    Cgroup {
        /// The limit file that set it.
        path: PathBuf,
        /// The limit it held.
        limit: u64,
    },
    /// [`DEFAULT_RAM_FRACTION`] of physical memory.
    PhysicalMemory {
        /// Total physical memory in bytes.
        total: u64,
    },
}

impl fmt::Display for CeilingSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CeilingSource::Explicit => f.write_str("set by the builder"),
            CeilingSource::Environment => write!(f, "from {MEMORY_LIMIT_ENV}"),
            CeilingSource::Cgroup { path, limit } => write!(
                f,
                "cgroup limit {} ({}) less a margin",
                path.display(),
                ByteSize(*limit)
            ),
            CeilingSource::PhysicalMemory { total } => write!(
                f,
                "{}% of physical memory ({})",
                DEFAULT_RAM_FRACTION * 100.0,
                ByteSize(*total)
            ),
        }
    }
}

/// Decides the default ceiling from an environment value and a filesystem root (`/` in
/// production; a directory of fake `/proc` and `/sys` files in tests).
pub(crate) fn detect(env_value: Option<&str>, root: &Path) -> Result<(u64, CeilingSource)> {
    if let Some(value) = env_value {
        return match Size::parse(value) {
            Ok(Size::Bytes(b)) => Ok((b, CeilingSource::Environment)),
            Ok(Size::Fraction(_)) => Err(MemError::config(
                MEMORY_LIMIT_ENV,
                format!("{value:?}"),
                "the ceiling must be a size, not a percentage",
            )),
            Err(reason) => Err(MemError::InvalidSize {
                field: MEMORY_LIMIT_ENV.into(),
                input: value.into(),
                reason,
            }),
        };
    }
    if let Some(l) = crate::cgroup::Cgroup::find(root).and_then(|c| c.limit().ok().flatten()) {
        return Ok((
            l.bytes,
            CeilingSource::Cgroup {
                path: l.file,
                limit: l.bytes,
            },
        ));
    }
    let total = physical_memory(root).ok_or_else(|| MemError::Io {
        what: "reading total physical memory (no cgroup limit and no NODEDB_MEMORY_LIMIT)".into(),
        source: std::io::Error::other("neither /proc/meminfo nor sysconf reported it"),
    })?;
    Ok((
        fraction_of(total, DEFAULT_RAM_FRACTION),
        CeilingSource::PhysicalMemory { total },
    ))
}

/// Total physical memory: `MemTotal` from `/proc/meminfo` under `root`, else `sysconf`.
pub(crate) fn physical_memory(root: &Path) -> Option<u64> {
    if let Ok(text) = std::fs::read_to_string(root.join("proc/meminfo")) {
        let kib = text
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            });
        if let Some(kib) = kib {
            return kib.checked_mul(1024);
        }
    }
    if root != Path::new("/") {
        return None;
    }
    // SAFETY: sysconf has no preconditions; it returns -1 for unknown names, handled below.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let (pages, page_size) = (u64::try_from(pages).ok()?, u64::try_from(page_size).ok()?);
    pages.checked_mul(page_size)
}

#[cfg(all(test, not(nodedb_mem_loom)))]
mod tests {
    use super::*;
    use crate::test_support::FakeRoot;

    #[test]
    fn environment_wins_and_is_parsed() {
        let root = FakeRoot::new();
        root.file("sys/fs/cgroup/memory.max", "1048576\n")
            .file("proc/self/cgroup", "0::/\n");
        assert_eq!(
            detect(Some("2GiB"), root.path()).unwrap(),
            (2 << 30, CeilingSource::Environment)
        );
        assert_eq!(detect(Some("536870912"), root.path()).unwrap().0, 512 << 20);
        let e = detect(Some("2 gigs"), root.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid size for `NODEDB_MEMORY_LIMIT`: \"2 gigs\": unknown unit (expected B, KiB, MiB, GiB, TiB, KB, MB, GB, TB or %)"
        );
        let e = detect(Some("50%"), root.path()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid configuration `NODEDB_MEMORY_LIMIT` = \"50%\": the ceiling must be a size, not a percentage"
        );
    }

    #[test]
    fn cgroup_v2_takes_the_tightest_limit_on_the_path() {
        let root = FakeRoot::new();
        root.file("proc/self/cgroup", "0::/app/worker\n")
            .file("sys/fs/cgroup/memory.max", "max\n")
            .file("sys/fs/cgroup/app/memory.max", "2147483648\n")
            .file("sys/fs/cgroup/app/worker/memory.max", "max\n")
            .file("sys/fs/cgroup/app/worker/memory.high", "max\n")
            .file("sys/fs/cgroup/app/worker/memory.current", "0\n")
            .file("proc/meminfo", "MemTotal:       24683656 kB\n");
        let (bytes, src) = detect(None, root.path()).unwrap();
        assert_eq!(bytes, 2 << 30);
        assert_eq!(
            src,
            CeilingSource::Cgroup {
                path: root.path().join("sys/fs/cgroup/app/memory.max"),
                limit: 2 << 30
            }
        );
        // A lower memory.high is what the ceiling follows (the kernel throttles there).
        root.file("sys/fs/cgroup/app/worker/memory.high", "1073741824\n");
        let (bytes, src) = detect(None, root.path()).unwrap();
        assert_eq!(
            (bytes, src.to_string()),
            (
                1 << 30,
                format!(
                    "cgroup limit {} (1 GiB) less a margin",
                    root.path()
                        .join("sys/fs/cgroup/app/worker/memory.high")
                        .display()
                )
            )
        );
    }

    #[test]
    fn cgroup_v1_ignores_the_unlimited_value() {
        let root = FakeRoot::new();
        root.file(
            "proc/self/cgroup",
            "9:name=systemd:/\n4:cpu,memory:/job/1\n0::/\n",
        )
        .file(
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        )
        .file(
            "sys/fs/cgroup/memory/job/1/memory.limit_in_bytes",
            "1073741824\n",
        )
        .file("proc/meminfo", "MemTotal:       1000 kB\n");
        assert_eq!(detect(None, root.path()).unwrap().0, 1 << 30);

        let root = FakeRoot::new();
        root.file("proc/self/cgroup", "4:memory:/job\n")
            .file(
                "sys/fs/cgroup/memory/job/memory.limit_in_bytes",
                "9223372036854771712\n",
            )
            .file("proc/meminfo", "MemTotal:       1000 kB\n");
        assert_eq!(
            detect(None, root.path()).unwrap(),
            (819_200, CeilingSource::PhysicalMemory { total: 1_024_000 })
        );
    }

    #[test]
    fn without_cgroup_files_physical_memory_decides() {
        let root = FakeRoot::new();
        root.file("proc/meminfo", "MemFree: 1 kB\nMemTotal:    2097152 kB\n");
        assert_eq!(
            detect(None, root.path()).unwrap(),
            (
                fraction_of(2 << 30, DEFAULT_RAM_FRACTION),
                CeilingSource::PhysicalMemory { total: 2 << 30 }
            )
        );
        let empty = FakeRoot::new();
        let e = detect(None, empty.path()).unwrap_err();
        assert!(
            e.to_string().starts_with("reading total physical memory"),
            "{e}"
        );
    }

    #[test]
    fn the_real_machine_has_a_ceiling() {
        let (bytes, _src) = detect(None, Path::new("/")).unwrap();
        assert!(bytes > 0);
    }
}
