//! `OverflowRegion`: pageable, file-backed memory for an engine that is over its budget.
//!
//! The region is one reserved virtual range (`PROT_NONE`, no commit charge) backed by an
//! unlinked file, mapped `MAP_SHARED` piece by piece as it grows. The kernel can write its
//! pages back to the file and evict them, and [`OverflowRegion::page_out`] pushes cold pages
//! out on purpose, so the process's resident memory drops while the data stays intact. Every
//! call here is a system call and allocates nothing, so the allocator's extent hooks can use
//! a region.

use std::ffi::CString;
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use super::error::OverflowError;
use super::error::last_errno;
use super::fault;
use super::file::{is_tmpfs, open_unnamed};

const PAGE: usize = 4096;
/// `MADV_PAGEOUT` (Linux 5.4).
const MADV_PAGEOUT: libc::c_int = 21;

/// How [`OverflowRegion::page_out`] released the pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageOutMethod {
    /// `madvise(MADV_PAGEOUT)`: the kernel reclaimed the pages (written back first if dirty).
    Pageout,
    /// `msync` + `madvise(MADV_DONTNEED)` + `posix_fadvise(POSIX_FADV_DONTNEED)`, where
    /// `MADV_PAGEOUT` is not supported.
    SyncAndDrop,
}

/// Pageable memory backed by an unlinked file (see the module documentation).
pub struct OverflowRegion {
    file: OwnedFd,
    base: *mut u8,
    capacity: usize,
    /// Bytes backed by file blocks (and the file's size): grows only.
    len: AtomicUsize,
    dir: PathBuf,
    /// Whether `base..base + capacity` was reserved by the region itself (unmapped on drop)
    /// or lent to it by the allocator (left to the allocator).
    owns_range: bool,
}

// SAFETY: the region's memory is shared by design; `base` and `capacity` never change and
// `len` is atomic. Growth maps file pages beyond `len` (a concurrent growth may map some of
// them again: the same file pages, shared), so no thread sees its data change under it.
unsafe impl Send for OverflowRegion {}
// SAFETY: as above.
unsafe impl Sync for OverflowRegion {}

impl fmt::Debug for OverflowRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OverflowRegion")
            .field("dir", &self.dir)
            .field("base", &self.base)
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl OverflowRegion {
    /// Creates a region of up to `capacity` bytes (rounded up to whole pages), backed by a
    /// file in `dir` that has no name (`O_TMPFILE`, or created `0600` and unlinked at once), so
    /// it disappears with the process. The capacity is reserved (inaccessible, no commit
    /// charge) and the file is empty: the part grown with [`grow_to`](Self::grow_to) is backed
    /// by file blocks and mapped `MAP_SHARED` over the reservation, piece by piece, and only
    /// that may be touched. (Mapping the whole capacity at once left gigabytes of pages past
    /// the file's end mapped: a tool that reads every mapping, as valgrind's leak check does at
    /// exit, took a `SIGBUS` per page and never finished.) Refuses a directory on tmpfs unless
    /// `allow_tmpfs`.
    pub fn create(
        dir: &Path,
        capacity: usize,
        allow_tmpfs: bool,
    ) -> Result<OverflowRegion, OverflowError> {
        Self::create_at(dir, capacity, allow_tmpfs, None)
    }

    /// As [`create`](Self::create), mapped over `at`, a reserved range of at least `capacity`
    /// bytes that the caller owns and keeps reserved after the region is dropped.
    pub(crate) fn create_at(
        dir: &Path,
        capacity: usize,
        allow_tmpfs: bool,
        at: Option<*mut u8>,
    ) -> Result<OverflowRegion, OverflowError> {
        if capacity == 0 {
            return Err(OverflowError::ZeroCapacity);
        }
        let capacity = capacity
            .checked_next_multiple_of(PAGE)
            .ok_or(OverflowError::Exhausted {
                requested: capacity,
                capacity: usize::MAX,
            })?;
        let cdir = CString::new(dir.as_os_str().as_bytes()).map_err(|_| OverflowError::Os {
            op: "overflow directory path",
            errno: libc::EINVAL,
        })?;
        if !allow_tmpfs && is_tmpfs(&cdir)? {
            return Err(OverflowError::Tmpfs);
        }
        let file = open_unnamed(&cdir, dir)?;
        if let Some(errno) = fault::check() {
            return Err(OverflowError::Os {
                op: "mapping the overflow file",
                errno,
            });
        }
        let base = match at {
            Some(p) => p.cast::<libc::c_void>(),
            None => {
                // SAFETY: a fresh inaccessible reservation at an address of the kernel's
                // choice: no existing memory is affected.
                let p = unsafe {
                    libc::mmap(
                        ptr::null_mut(),
                        capacity,
                        libc::PROT_NONE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                        -1,
                        0,
                    )
                };
                if p == libc::MAP_FAILED {
                    return Err(last_errno("mapping the overflow file"));
                }
                p
            }
        };
        Ok(OverflowRegion {
            file,
            base: base.cast(),
            capacity,
            len: AtomicUsize::new(0),
            dir: dir.to_path_buf(),
            owns_range: at.is_none(),
        })
    }

    /// Start of the region.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// Bytes mapped so far.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether nothing is mapped yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most the region can grow to.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The directory holding the (unnamed) backing file.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The backing file's descriptor (for inspection: `fstat`, `/proc/self/fd`).
    pub fn file(&self) -> &OwnedFd {
        &self.file
    }

    /// Whether `ptr` lies in the region's range.
    pub fn contains(&self, ptr: *const u8) -> bool {
        (ptr as usize).wrapping_sub(self.base as usize) < self.capacity
    }

    /// Backs the first `len` bytes (rounded up to pages) with file blocks, so they may be
    /// touched; returns the backed length. Never shrinks. Safe to call concurrently: the
    /// blocks are allocated with `fallocate`, which never shrinks the file, and the length only
    /// grows. Disk exhaustion shows here (`ENOSPC`), not later as a fault on first touch.
    pub fn grow_to(&self, len: usize) -> Result<usize, OverflowError> {
        let len = len.checked_next_multiple_of(PAGE).unwrap_or(usize::MAX);
        let old = self.len();
        if len <= old {
            return Ok(old);
        }
        if len > self.capacity {
            return Err(OverflowError::Exhausted {
                requested: len,
                capacity: self.capacity,
            });
        }
        if let Some(errno) = fault::check() {
            return Err(OverflowError::Os {
                op: "growing the overflow file",
                errno,
            });
        }
        // SAFETY: `file` is our open descriptor; fallocate(mode 0) allocates blocks for the
        // range and extends the file's size if needed, never shrinking it. Both values fit
        // `off_t` because `len <= capacity`, itself a mapped length.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                0,
                old as libc::off_t,
                (len - old) as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(last_errno("growing the overflow file"));
        }
        // SAFETY: `[base + old, base + len)` lies inside the region's reservation
        // (`len <= capacity`) and holds either nothing (the inaccessible reservation) or a
        // mapping of the same file pages made by a concurrent growth: MAP_FIXED replaces it
        // with a shared mapping of the same pages, so no data is lost (shared writes live in
        // the page cache, not in the mapping). The file offset `old` is page-aligned.
        let p = unsafe {
            libc::mmap(
                self.base.add(old).cast(),
                len - old,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                self.file.as_raw_fd(),
                old as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_errno("mapping the overflow file"));
        }
        // A `fork` child sharing these pages would corrupt the parent's heap: children do not
        // inherit them (they must `exec`, or start fresh overflow state).
        // SAFETY: the piece was just mapped by us.
        unsafe { libc::madvise(p, len - old, libc::MADV_DONTFORK) };
        self.len.fetch_max(len, Ordering::AcqRel);
        Ok(len.max(self.len()))
    }

    /// Pushes the pages of `[offset, offset + len)` out of memory: `MADV_PAGEOUT` where the
    /// kernel has it, else write-back and drop. The data stays intact (it is read back from the
    /// file on the next touch). `MADV_PAGEOUT` reclaims what it can; pages it cannot take at
    /// that moment (dirty ones while the disk is busy writing back other files: a 64 MiB region
    /// kept 62 MiB resident beside a 2 GiB flush) are then unmapped with `MADV_DONTNEED`, so the
    /// process's resident memory falls in every case. The page cache may keep some of them; see
    /// [`push_out`](Self::push_out) for a release of both.
    pub fn page_out(&self, offset: usize, len: usize) -> Result<PageOutMethod, OverflowError> {
        let (addr, len) = self.span(offset, len)?;
        // SAFETY: `[addr, addr + len)` is a mapped part of the region (checked by `span`);
        // MADV_PAGEOUT and MADV_DONTNEED on a shared file mapping keep the data in the file or
        // the page cache.
        if unsafe { libc::madvise(addr, len, MADV_PAGEOUT) } == 0 {
            // SAFETY: as above.
            unsafe { libc::madvise(addr, len, libc::MADV_DONTNEED) };
            return Ok(PageOutMethod::Pageout);
        }
        // SAFETY: as above; msync writes the shared pages back to the file, MADV_DONTNEED
        // drops this mapping's view of them (the file keeps the data), and POSIX_FADV_DONTNEED
        // asks the page cache to drop the clean pages.
        unsafe {
            if libc::msync(addr, len, libc::MS_SYNC) != 0 {
                return Err(last_errno("writing overflow pages back"));
            }
            libc::madvise(addr, len, libc::MADV_DONTNEED);
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
        Ok(PageOutMethod::SyncAndDrop)
    }

    /// Pushes the pages of `[offset, offset + len)` out of the process *and* out of the page
    /// cache: drops this mapping's view of them (`MADV_DONTNEED`: resident memory falls at
    /// once; dirty pages stay in the page cache, nothing is lost), writes them back to the file
    /// and waits (`sync_file_range`), then drops the now clean cached pages
    /// (`POSIX_FADV_DONTNEED`), so a memory cgroup stops charging them too. The data stays
    /// intact: the next touch reads it back from the file. Blocks on the disk's write speed.
    pub fn push_out(&self, offset: usize, len: usize) -> Result<(), OverflowError> {
        let (addr, len) = self.span(offset, len)?;
        // SAFETY: `[addr, addr + len)` is a mapped, shared part of the region (checked by
        // `span`); MADV_DONTNEED on a shared file mapping only unmaps the pages (their dirty
        // state moves to the page cache).
        if unsafe { libc::madvise(addr, len, libc::MADV_DONTNEED) } != 0 {
            return Err(last_errno("dropping overflow pages"));
        }
        let fd = self.file.as_raw_fd();
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: our open descriptor and a byte range of it (`offset + len <= len()`, which
        // fits `off_t` as a mapped length).
        if unsafe { libc::sync_file_range(fd, offset as libc::off_t, len as libc::off_t, flags) }
            != 0
        {
            return Err(last_errno("writing overflow pages back"));
        }
        // SAFETY: as above; advice only.
        unsafe {
            libc::posix_fadvise(
                fd,
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
        Ok(())
    }

    /// Frees the file blocks behind `[offset, offset + len)`: the pages read back as zeros
    /// afterwards (what jemalloc's forced purge promises; `MADV_DONTNEED` alone would leave
    /// the file's bytes).
    pub fn punch_hole(&self, offset: usize, len: usize) -> Result<(), OverflowError> {
        let (addr, len) = self.span(offset, len)?;
        // SAFETY: `[addr, addr + len)` is a mapped, shared part of the region; MADV_REMOVE
        // frees the backing store of exactly that range.
        if unsafe { libc::madvise(addr, len, libc::MADV_REMOVE) } != 0 {
            return Err(last_errno("punching a hole in the overflow file"));
        }
        Ok(())
    }

    /// Backs `[offset, offset + len)` with file blocks again after [`punch_hole`] freed them
    /// (a decommitted extent that jemalloc commits for reuse): the pages read as zeros, and a
    /// full disk shows here as an error instead of a `SIGBUS` at the first write.
    ///
    /// [`punch_hole`]: Self::punch_hole
    pub(crate) fn back(&self, offset: usize, len: usize) -> Result<(), OverflowError> {
        self.span(offset, len)?;
        if let Some(errno) = fault::check() {
            return Err(OverflowError::Os {
                op: "backing overflow pages again",
                errno,
            });
        }
        // SAFETY: our open descriptor and a byte range inside the file's backed length
        // (checked by `span`, so both values fit `off_t`); mode 0 allocates blocks for holes
        // and leaves allocated ones as they are, never shrinking the file.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                0,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(last_errno("backing overflow pages again"));
        }
        Ok(())
    }

    fn span(&self, offset: usize, len: usize) -> Result<(*mut libc::c_void, usize), OverflowError> {
        let end = offset.saturating_add(len);
        if !offset.is_multiple_of(PAGE) || end > self.len() {
            return Err(OverflowError::Os {
                op: "selecting overflow pages",
                errno: libc::EINVAL,
            });
        }
        // SAFETY: `offset < len() <= capacity`, so the pointer stays inside the reservation.
        Ok((unsafe { self.base.add(offset) }.cast(), len))
    }
}

impl Drop for OverflowRegion {
    fn drop(&mut self) {
        if self.owns_range {
            // SAFETY: the mapping is ours and nothing refers to it once the region is dropped.
            unsafe { libc::munmap(self.base.cast(), self.capacity) };
        } else {
            // The range was lent by the allocator (a region that was never put to use: the
            // regions it serves live for the process): give it back as it was lent, an
            // inaccessible reservation, so nothing else is mapped inside it.
            // SAFETY: `base..base + capacity` is the lent range, which our file mapping alone
            // occupies and nothing refers to any more; MAP_FIXED replaces exactly that.
            unsafe {
                libc::mmap(
                    self.base.cast(),
                    self.capacity,
                    libc::PROT_NONE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    -1,
                    0,
                );
            }
        }
    }
}
