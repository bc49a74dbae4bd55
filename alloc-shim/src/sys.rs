//! What the kernel says about memory, read the same way everywhere: pages resident in a range.

use std::io;

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
}
