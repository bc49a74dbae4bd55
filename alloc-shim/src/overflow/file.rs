//! The overflow region's backing file: where it may live (not on tmpfs) and how it is made
//! (unnamed, `O_TMPFILE`, or created and unlinked at once).

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::error::{OverflowError, last_errno};

/// `TMPFS_MAGIC` from `linux/magic.h`.
const TMPFS_MAGIC: i64 = 0x0102_1994;

pub(super) fn is_tmpfs(dir: &CString) -> Result<bool, OverflowError> {
    // SAFETY: `statfs` fills the zeroed struct for the NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(dir.as_ptr(), &mut st) } != 0 {
        return Err(last_errno("inspecting the overflow directory"));
    }
    Ok(st.f_type as i64 == TMPFS_MAGIC)
}

/// An unnamed file in `dir`: `O_TMPFILE` where the filesystem supports it, else a fresh `0600`
/// file unlinked as soon as it is open.
pub(super) fn open_unnamed(cdir: &CString, dir: &Path) -> Result<OwnedFd, OverflowError> {
    // SAFETY: a NUL-terminated path, flags and a mode: open has no other preconditions.
    let fd = unsafe {
        libc::open(
            cdir.as_ptr(),
            libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd >= 0 {
        // SAFETY: `fd` was just opened and is owned by nobody else.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    for attempt in 0..16u32 {
        let name = dir.join(format!(
            ".nodedb-mem-overflow-{}-{}-{attempt}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        let cname = CString::new(name.as_os_str().as_bytes()).map_err(|_| OverflowError::Os {
            op: "overflow file name",
            errno: libc::EINVAL,
        })?;
        // SAFETY: as above.
        let fd = unsafe {
            libc::open(
                cname.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd >= 0 {
            // SAFETY: `fd` was just opened; unlinking the name leaves the open file alive.
            let file = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: a NUL-terminated path we just created.
            unsafe { libc::unlink(cname.as_ptr()) };
            return Ok(file);
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
            return Err(last_errno("creating the overflow file"));
        }
    }
    Err(last_errno("creating the overflow file"))
}
