//! Keeping one engine's bulk file I/O from evicting another engine's hot pages.
//!
//! Every buffered write leaves its pages in the page cache, dirty and then clean, until memory
//! pressure evicts *something* — often another engine's hot index. A [`GovernedWriter`] charges
//! what it leaves in the page cache to its engine, and past the engine's page-cache budget
//! writes back and drops the pages behind itself (`sync_file_range`, then
//! `POSIX_FADV_DONTNEED`; RocksDB's `bytes_per_sync` and drop-behind), so a bulk flush streams
//! through the cache instead of filling it; [`MemoryGovernor::direct_writer`] writes around the
//! cache altogether (`O_DIRECT`). A [`GovernedReader`] does the same for one-pass
//! reads. [`Protected`] keeps an engine's hot mapped data resident (`mlock`), counted against
//! its budget and the ceiling.
//!
//! ```
//! use std::io::Write;
//! use nodedb_mem::{EngineId, MemoryGovernor};
//!
//! let gov = MemoryGovernor::builder()
//!     .global_ceiling(256 << 20)
//!     .page_cache_budget(EngineId::Timeseries, 8u64 << 20)
//!     .build()?;
//! let file = tempfile::tempfile().expect("a temp file");
//! let mut w = gov.writer(EngineId::Timeseries, file)?;
//! for _ in 0..64 {
//!     w.write_all(&[7u8; 1 << 20])?; // 64 MiB through an 8 MiB page-cache budget
//! }
//! let file = w.finish()?; // written back; nothing of it left in the cache
//! assert_eq!(gov.page_cache(EngineId::Timeseries).left_behind, 0);
//! // At most the budget plus one write is ever left behind.
//! assert!(gov.page_cache(EngineId::Timeseries).peak <= (8 << 20) + (1 << 20));
//! # drop(file);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use crate::EngineId;
use crate::error::{MemError, Result};
use crate::governor::MemoryGovernor;
use crate::ledger::Reservation;
use crate::sync::lock;

pub(crate) mod ledger;

pub use ledger::PageCacheStats;
use ledger::{PageCacheLedger, lock_regions, resident_range};

impl MemoryGovernor {
    /// A writer over `file` (from its current position) whose page-cache footprint is charged
    /// to `engine` and held under the engine's page-cache budget: past it, it writes back and
    /// drops its pages behind itself. See [`GovernedWriter`](crate::GovernedWriter).
    pub fn writer(&self, engine: EngineId, file: std::fs::File) -> Result<crate::GovernedWriter> {
        crate::cache::GovernedWriter::new(self, engine, file, false)
    }

    /// A writer like [`writer`](Self::writer) that writes around the page cache with direct
    /// I/O (`O_DIRECT`, set on the caller's descriptor and put back by `finish`): it gathers
    /// 1 MiB in an aligned buffer and writes it at once, so a bulk flush leaves nothing in the
    /// cache but a partial block at either end, which goes through the cache and is dropped
    /// behind. Where the file system does not do direct I/O it is an ordinary governed writer
    /// ([`GovernedWriter::is_direct`](crate::GovernedWriter::is_direct) says which).
    /// `O_DIRECT` is a flag of the open file description, so descriptors cloned from `file`
    /// share it until the writer finishes.
    pub fn direct_writer(
        &self,
        engine: EngineId,
        file: std::fs::File,
    ) -> Result<crate::GovernedWriter> {
        crate::cache::GovernedWriter::new(self, engine, file, true)
    }

    /// A one-pass reader over `file` whose page-cache footprint is charged to `engine` and
    /// dropped behind past its page-cache budget. See [`GovernedReader`](crate::GovernedReader).
    pub fn reader(&self, engine: EngineId, file: std::fs::File) -> Result<crate::GovernedReader> {
        crate::cache::GovernedReader::new(self, engine, file)
    }

    /// Keeps `data` (mapped memory: an index, the upper layers of a graph) resident for as long
    /// as the guard lives: reserves its size against `engine`'s budget and the ceiling (a
    /// refusal is the usual [`MemError::BudgetExceeded`] / [`MemError::CeilingExceeded`]),
    /// then locks it with `mlock` (refused by `RLIMIT_MEMLOCK`: [`MemError::Io`], saying the
    /// limit and how to raise it).
    pub fn protect<'a>(&self, engine: EngineId, data: &'a [u8]) -> Result<crate::Protected<'a>> {
        crate::cache::Protected::new(self, engine, data)
    }

    /// Drops the files under `dir` from the page cache behind whoever writes them (for files a
    /// library writes itself, such as DataFusion's spill files): at every tick of the background
    /// thread, or at [`sweep_governed_dirs`](Self::sweep_governed_dirs), each file's dirty pages
    /// are handed to write-back and its clean pages dropped, and what was cached is reported as
    /// `engine`'s (`PageCacheStats::dirs_cached`). Sampled, not bounded: between two sweeps the
    /// writer can fill the cache at its own pace; use [`writer`](Self::writer) where the code
    /// that writes is yours. A sweep looks only where files hold data, and at most at
    /// [`sweep_budget`](crate::GovernorBuilder::sweep_budget) bytes of it per directory (the
    /// next one resumes where it stopped). A directory that does not exist is refused.
    pub fn govern_dir(&self, engine: EngineId, dir: impl Into<std::path::PathBuf>) -> Result<()> {
        let dir = dir.into();
        if !dir.is_dir() {
            return Err(MemError::config(
                "governed directory",
                dir.display(),
                "not a directory",
            ));
        }
        lock(&self.inner.governed_dirs).push(GovernedDir {
            engine,
            dir,
            resume: None,
        });
        Ok(())
    }

    /// Sweeps every governed directory now (see [`govern_dir`](Self::govern_dir)) and returns
    /// what it found, summed over them. The background thread calls this at every tick.
    pub fn sweep_governed_dirs(&self) -> crate::SweepStats {
        let dirs = lock(&self.inner.governed_dirs).clone();
        let mut total = crate::SweepStats::default();
        let mut per_engine = [crate::SweepStats::default(); EngineId::COUNT];
        let mut resumes = Vec::with_capacity(dirs.len());
        for d in &dirs {
            resumes.push(crate::cache::sweep_dir(
                &d.dir,
                d.resume.clone(),
                self.inner.sweep_budget,
                &mut per_engine[d.engine.index()],
            ));
        }
        {
            // Directories are only ever added, at the end: the first ones are these.
            let mut live = lock(&self.inner.governed_dirs);
            for (d, resume) in live.iter_mut().zip(resumes) {
                d.resume = resume;
            }
        }
        for e in EngineId::ALL {
            let s = per_engine[e.index()];
            if dirs.iter().any(|d| d.engine == e) {
                self.page_cache_ledger(e).swept(
                    s.cached_before,
                    s.cached_before.saturating_sub(s.cached_after),
                );
            }
            total.files += s.files;
            total.cached_before += s.cached_before;
            total.cached_after += s.cached_after;
        }
        total
    }

    /// `engine`'s page-cache figures: budget, what governed I/O left behind and its peak,
    /// bytes dropped behind, protected bytes.
    pub fn page_cache(&self, engine: EngineId) -> crate::PageCacheStats {
        self.page_cache_ledger(engine)
            .stats(self.page_cache_budget(engine))
    }

    /// The page cache `engine`'s governed I/O may leave behind.
    pub fn page_cache_budget(&self, engine: EngineId) -> u64 {
        self.inner.page_cache_budget[engine.index()]
    }

    pub(crate) fn page_cache_ledger(&self, engine: EngineId) -> &PageCacheLedger {
        &self.inner.page_cache[engine.index()]
    }
}

/// Writes are handed to the kernel for write-back in chunks of this size (RocksDB's
/// `bytes_per_sync`), and dropped behind in chunks of it.
pub const SYNC_CHUNK: u64 = 1 << 20;

/// What one sweep of a governed directory found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Regular files looked at.
    pub files: u64,
    /// Their bytes found in the page cache before the sweep.
    pub cached_before: u64,
    /// Their bytes still in the page cache after it (pages being written back stay until the
    /// next sweep).
    pub cached_after: u64,
}

/// A directory whose files are swept out of the page cache for an engine, and where the last
/// sweep stopped (a file and an offset in it; `None`: at the start).
#[derive(Clone, Debug)]
pub(crate) struct GovernedDir {
    pub(crate) engine: EngineId,
    pub(crate) dir: std::path::PathBuf,
    pub(crate) resume: Option<(std::path::PathBuf, u64)>,
}

/// The regular files under `dir` (three levels down at most, links not followed), in order.
fn files_under(dir: &std::path::Path, depth: u32, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() && depth < 3 {
            files_under(&entry.path(), depth + 1, out);
        } else if kind.is_file() {
            out.push(entry.path());
        }
    }
}

/// Sweeps the regular files under `dir` (three levels down at most, links not followed), in
/// path order from `resume` on, until `budget` bytes of file data were examined: each file's
/// cached pages are measured (`mincore` over a read-only mapping), write-back of its dirty pages
/// is started (`sync_file_range`) and its clean pages are dropped (`POSIX_FADV_DONTNEED`), only
/// where it holds data. Returns where to resume (`None`: every file was reached). Files that
/// vanish meanwhile are skipped.
pub(crate) fn sweep_dir(
    dir: &std::path::Path,
    resume: Option<(std::path::PathBuf, u64)>,
    budget: u64,
    out: &mut SweepStats,
) -> Option<(std::path::PathBuf, u64)> {
    let mut files = Vec::new();
    files_under(dir, 0, &mut files);
    files.sort();
    // From the resume point to the end, then from the start up to it.
    let start = resume
        .as_ref()
        .map_or(0, |(path, _)| files.partition_point(|f| f < path));
    let mut left = budget;
    for (i, path) in files[start..].iter().chain(&files[..start]).enumerate() {
        let from = match &resume {
            Some((p, offset)) if i == 0 && p == path => *offset,
            _ => 0,
        };
        let Ok(file) = File::open(path) else {
            continue;
        };
        let Ok(len) = file.metadata().map(|m| m.len()) else {
            continue;
        };
        out.files += 1;
        for (offset, n) in data_segments(&file, from, len) {
            let n = n.min(left);
            out.cached_before += file_cached_at(&file, offset, n);
            let _ = sync_range(&file, offset, n, false);
            let _ = fadvise_dontneed(&file, offset, n);
            out.cached_after += file_cached_at(&file, offset, n);
            left -= n;
            if left == 0 {
                return Some((path.clone(), offset + n));
            }
        }
    }
    None
}

/// Bytes of `file` in the page cache now (`mincore` over a read-only mapping of it, which
/// faults nothing in).
pub fn cached_bytes(file: &File) -> io::Result<u64> {
    let len = file.metadata()?.len();
    // Finding the data moves the descriptor's position: put it back.
    // SAFETY: a descriptor the `File` owns; `lseek` only reads or sets its position.
    let pos = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_CUR) };
    let cached = file_cached(file, len);
    if pos >= 0 {
        // SAFETY: as above.
        unsafe { libc::lseek(file.as_raw_fd(), pos, libc::SEEK_SET) };
    }
    Ok(cached)
}

/// Bytes of `file`'s first `len` bytes in the page cache (0 where it cannot be mapped), where
/// it holds data.
fn file_cached(file: &File, len: u64) -> u64 {
    data_segments(file, 0, len)
        .map(|(offset, n)| file_cached_at(file, offset, n))
        .sum()
}

/// Bytes of `file`'s `[offset, offset + len)` in the page cache, through mappings of at most
/// 1 GiB at a time (0 for a part that cannot be mapped).
fn file_cached_at(file: &File, offset: u64, len: u64) -> u64 {
    const WINDOW: u64 = 1 << 30;
    let mut cached = 0;
    let mut at = offset - offset % ledger::PAGE as u64;
    let end = offset + len;
    while at < end {
        let n = (end - at).min(WINDOW);
        if let Ok(map) = MappedFile::new_at(file, at, n) {
            cached += resident_bytes(map.bytes()).unwrap_or(0);
        }
        at += n;
    }
    cached
}

/// The `(offset, len)` ranges of `file`'s bytes from `from` to `len` that hold data
/// (`SEEK_DATA` / `SEEK_HOLE`; the whole range where the file system cannot say).
fn data_segments(file: &File, from: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
    let fd = file.as_raw_fd();
    let mut at = from;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let seek = |from: u64, whence| {
            let from = libc::off_t::try_from(from).ok()?;
            // SAFETY: a descriptor the `File` owns; `lseek` with SEEK_DATA / SEEK_HOLE only
            // reports offsets. Each call sets the file position, which no code of ours reads
            // (sweeps open their own descriptors).
            let r = unsafe { libc::lseek(fd, from, whence) };
            u64::try_from(r).ok()
        };
        let Some(start) = seek(at, libc::SEEK_DATA) else {
            // ENXIO: no data past `at`. Any other error: say all of the rest is data.
            let rest = (std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO))
                .then_some((at, len - at));
            at = len;
            return rest;
        };
        if start >= len {
            at = len;
            return None;
        }
        let end = seek(start, libc::SEEK_HOLE).unwrap_or(len).min(len);
        at = end.max(start + 1);
        Some((start, end - start))
    })
}

/// A read-only shared mapping of a file, for [`MemoryGovernor::protect`] and residency checks
/// ([`resident_bytes`]); unmapped on drop. Mapping faults nothing in.
pub struct MappedFile {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned by this value; sharing `&[u8]` views of it across
// threads is as safe as sharing any immutable bytes.
unsafe impl Send for MappedFile {}
// SAFETY: as above.
unsafe impl Sync for MappedFile {}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("addr", &self.ptr)
            .field("len", &self.len)
            .finish()
    }
}

impl MappedFile {
    /// Maps the whole of `file` as it is now.
    pub fn open(file: &File) -> io::Result<MappedFile> {
        let len = file.metadata()?.len();
        MappedFile::new(file, len)
    }

    /// Maps the first `len` bytes of `file`.
    fn new(file: &File, len: u64) -> io::Result<MappedFile> {
        MappedFile::new_at(file, 0, len)
    }

    /// Maps `len` bytes of `file` from `offset` (a multiple of the page size).
    fn new_at(file: &File, offset: u64, len: u64) -> io::Result<MappedFile> {
        let len = usize::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        let offset =
            libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        if len == 0 {
            return Ok(MappedFile {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        // SAFETY: a fresh shared read-only mapping of an open file, at an address of the
        // kernel's choice: no existing memory is affected.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MappedFile { ptr, len })
    }

    /// The mapped bytes (reading them faults the file's pages in).
    pub fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the mapping is readable for `len` bytes while `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.cast(), self.len) }
    }
}

impl Drop for MappedFile {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: our own mapping; views of it borrow `self`, so none outlive this.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

/// The span of one file a governed writer or reader has touched and not yet dropped.
#[derive(Debug)]
struct Behind {
    gov: MemoryGovernor,
    engine: EngineId,
    /// Where the writer or reader started.
    start: u64,
    /// Start of what is still in the cache (everything before is dropped).
    dropped_to: u64,
    /// End of what was written (or read).
    pos: u64,
    /// End of what was handed to the kernel for write-back.
    started_to: u64,
    /// The file cannot be synced or advised (a pipe, `/dev/null`, a file system without
    /// write-back control): it has no page cache of its own to govern, and is written plainly.
    ungoverned: bool,
}

/// Whether `e` says the file has no page cache to control (rather than that controlling it
/// failed): such a file is written as a plain one.
fn no_page_cache(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ESPIPE | libc::EINVAL | libc::ENODEV | libc::EOPNOTSUPP)
    )
}

#[cfg(test)]
thread_local! {
    /// An error the next write-back step (`sync_file_range`) or direct write returns instead
    /// of running, for the unit tests.
    static INJECTED: std::cell::Cell<Option<i32>> = const { std::cell::Cell::new(None) };
}

/// Takes the injected failure, if any (never one outside the unit tests).
fn injected() -> io::Result<()> {
    #[cfg(test)]
    if let Some(errno) = INJECTED.with(std::cell::Cell::take) {
        return Err(io::Error::from_raw_os_error(errno));
    }
    Ok(())
}

impl Behind {
    fn new(gov: &MemoryGovernor, engine: EngineId, pos: u64) -> Behind {
        Behind {
            gov: gov.clone(),
            engine,
            start: pos,
            dropped_to: pos,
            pos,
            started_to: pos,
            ungoverned: false,
        }
    }

    /// `r`, unless it says the file has no page cache to control: then the file is written
    /// plainly from now on (its charge given back), and that is no error.
    fn unless_plain(&mut self, r: io::Result<()>) -> io::Result<()> {
        match r {
            Err(e) if no_page_cache(&e) => {
                self.forget();
                self.ungoverned = true;
                Ok(())
            }
            r => r,
        }
    }

    fn ledger(&self) -> &PageCacheLedger {
        self.gov.page_cache_ledger(self.engine)
    }

    /// After `n` more bytes at `pos`: charge them, start write-back of whole chunks, and drop
    /// behind while the engine is over its page-cache budget.
    ///
    /// The bytes count as written whatever happens; an error is about write-back or advice
    /// only.
    fn advance(&mut self, file: &File, n: u64, writing: bool) -> io::Result<()> {
        if self.ungoverned {
            self.pos += n;
            self.dropped_to = self.pos;
            self.started_to = self.pos;
            return Ok(());
        }
        let r = self.advance_governed(file, n, writing);
        self.unless_plain(r)
    }

    fn advance_governed(&mut self, file: &File, n: u64, writing: bool) -> io::Result<()> {
        self.pos += n;
        let now = self.ledger().add(n);
        if writing && self.pos - self.started_to >= SYNC_CHUNK {
            sync_range(file, self.started_to, self.pos - self.started_to, false)?;
            self.started_to = self.pos;
        }
        let budget = self.gov.page_cache_budget(self.engine);
        if now > budget {
            // Down to half the budget (hysteresis), from this file's oldest pages.
            let mut over = now - budget / 2;
            while over > 0 && self.dropped_to < self.pos {
                let len = (self.pos - self.dropped_to).min(SYNC_CHUNK.max(over));
                self.drop_span(file, len, writing)?;
                over = over.saturating_sub(len);
            }
        }
        Ok(())
    }

    /// Writes back (if writing) and drops `len` bytes from `dropped_to`.
    fn drop_span(&mut self, file: &File, len: u64, writing: bool) -> io::Result<()> {
        if writing {
            sync_range(file, self.dropped_to, len, true)?;
        }
        // Advise from a little behind: the kernel skips pages still in another CPU's LRU batch
        // (or under read-ahead) when asked first, and a second ask drops them.
        let from = self
            .dropped_to
            .saturating_sub(4 * SYNC_CHUNK)
            .max(self.start);
        fadvise_dontneed(file, from, self.dropped_to + len - from)?;
        self.dropped_to += len;
        self.ledger().sub(len);
        Ok(())
    }

    /// Drops everything still left behind, then advises the whole span once more for what the
    /// first passes missed (see [`Behind::drop_span`]).
    fn drop_all(&mut self, file: &File, writing: bool) -> io::Result<()> {
        let len = self.pos - self.dropped_to;
        if len > 0 {
            self.drop_span(file, len, writing)?;
        }
        if self.pos > self.start {
            fadvise_dontneed(file, self.start, self.pos - self.start)?;
        }
        Ok(())
    }

    /// Drops everything left behind as the file is closed; if that fails, gives the charge
    /// back anyway (nothing of this file is tracked after it) and returns the error.
    fn close(&mut self, file: &File, writing: bool) -> io::Result<()> {
        if self.ungoverned {
            return Ok(());
        }
        let r = self.drop_all(file, writing);
        if r.is_err() {
            self.forget();
        }
        self.unless_plain(r)
    }

    /// Moves past `n` bytes written around the page cache (direct I/O): nothing is charged
    /// for them. Only called with nothing left behind.
    fn skip(&mut self, n: u64) {
        debug_assert_eq!(self.dropped_to, self.pos, "skipping with pages left behind");
        self.pos += n;
        self.dropped_to = self.pos;
        self.started_to = self.pos;
        self.ledger().direct.fetch_add(n, Ordering::Relaxed);
    }

    /// Gives the charge back without touching the file (when the file is gone or failed).
    fn forget(&mut self) {
        let len = self.pos - self.dropped_to;
        if len > 0 {
            self.gov
                .page_cache_ledger(self.engine)
                .left
                .fetch_sub(len, Ordering::AcqRel);
            self.dropped_to = self.pos;
        }
    }
}

fn sync_range(file: &File, offset: u64, len: u64, wait: bool) -> io::Result<()> {
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    let (Ok(off), Ok(n)) = (
        libc::off64_t::try_from(offset),
        libc::off64_t::try_from(len),
    ) else {
        return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
    };
    injected()?;
    // SAFETY: a descriptor the `File` owns and a byte range of it; write-back only.
    if unsafe { libc::sync_file_range(file.as_raw_fd(), off, n, flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn fadvise_dontneed(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::from_raw_os_error(libc::EOVERFLOW));
    };
    // SAFETY: a descriptor the `File` owns; advice only.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), off, n, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// A sequential writer over a file the caller opened, whose page-cache footprint is charged to
/// an engine and held under its page-cache budget (see the module docs): after each write the
/// engine's governed I/O has at most its budget plus that write left in the page cache. Writes
/// go to the file at its current position, as `File`'s own `write` does (at its end if it was
/// opened for appending); errors come back unchanged.
///
/// A writer made by [`MemoryGovernor::direct_writer`] writes around the page cache instead
/// (`O_DIRECT`) and leaves nothing there but a partial block at either end; see
/// [`is_direct`](Self::is_direct).
///
/// Dropping the writer writes back and drops what it left behind, ignoring errors; call
/// [`finish`](Self::finish) to see them and get the file back.
#[derive(Debug)]
pub struct GovernedWriter {
    file: Option<File>,
    behind: Behind,
    direct: Option<Direct>,
    /// Trouble after bytes were written, for the next call or `finish` to return.
    deferred: Option<io::Error>,
}

/// A [`GovernedWriter::finish`] that failed: the error, and the writer with everything it
/// held, to try again or drop (`BufWriter::into_inner`'s `IntoInnerError`, for this writer).
/// Converts into the `io::Error` for `?` in functions returning `io::Result`.
#[derive(Debug)]
pub struct FinishError {
    error: io::Error,
    writer: Box<GovernedWriter>,
}

impl FinishError {
    /// The error.
    pub fn error(&self) -> &io::Error {
        &self.error
    }

    /// The writer, to call [`finish`](GovernedWriter::finish) again.
    pub fn into_inner(self) -> GovernedWriter {
        *self.writer
    }

    /// The error and the writer.
    pub fn into_parts(self) -> (io::Error, GovernedWriter) {
        (self.error, *self.writer)
    }
}

impl std::fmt::Display for FinishError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "finishing a governed writer: {}", self.error)
    }
}

impl std::error::Error for FinishError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<FinishError> for io::Error {
    fn from(e: FinishError) -> io::Error {
        e.error
    }
}

/// Bytes a direct writer gathers before it writes them (a multiple of every alignment it
/// accepts).
const DIRECT_CHUNK: usize = SYNC_CHUNK as usize;

/// A direct writer's state: an aligned buffer of what is not written yet, and the descriptor's
/// flags to put back.
#[derive(Debug)]
struct Direct {
    buf: AlignedBuf,
    /// Bytes gathered in `buf`.
    len: usize,
    /// Offsets and lengths of direct writes are multiples of this.
    align: usize,
    /// Bytes still to write through the page cache before the position is aligned.
    head: usize,
    /// The descriptor's flags before `O_DIRECT` was set on it; `None` until it is set.
    flags: Option<libc::c_int>,
}

/// [`DIRECT_CHUNK`] bytes aligned to `align`, as `O_DIRECT` needs: an aligned window into a
/// plain vector one alignment longer.
#[derive(Debug)]
struct AlignedBuf {
    bytes: Vec<u8>,
    offset: usize,
}

impl AlignedBuf {
    fn new(align: usize) -> io::Result<AlignedBuf> {
        let mut bytes = Vec::new();
        bytes
            .try_reserve_exact(DIRECT_CHUNK + align)
            .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        bytes.resize(DIRECT_CHUNK + align, 0);
        let offset = bytes.as_ptr().align_offset(align);
        if offset > align {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(AlignedBuf { bytes, offset })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.offset..self.offset + DIRECT_CHUNK]
    }
}

/// The file's alignment for direct I/O (`statx`'s `STATX_DIOALIGN`: the larger of the memory
/// and offset alignments, at least 512 B), or `None` where its file system does not do direct
/// I/O. Kernels before 6.1 do not report it: 4 KiB is assumed there (every common block size).
fn direct_alignment(file: &File) -> Option<usize> {
    // SAFETY: an all-zero `statx` is valid for the kernel to fill.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor the `File` owns, an empty path with `AT_EMPTY_PATH` (the descriptor
    // itself), and a `statx` to write.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Some(4096);
    }
    if stx.stx_dio_offset_align == 0 {
        return None;
    }
    let align = (stx.stx_dio_offset_align.max(stx.stx_dio_mem_align) as usize).max(512);
    (align.is_power_of_two() && align <= DIRECT_CHUNK).then_some(align)
}

fn get_flags(file: &File) -> io::Result<libc::c_int> {
    // SAFETY: a descriptor the `File` owns; reads its status flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

fn set_flags(file: &File, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: a descriptor the `File` owns; sets its status flags (the access mode is ignored).
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl GovernedWriter {
    pub(crate) fn new(
        gov: &MemoryGovernor,
        engine: EngineId,
        mut file: File,
        direct: bool,
    ) -> Result<Self> {
        let io_err = |what: &str| {
            let what = format!("{what} for a governed writer");
            move |source| MemError::Io { what, source }
        };
        let flags = get_flags(&file).map_err(io_err("reading the file's flags"))?;
        // An appending descriptor writes at the end whatever its position says.
        let pos = if flags & libc::O_APPEND != 0 {
            file.seek(io::SeekFrom::End(0))
        } else {
            file.stream_position()
        };
        // A pipe or a socket has no position, and no page cache: written plainly.
        let (pos, plain) = match pos {
            Err(e) if e.raw_os_error() == Some(libc::ESPIPE) => (0, true),
            pos => (pos.map_err(io_err("reading the file position"))?, false),
        };
        let direct = match (direct && !plain)
            .then(|| direct_alignment(&file))
            .flatten()
        {
            Some(align) => Some(Direct {
                buf: AlignedBuf::new(align).map_err(io_err("allocating the direct-I/O buffer"))?,
                len: 0,
                align,
                head: (pos.next_multiple_of(align as u64) - pos) as usize,
                flags: None,
            }),
            None => None,
        };
        let mut behind = Behind::new(gov, engine, pos);
        behind.ungoverned = plain;
        let mut w = GovernedWriter {
            file: Some(file),
            behind,
            direct,
            deferred: None,
        };
        if w.direct.as_ref().is_some_and(|d| d.head == 0) {
            w.begin_direct()
                .map_err(io_err("setting O_DIRECT on the file"))?;
        }
        Ok(w)
    }

    /// The engine the writer's page cache is charged to.
    pub fn engine(&self) -> EngineId {
        self.behind.engine
    }

    /// Bytes this writer has left in the page cache and not dropped yet.
    pub fn left_behind(&self) -> u64 {
        self.behind.pos - self.behind.dropped_to
    }

    /// Whether the writer writes around the page cache (`O_DIRECT`). False for
    /// [`MemoryGovernor::writer`]'s writers, and for a direct writer whose file system does not
    /// do direct I/O or refused a direct write: those write through the page cache and drop
    /// behind, as any governed writer does. A direct writer that starts at an unaligned
    /// position writes up to the next aligned offset through the page cache first.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// The file written to (for inspection; write through the writer so its pages are
    /// counted). A direct writer may still hold up to 1 MiB it has not written to it.
    pub fn file(&self) -> &File {
        match &self.file {
            Some(f) => f,
            None => unreachable!("the file is only taken by `finish`, which consumes the writer"),
        }
    }

    /// Writes everything back to the file, waits for it, drops it from the page cache and
    /// returns the file. After this the data is on disk (`sync_file_range` with both waits, or
    /// direct writes; call `sync_all` on the file as well for the metadata), and a direct
    /// writer has put the descriptor's flags back as they were.
    ///
    /// A failure gives the writer back with the error ([`FinishError`], as
    /// `BufWriter::into_inner` does): nothing it holds is lost, and `finish` can be tried again
    /// (a direct writer keeps what it gathered and did not write). Trouble writing back or
    /// dropping bytes already written by earlier calls is reported here too.
    pub fn finish(mut self) -> Result<File, FinishError> {
        if let Err(error) = self.end_direct() {
            return Err(FinishError {
                error,
                writer: Box::new(self),
            });
        }
        if let Some(error) = self.deferred.take() {
            return Err(FinishError {
                error,
                writer: Box::new(self),
            });
        }
        let Some(file) = self.file.take() else {
            return Err(FinishError {
                error: io::Error::other("writer already finished"),
                writer: Box::new(self),
            });
        };
        match self.behind.close(&file, true) {
            Ok(()) => Ok(file),
            Err(error) => {
                // The bytes are in the file and nothing is charged for them any more; the
                // writer keeps the file, so another `finish` returns it.
                self.file = Some(file);
                Err(FinishError {
                    error,
                    writer: Box::new(self),
                })
            }
        }
    }

    /// The position is aligned: drop the head written through the cache and set `O_DIRECT`.
    /// Where the descriptor refuses it, the writer goes on through the page cache.
    fn begin_direct(&mut self) -> io::Result<()> {
        let (Some(file), Some(d)) = (self.file.as_ref(), self.direct.as_mut()) else {
            return Ok(());
        };
        let dropped = if self.behind.ungoverned {
            Ok(())
        } else {
            self.behind.drop_all(file, true)
        };
        self.behind.unless_plain(dropped)?;
        let flags = get_flags(file)?;
        match set_flags(file, flags | libc::O_DIRECT) {
            Ok(()) => d.flags = Some(flags),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.direct = None,
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Writes the whole aligned blocks gathered (all of them if `all`, and then the partial
    /// block at the end through the page cache). A direct write refused with `EINVAL` (an
    /// alignment the file system did not report) turns the writer into a buffered one and
    /// writes the rest through the page cache.
    fn write_gathered(&mut self, all: bool) -> io::Result<()> {
        let (Some(file), Some(d)) = (self.file.as_ref(), self.direct.as_mut()) else {
            return Ok(());
        };
        let mut out: &File = file;
        // Without `O_DIRECT` on the descriptor (put back after a refusal or a failed write of
        // the rest), everything goes through the page cache.
        let whole = if d.flags.is_some() {
            d.len - d.len % d.align
        } else {
            0
        };
        let mut done = 0;
        while done < whole {
            let chunk = &d.buf.as_mut()[done..whole];
            match injected().and_then(|()| out.write(chunk)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) if n % d.align == 0 => {
                    self.behind.skip(n as u64);
                    done += n;
                }
                Ok(n) => {
                    // A short write off the alignment: the rest goes through the cache.
                    self.behind.skip(n as u64);
                    done += n;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) => {
                    d.buf.as_mut().copy_within(done..d.len, 0);
                    d.len -= done;
                    return Err(e);
                }
            }
        }
        d.buf.as_mut().copy_within(done..d.len, 0);
        d.len -= done;
        if d.len == 0 || (d.len < d.align && !all && d.flags.is_some()) {
            return Ok(());
        }
        // What is left goes through the page cache: the partial block at the end, or
        // everything after a refused direct write.
        if let Some(flags) = d.flags.take() {
            set_flags(file, flags)?;
        }
        while d.len > 0 {
            match out.write(&d.buf.as_mut()[..d.len]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    d.buf.as_mut().copy_within(n..d.len, 0);
                    d.len -= n;
                    // Written: trouble dropping it behind is reported later, not as a failure
                    // of these bytes.
                    if let Err(e) = self.behind.advance(file, n as u64, true) {
                        self.deferred.get_or_insert(e);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.direct = None;
        Ok(())
    }

    /// Writes what a direct writer gathered and puts the descriptor's flags back. Where writing
    /// fails, what is not written stays gathered (and `O_DIRECT` set) for another try.
    fn end_direct(&mut self) -> io::Result<()> {
        self.write_gathered(true)?;
        if let (Some(file), Some(d)) = (self.file.as_ref(), self.direct.take())
            && let Some(flags) = d.flags
        {
            set_flags(file, flags)?;
        }
        Ok(())
    }

    /// Puts the descriptor's flags back whatever is still gathered (for `Drop`).
    fn restore_flags(&mut self) {
        if let (Some(file), Some(d)) = (self.file.as_ref(), self.direct.take())
            && let Some(flags) = d.flags
        {
            let _ = set_flags(file, flags);
        }
    }
}

impl Write for GovernedWriter {
    /// Writes as `File` does and returns the bytes it wrote. Trouble after they were written
    /// (handing them to write-back, dropping them from the page cache) does not make this call
    /// fail: it is returned by the next call (which then writes nothing) or by
    /// [`finish`](GovernedWriter::finish), so a caller that retries a failed call never writes
    /// the same bytes twice. A file that cannot be synced or advised at all (a pipe,
    /// `/dev/null`) is written as a plain one.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let head = match self.direct.as_mut() {
            None => buf.len(),
            Some(d) if d.head > 0 => d.head.min(buf.len()),
            Some(d) => {
                if d.len == DIRECT_CHUNK {
                    self.write_gathered(false)?;
                }
                if let Some(d) = self.direct.as_mut() {
                    let n = (DIRECT_CHUNK - d.len).min(buf.len());
                    d.buf.as_mut()[d.len..d.len + n].copy_from_slice(&buf[..n]);
                    d.len += n;
                    return Ok(n);
                }
                buf.len()
            }
        };
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("writer finished"))?;
        let n = file.write(&buf[..head])?;
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| io::Error::other("writer finished"))?;
        if let Err(e) = self.behind.advance(file, n as u64, true) {
            self.deferred.get_or_insert(e);
        }
        if let Some(d) = self.direct.as_mut() {
            d.head -= n;
            if d.head == 0
                && let Err(e) = self.begin_direct()
            {
                self.deferred.get_or_insert(e);
            }
        }
        Ok(n)
    }

    /// Hands the file what a direct writer gathered (whole blocks; a partial block at the end
    /// stays gathered until more follows or the writer finishes) and flushes the file; returns
    /// write-back trouble of earlier calls not reported yet.
    fn flush(&mut self) -> io::Result<()> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        self.write_gathered(false)?;
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for GovernedWriter {
    fn drop(&mut self) {
        if self.end_direct().is_err() {
            self.restore_flags();
        }
        if let Some(file) = self.file.take() {
            let _ = self.behind.close(&file, true);
        }
    }
}

/// A one-pass reader over a file the caller opened: what it reads is charged to an engine's
/// page-cache budget and dropped behind past it, so a scan does not evict other engines' pages.
/// Reads come from the file's current position; errors come back unchanged.
#[derive(Debug)]
pub struct GovernedReader {
    file: Option<File>,
    behind: Behind,
    /// Trouble dropping bytes already read, for the next call to return.
    deferred: Option<io::Error>,
}

impl GovernedReader {
    pub(crate) fn new(gov: &MemoryGovernor, engine: EngineId, mut file: File) -> Result<Self> {
        // A pipe or a socket has no position, and no page cache: read plainly.
        let (pos, plain) = match file.stream_position() {
            Err(e) if e.raw_os_error() == Some(libc::ESPIPE) => (0, true),
            pos => (
                pos.map_err(|source| MemError::Io {
                    what: "reading the file position for a governed reader".into(),
                    source,
                })?,
                false,
            ),
        };
        // SAFETY: a descriptor the `File` owns; advice only (read-ahead for a sequential scan).
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        let mut behind = Behind::new(gov, engine, pos);
        behind.ungoverned = plain;
        Ok(GovernedReader {
            file: Some(file),
            behind,
            deferred: None,
        })
    }

    /// Bytes this reader has left in the page cache and not dropped yet.
    pub fn left_behind(&self) -> u64 {
        self.behind.pos - self.behind.dropped_to
    }

    /// Drops what the reader left behind and returns the file.
    pub fn into_inner(mut self) -> io::Result<File> {
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("reader already closed"))?;
        self.behind.close(&file, false)?;
        Ok(file)
    }
}

impl Read for GovernedReader {
    /// Reads as `File` does. Trouble dropping what was read from the page cache does not make
    /// this call fail (its bytes were read): the next call returns it.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("reader closed"))?;
        let n = file.read(buf)?;
        let file = self
            .file
            .as_ref()
            .ok_or_else(|| io::Error::other("reader closed"))?;
        if let Err(e) = self.behind.advance(file, n as u64, false) {
            self.deferred = Some(e);
        }
        Ok(n)
    }
}

impl Drop for GovernedReader {
    fn drop(&mut self) {
        if let Some(file) = self.file.take() {
            let _ = self.behind.close(&file, false);
        }
    }
}

/// Hot mapped data an engine keeps resident: locked in memory with `mlock`, and counted against
/// the engine's budget and the ceiling through a reservation. Unlocked and released on drop.
pub struct Protected<'a> {
    data: &'a [u8],
    gov: MemoryGovernor,
    engine: EngineId,
    _reservation: Reservation,
}

impl std::fmt::Debug for Protected<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Protected")
            .field("engine", &self.engine)
            .field("addr", &self.data.as_ptr())
            .field("len", &self.data.len())
            .finish()
    }
}

impl<'a> Protected<'a> {
    pub(crate) fn new(gov: &MemoryGovernor, engine: EngineId, data: &'a [u8]) -> Result<Self> {
        let len = data.len() as u64;
        let reservation = gov.reserve(engine, len)?;
        // Locked and registered as one step, so a protection dropped meanwhile never unlocks
        // these pages (see `Drop`).
        let mut locked = lock_regions(&LOCKED);
        // SAFETY: `data` is a live borrowed slice (mapped memory) for the guard's lifetime;
        // mlock only pins its pages, rounding to page boundaries.
        if unsafe { libc::mlock(data.as_ptr().cast(), data.len()) } != 0 {
            let source = io::Error::last_os_error();
            // SAFETY: an all-zero rlimit is valid for getrlimit to fill.
            let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
            // SAFETY: a valid rlimit to write.
            unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
            let limit = if lim.rlim_cur == libc::RLIM_INFINITY {
                "unlimited".to_string()
            } else {
                crate::ByteSize(lim.rlim_cur).to_string()
            };
            return Err(MemError::Io {
                what: format!(
                    "locking {} of {engine}'s data in memory (RLIMIT_MEMLOCK {limit}; raise it \
                     with `ulimit -l` or grant CAP_IPC_LOCK)",
                    crate::ByteSize(len)
                ),
                source,
            });
        }
        locked.push(page_span(data));
        drop(locked);
        let ledger = gov.page_cache_ledger(engine);
        ledger.protected.fetch_add(len, Ordering::AcqRel);
        lock_regions(&ledger.regions).push((data.as_ptr() as usize, data.len()));
        // The heap's share of the limit shrinks by what is locked beside it.
        gov.publish_limits();
        Ok(Protected {
            data,
            gov: gov.clone(),
            engine,
            _reservation: reservation,
        })
    }

    /// Bytes protected.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bytes of the region resident in memory now (`mincore`): all of it while locked.
    pub fn resident(&self) -> io::Result<u64> {
        resident_bytes(self.data)
    }
}

/// The pages locked by every live [`Protected`] of the process, one `[start, end)` entry per
/// protection (page-aligned; overlaps and repeats kept): locks do not nest in the kernel, so a
/// protection that ends unlocks only the pages no other live one covers.
static LOCKED: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

/// The pages `mlock` pins for `data`: its start rounded down, its end up, to pages.
fn page_span(data: &[u8]) -> (usize, usize) {
    let page = crate::cache::ledger::PAGE;
    let start = data.as_ptr() as usize;
    let end = start + data.len();
    (start - start % page, end.next_multiple_of(page))
}

/// `span` less every range in `others`: the parts of it no other entry covers, in order.
fn uncovered(span: (usize, usize), others: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut gaps = vec![span];
    for &(a, b) in others {
        gaps = gaps
            .into_iter()
            .flat_map(|(s, e)| {
                if b <= s || e <= a {
                    return vec![(s, e)];
                }
                [(s, a.max(s)), (b.min(e), e)]
                    .into_iter()
                    .filter(|(x, y)| x < y)
                    .collect()
            })
            .collect();
    }
    gaps
}

impl Drop for Protected<'_> {
    fn drop(&mut self) {
        {
            let mut locked = lock_regions(&LOCKED);
            let span = page_span(self.data);
            if let Some(i) = locked.iter().position(|&r| r == span) {
                locked.swap_remove(i);
            }
            for (start, end) in uncovered(span, &locked) {
                // SAFETY: pages of the range this guard locked (still borrowed, so mapped),
                // which no other live protection covers: unlocking them takes nothing from
                // anyone else.
                unsafe { libc::munlock(start as *const libc::c_void, end - start) };
            }
        }
        let ledger = self.gov.page_cache_ledger(self.engine);
        let region = (self.data.as_ptr() as usize, self.data.len());
        let mut regions = lock_regions(&ledger.regions);
        if let Some(i) = regions.iter().position(|&r| r == region) {
            regions.swap_remove(i);
        }
        drop(regions);
        ledger
            .protected
            .fetch_sub(self.data.len() as u64, Ordering::AcqRel);
        self.gov.publish_limits();
        // The reservation is released after this, as the field drops.
    }
}

/// Bytes of `data` (mapped memory) resident now, by `mincore` over its pages.
pub fn resident_bytes(data: &[u8]) -> io::Result<u64> {
    resident_range(data.as_ptr() as usize, data.len())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Seek, SeekFrom, Write};

    use super::INJECTED;
    use crate::{EngineId, MemoryGovernor};

    const MIB: usize = 1 << 20;

    fn gov() -> MemoryGovernor {
        MemoryGovernor::builder()
            .global_ceiling(1 << 30)
            .page_cache_budget(EngineId::Timeseries, 64 * MIB as u64)
            .build()
            .unwrap()
    }

    fn scratch() -> std::fs::File {
        tempfile::tempfile_in(env!("CARGO_MANIFEST_DIR")).unwrap()
    }

    fn contents(mut f: &std::fs::File) -> Vec<u8> {
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn write_back_trouble_is_reported_by_the_next_call_not_for_written_bytes() {
        let gov = gov();
        let mut w = gov.writer(EngineId::Timeseries, scratch()).unwrap();
        let a = vec![1u8; MIB];
        let b = vec![2u8; MIB];
        // The first MiB starts write-back, which fails (as with a disk that filled meanwhile):
        // the MiB was written, and the call says so.
        INJECTED.with(|i| i.set(Some(libc::ENOSPC)));
        assert_eq!(w.write(&a).unwrap(), MIB);
        assert_eq!(w.file().stream_position().unwrap(), MIB as u64);
        // The next call reports it and writes nothing; the retry writes.
        let e = w.write(&b).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(w.file().stream_position().unwrap(), MIB as u64);
        w.write_all(&b).unwrap();
        let file = w.finish().unwrap();
        let got = contents(&file);
        assert_eq!(got.len(), 2 * MIB);
        assert!(got[..MIB].iter().all(|&x| x == 1) && got[MIB..].iter().all(|&x| x == 2));
        assert_eq!(gov.page_cache(EngineId::Timeseries).left_behind, 0);
    }

    #[test]
    fn trouble_after_the_last_write_is_reported_by_finish() {
        let gov = gov();
        let mut w = gov.writer(EngineId::Timeseries, scratch()).unwrap();
        INJECTED.with(|i| i.set(Some(libc::EIO)));
        w.write_all(&vec![3u8; MIB]).unwrap();
        let err = w.finish().unwrap_err();
        assert_eq!(err.error().raw_os_error(), Some(libc::EIO));
        assert_eq!(
            err.to_string(),
            "finishing a governed writer: Input/output error (os error 5)"
        );
        let file = err.into_inner().finish().unwrap();
        assert_eq!(contents(&file), vec![3u8; MIB]);
    }

    #[test]
    fn a_direct_writer_whose_finish_failed_keeps_what_it_gathered() {
        let gov = gov();
        let mut w = gov.direct_writer(EngineId::Timeseries, scratch()).unwrap();
        if !w.is_direct() {
            eprintln!("skipped: this file system does no direct I/O");
            return;
        }
        let data: Vec<u8> = (0..MIB + MIB / 2).map(|i| (i % 251) as u8).collect();
        w.write_all(&data).unwrap();
        // The last gathered MiB's direct write fails once.
        INJECTED.with(|i| i.set(Some(libc::EIO)));
        let (e, w) = w.finish().unwrap_err().into_parts();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        let file = w.finish().unwrap();
        assert_eq!(contents(&file), data);
        // The descriptor's flags are back: no O_DIRECT.
        assert_eq!(super::get_flags(&file).unwrap() & libc::O_DIRECT, 0);
    }

    #[test]
    fn a_file_without_a_page_cache_is_written_plainly() {
        let gov = gov();
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        let mut w = gov.writer(EngineId::Timeseries, null).unwrap();
        for _ in 0..3 {
            assert_eq!(w.write(&vec![0u8; MIB]).unwrap(), MIB);
        }
        w.flush().unwrap();
        assert_eq!(w.left_behind(), 0);
        w.finish().unwrap();
        assert_eq!(gov.page_cache(EngineId::Timeseries).left_behind, 0);
        // A pipe too.
        let (r, wr) = std::io::pipe().unwrap();
        let reader = std::thread::spawn(move || {
            let mut r = r;
            let mut n = 0;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match r.read(&mut buf).unwrap() {
                    0 => return n,
                    k => n += k,
                }
            }
        });
        let mut w = gov
            .writer(
                EngineId::Timeseries,
                std::fs::File::from(std::os::fd::OwnedFd::from(wr)),
            )
            .unwrap();
        w.write_all(&vec![1u8; 3 * MIB]).unwrap();
        drop(w.finish().unwrap());
        assert_eq!(reader.join().unwrap(), 3 * MIB);
    }
}
