//! Small kernel files the background thread reads on every tick (`/proc/self/status`, a
//! cgroup's limits and stall time), opened once and read with `pread`.
//!
//! Measured on the 2-core VM of `docs/benchmarks.md`, in CPU time of a thread that slept
//! 50 ms before (as the background thread always has): an open, read and close of
//! `/proc/self/status` costs 110–160 µs, a `pread` of the file kept open 30–50 µs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One file kept open, behind a lock that is only ever tried: a caller that finds it held
/// reads without keeping, so a child forked while another thread held it cannot hang. The file
/// is closed and opened again when it stops reading (its cgroup was removed) and after a `fork`
/// (a `/proc/self` descriptor still names the parent).
#[derive(Debug)]
pub(crate) struct KeptFile {
    path: PathBuf,
    open: Mutex<Option<Kept>>,
}

#[derive(Debug)]
struct Kept {
    file: File,
    /// The process that opened it (a `/proc/self` file names that process).
    pid: u32,
    /// Whether the file lives on a kernel file system (procfs, sysfs, cgroupfs), which fails
    /// reads of a removed file by itself; a plain file (a test's fake tree) is checked for
    /// links instead.
    pseudo: bool,
}

/// The longest text read: `/proc/self/status` is about 1.5 KiB, limit and pressure files
/// under 200 bytes.
const MAX_TEXT: usize = 8192;

impl KeptFile {
    pub(crate) fn new(path: PathBuf) -> KeptFile {
        KeptFile {
            path,
            open: Mutex::new(None),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Calls `f` with the file's text (its first [`MAX_TEXT`] bytes, invalid UTF-8 replaced),
    /// read from a descriptor kept open since the first call: no heap allocation after it,
    /// unless the text is not UTF-8.
    pub(crate) fn with_text<T>(&self, f: impl FnOnce(&str) -> T) -> std::io::Result<T> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; MAX_TEXT];
        let mut open = match self.open.try_lock() {
            Ok(open) => open,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            // Another thread is reading (or held the lock when this process was forked from
            // it, and will never release it here): read without keeping.
            Err(std::sync::TryLockError::WouldBlock) => {
                let n = File::open(&self.path)?.read_at(&mut buf, 0)?;
                return Ok(f(&String::from_utf8_lossy(&buf[..n])));
            }
        };
        let pid = std::process::id();
        if let Some(k) = open.as_ref() {
            let gone = k.pid != pid || (!k.pseudo && links(&k.file) == 0);
            match k.file.read_at(&mut buf, 0) {
                Ok(n) if !gone => return Ok(f(&String::from_utf8_lossy(&buf[..n]))),
                _ => *open = None,
            }
        }
        let file = File::open(&self.path)?;
        let n = file.read_at(&mut buf, 0)?;
        let pseudo = on_kernel_fs(&file);
        *open = Some(Kept { file, pid, pseudo });
        Ok(f(&String::from_utf8_lossy(&buf[..n])))
    }

    #[cfg(test)]
    fn is_open(&self) -> Option<bool> {
        self.open.lock().unwrap().as_ref().map(|k| k.pseudo)
    }
}

/// The file's hard links (0 once removed); unknown counts as present.
fn links(file: &File) -> u64 {
    use std::os::unix::fs::MetadataExt;
    file.metadata().map_or(1, |m| m.nlink())
}

/// Whether `file` is on procfs, sysfs or a cgroup file system.
fn on_kernel_fs(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: `statfs` is plain old data, for which all zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the descriptor is open for the duration of the call, and `st` is a valid,
    // writable `statfs`.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    // `statfs(2)`'s magic numbers of procfs, sysfs, cgroup v1 and v2.
    const KERNEL_FS: [i64; 4] = [0x9fa0, 0x6265_6572, 0x0027_e0eb, 0x6367_7270];
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's type differs between targets"
    )]
    let kind = st.f_type as i64;
    KERNEL_FS.contains(&kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_file_reads_its_new_text_and_a_replaced_one_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("limit");
        std::fs::write(&p, "100\n").unwrap();
        let kept = KeptFile::new(p.clone());
        let read = || kept.with_text(str::to_owned);
        assert_eq!(read().unwrap(), "100\n");
        // Rewritten in place: the same descriptor reads the new text.
        std::fs::write(&p, "200\n").unwrap();
        assert_eq!(read().unwrap(), "200\n");
        // Replaced by another file: the removed one is noticed and the new one opened.
        let q = dir.path().join("limit.new");
        std::fs::write(&q, "300\n").unwrap();
        std::fs::rename(&q, &p).unwrap();
        assert_eq!(read().unwrap(), "300\n");
        // Removed: the error, and nothing stale kept.
        std::fs::remove_file(&p).unwrap();
        assert_eq!(read().unwrap_err().kind(), std::io::ErrorKind::NotFound);
        assert_eq!(kept.is_open(), None);
        // Held by another reader: read without keeping.
        std::fs::write(&p, "400\n").unwrap();
        let held = kept.open.lock().unwrap();
        assert_eq!(read().unwrap(), "400\n");
        drop(held);
        assert_eq!(kept.is_open(), None);
    }

    #[test]
    fn proc_files_are_known_as_kernel_files_and_plain_ones_are_not() {
        let status = KeptFile::new("/proc/self/status".into());
        let rss = status
            .with_text(|t| t.lines().any(|l| l.starts_with("VmRSS:")))
            .unwrap();
        assert!(rss);
        assert_eq!(status.is_open(), Some(true));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, "x").unwrap();
        let file = KeptFile::new(p);
        assert_eq!(file.with_text(str::to_owned).unwrap(), "x");
        assert_eq!(file.is_open(), Some(false));
    }
}
