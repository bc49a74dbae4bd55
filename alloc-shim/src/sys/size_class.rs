//! jemalloc's usable size for a request, computed without calling into jemalloc.
//!
//! `nallocx` costs about as much as the allocation itself, so the hot path computes the size
//! class from the request with the same rules as jemalloc 5.3's `sz_sa2u` (x86-64 defaults:
//! 16-byte quantum, 4 KiB pages, four classes per doubling, and `disable_large_size_classes`,
//! on by default, which rounds large requests to whole pages). A test checks every request
//! size up to 64 KiB, and a sample of larger ones, for every alignment up to 64 KiB, against
//! `nallocx`.

const QUANTUM: usize = 16;
const PAGE: usize = 4096;
/// Largest small (slab-allocated) size class.
const SMALL_MAXCLASS: usize = 14 * 1024;
/// Smallest large size class.
const LARGE_MINCLASS: usize = 16 * 1024;

/// `sz_s2u` for `size <= SMALL_MAXCLASS`, or for any size when large classes are pages.
#[inline(always)]
const fn s2u(size: usize) -> Option<usize> {
    if size <= 8 {
        return Some(8);
    }
    if size <= 8 * QUANTUM {
        return Some((size + QUANTUM - 1) & !(QUANTUM - 1));
    }
    if size <= SMALL_MAXCLASS {
        // 2^lg < size <= 2^(lg+1): four classes in that doubling, `2^(lg-2)` apart.
        let lg = (usize::BITS - 1 - (size - 1).leading_zeros()) as usize;
        let delta = 1usize << (lg - 2);
        return Some((size + delta - 1) & !(delta - 1));
    }
    match size.checked_add(PAGE - 1) {
        Some(s) => Some(s & !(PAGE - 1)),
        None => None,
    }
}

/// Requests up to this size (after rounding to an alignment of at most 16) use the table.
const TABLE_MAX: usize = 4096 + 16;

/// Size class of every request up to `TABLE_MAX`, indexed by `(size + 7) / 8`: every class up
/// to 4 KiB is a multiple of 8, so requests in one 8-byte step share a class.
static SMALL: [u16; TABLE_MAX / 8 + 1] = {
    let mut t = [0u16; TABLE_MAX / 8 + 1];
    let mut i = 0;
    while i < t.len() {
        t[i] = match s2u(if i == 0 { 1 } else { i * 8 }) {
            Some(u) => u as u16,
            None => 0,
        };
        i += 1;
    }
    t
};

/// The bytes jemalloc really hands out for `size` bytes aligned to `align` (a power of two),
/// or `None` when the request cannot be satisfied (it overflows). One table load for the
/// common case (small sizes, alignment at most 16).
#[inline(always)]
pub(crate) fn usable_size(size: usize, align: usize) -> Option<usize> {
    if align <= QUANTUM && size <= 4096 {
        let rounded = (size.max(1) + align - 1) & !(align - 1);
        // `rounded <= 4096 + 15`, so the index is in bounds; `get` keeps the path panic-free.
        if let Some(&u) = SMALL.get((rounded + 7) >> 3) {
            return Some(u as usize);
        }
    }
    usable_size_slow(size, align)
}

#[inline]
const fn usable_size_slow(size: usize, align: usize) -> Option<usize> {
    let size = if size == 0 { 1 } else { size };
    if size <= SMALL_MAXCLASS && align <= PAGE {
        let rounded = (size + align - 1) & !(align - 1);
        match s2u(rounded) {
            Some(u) if u < LARGE_MINCLASS => return Some(u),
            _ => {}
        }
    }
    if size <= LARGE_MINCLASS {
        return Some(LARGE_MINCLASS);
    }
    // jemalloc refuses requests whose page-aligned mapping would overflow.
    match s2u(size) {
        Some(u) if u.checked_add(align).is_some() && u <= isize::MAX as usize => Some(u),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tikv_jemalloc_sys as jem;

    fn jemalloc(size: usize, align: usize) -> usize {
        let flags = jem::MALLOCX_ALIGN(align);
        // SAFETY: nallocx has no preconditions beyond a valid flags word; size > 0 here.
        unsafe { jem::nallocx(size, flags) }
    }

    #[test]
    fn matches_nallocx_for_every_small_size_and_alignment() {
        for lg_align in 0..=16 {
            let align = 1usize << lg_align;
            for size in 1..=64 * 1024 {
                assert_eq!(
                    usable_size(size, align),
                    Some(jemalloc(size, align)),
                    "size {size} align {align}"
                );
            }
        }
    }

    #[test]
    fn matches_nallocx_for_large_sizes() {
        let mut size = 64 * 1024;
        while size < 1 << 34 {
            for s in [size - 1, size, size + 1, size + 4095, size * 5 / 4 + 7] {
                for align in [1, 16, 4096, 1 << 16, 1 << 21] {
                    assert_eq!(
                        usable_size(s, align),
                        Some(jemalloc(s, align)),
                        "size {s} align {align}"
                    );
                }
            }
            size *= 2;
        }
    }

    #[test]
    fn the_table_and_the_formula_agree() {
        for align in [1, 2, 4, 8, 16] {
            for size in 0..=TABLE_MAX {
                assert_eq!(
                    usable_size(size, align),
                    usable_size_slow(size, align),
                    "{size} {align}"
                );
            }
        }
    }

    #[test]
    fn overflowing_requests_have_no_size() {
        assert_eq!(usable_size(usize::MAX, 1), None);
        assert_eq!(usable_size(usize::MAX - 4096, 8), None);
        assert_eq!(usable_size(isize::MAX as usize, 8), None);
    }
}
