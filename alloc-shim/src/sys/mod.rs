//! The system layer: what the kernel and jemalloc say, read one way everywhere.
//!
//! Every `mallctl` key with its C type (`mallctl`), the NUMA topology (`numa`), jemalloc's
//! size classes (`size_class`), one parser for the numbers of `/proc`, `/sys` and the
//! environment (`parse`), the page size, the process's resident memory (`statm`) and the
//! pages resident in a range (`mincore`). Nothing here allocates or locks, so the allocation
//! path and jemalloc's hooks may call all of it. Above the identities (`id`) only.

pub(crate) mod mallctl;
pub(crate) mod numa;
pub(crate) mod parse;
pub(crate) mod size_class;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// The page size `mincore` works in on the targets this crate supports.
pub const PAGE: usize = 4096;

/// Bytes of the pages of `[addr, addr + len)` resident now (`ENOMEM` where part of it is not
/// mapped). In steps of 16 MiB into a 4 KiB buffer on the stack: constant memory and no heap
/// allocation whatever the length (a byte per page of a 512 GiB file was 128 MiB).
pub fn resident_range(addr: usize, len: usize) -> io::Result<u64> {
    const STEP_PAGES: usize = 4096;
    if len == 0 {
        return Ok(0);
    }
    let mut at = addr & !(PAGE - 1);
    let end = (addr + len).next_multiple_of(PAGE);
    let mut vec = [0u8; STEP_PAGES];
    let mut resident = 0u64;
    while at < end {
        let n = (end - at).min(STEP_PAGES * PAGE);
        // SAFETY: `mincore` reads only the kernel's page tables for `[at, at + n)`
        // (page-aligned), failing with `ENOMEM` for addresses not mapped; it writes one byte per
        // page into `vec`, which has room for `n / PAGE <= STEP_PAGES` of them.
        if unsafe { libc::mincore(at as *mut libc::c_void, n, vec.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        resident += vec[..n / PAGE].iter().filter(|&&b| b & 1 != 0).count() as u64 * PAGE as u64;
        at += n;
    }
    Ok(resident)
}

/// `/proc/self/statm`, kept open: the descriptor in the low 32 bits, the process that opened
/// it in the high ones (a child of `fork` inherits the parent's descriptor, which names the
/// parent's file, and opens its own). `u64::MAX` before the first read.
static STATM: AtomicU64 = AtomicU64::new(u64::MAX);

/// The process's resident memory in bytes, from `/proc/self/statm` (its second field, in
/// pages), read into a stack buffer through a descriptor kept open. `None` where it cannot be
/// read. No allocation, no lock: the allocation path's push-out calls it.
pub fn resident() -> Option<u64> {
    // SAFETY: getpid has no preconditions and cannot fail.
    let pid = unsafe { libc::getpid() } as u32;
    let kept = STATM.load(Ordering::Acquire);
    let fd = if kept != u64::MAX && (kept >> 32) as u32 == pid {
        kept as u32 as i32
    } else {
        // SAFETY: a NUL-terminated path and flags.
        let opened = unsafe {
            libc::open(
                c"/proc/self/statm".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if opened < 0 {
            return None;
        }
        let mine = (u64::from(pid) << 32) | u64::from(opened as u32);
        match STATM.compare_exchange(kept, mine, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                if kept != u64::MAX {
                    // The parent's descriptor, inherited by this child and replaced just now:
                    // this process's copy, which nobody else here uses any more.
                    // SAFETY: a descriptor of this process that only `STATM` held.
                    unsafe { libc::close(kept as u32 as i32) };
                }
                opened
            }
            Err(_) => {
                // Another thread stored one first: use a fresh descriptor once, then theirs.
                let n = read_statm(opened);
                // SAFETY: our own descriptor, not shared.
                unsafe { libc::close(opened) };
                return n;
            }
        }
    };
    let n = read_statm(fd);
    if n.is_none() {
        // The descriptor was closed behind our back (or now names another file): forget it,
        // without closing what may be someone else's, and open a fresh one next time.
        let _ = STATM.compare_exchange(
            (u64::from(pid) << 32) | u64::from(fd as u32),
            u64::MAX,
            Ordering::AcqRel,
            Ordering::Relaxed,
        );
    }
    n
}

/// Reads and parses `statm` through `fd`.
fn read_statm(fd: i32) -> Option<u64> {
    let mut buf = [0u8; 128];
    // SAFETY: reads at most `buf.len()` bytes into the stack buffer from our descriptor.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    usize::try_from(n)
        .ok()
        .and_then(|n| buf.get(..n))
        .and_then(parse_statm)
}

/// The resident bytes in a `statm` line (`size resident shared ...`, in pages).
fn parse_statm(text: &[u8]) -> Option<u64> {
    let mut fields = text.split(|&b| b == b' ');
    let _size = fields.next()?;
    let resident = fields.next()?;
    fields.next()?;
    parse::field(resident)?.checked_mul(PAGE as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touched_pages_count_and_unmapped_ones_are_an_error() {
        let len = 64 * PAGE;
        // SAFETY: an anonymous private mapping; unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let addr = p as usize;
        assert_eq!(resident_range(addr, len).unwrap(), 0);
        for i in (0..len).step_by(2 * PAGE) {
            // SAFETY: inside the mapping, writable.
            unsafe { *(p.cast::<u8>().add(i)) = 1 };
        }
        assert_eq!(resident_range(addr, len).unwrap(), (len / 2) as u64);
        // A range not starting on a page counts the pages it touches.
        assert_eq!(resident_range(addr + 1, 1).unwrap(), PAGE as u64);
        assert_eq!(resident_range(addr, 0).unwrap(), 0);
        // SAFETY: the mapping made above, not used after.
        assert_eq!(unsafe { libc::munmap(p, len) }, 0);
        let e = resident_range(addr, len).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOMEM));
    }

    #[test]
    fn statm_lines_parse() {
        assert_eq!(parse_statm(b"1000 250 30 1 0 400 0\n"), Some(250 * 4096));
        assert_eq!(parse_statm(b"1000"), None);
        assert_eq!(parse_statm(b"1000 x 3"), None);
        assert_eq!(parse_statm(b"1000  3"), None);
        assert_eq!(parse_statm(b"not statm at all"), None);
        assert_eq!(parse_statm(b""), None);
    }

    #[test]
    fn resident_is_read_and_plausible() {
        let rss = resident().unwrap();
        assert!(rss > 1 << 20 && rss < 1 << 40, "{rss}");
    }
}
