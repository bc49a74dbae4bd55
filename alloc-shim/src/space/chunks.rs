//! The shared fallback range's ownership: it is cut into chunks, each extent claims whole
//! chunks, and each chunk records the slot it was claimed for, so the owner of a block there
//! comes from its address as elsewhere in the reservation (one more table read). Below the
//! reservation, which places the range and asks it for owners.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use crate::id::Slot;
use crate::sys::PAGE;

/// The fallback range's start is page-aligned: its low bits hold the chunk shift.
const BASE_MASK: usize = !0xfff;
const SHIFT_MASK: usize = 0x3f;

/// Chunks the fallback range is cut into for ownership: each records the slot its extents
/// were claimed for.
const CHUNKS: usize = 4096;
/// The smallest chunk (64 KiB): every fallback extent takes whole chunks.
const MIN_CHUNK_SHIFT: u32 = 16;

/// The fallback range's start and `log2` of its chunk, packed as the layout is (the start is
/// page-aligned; bits 0..6 the shift); 0 while there is none.
static FALLBACK: AtomicUsize = AtomicUsize::new(0);
/// Chunks of the fallback range (at most [`CHUNKS`]), and how many are claimed.
static TOTAL: AtomicUsize = AtomicUsize::new(0);
static CLAIMED: AtomicUsize = AtomicUsize::new(0);
/// The slot each chunk of the fallback range was claimed for (`Unattributed` until then).
static CHUNK_OWNER: [AtomicU8; CHUNKS] =
    [const { AtomicU8::new(Slot::UNATTRIBUTED.index() as u8) }; CHUNKS];

/// The owner of a pointer past the slots' ranges: its chunk's, if it lies in a claimed chunk
/// of the fallback range, else `Unattributed`.
#[inline(never)]
pub(crate) fn owner(ptr: *const u8) -> Slot {
    let f = FALLBACK.load(Ordering::Relaxed);
    if f == 0 {
        return Slot::UNATTRIBUTED;
    }
    let chunk = (ptr as usize)
        .wrapping_sub(f & BASE_MASK)
        .wrapping_shr((f & SHIFT_MASK) as u32);
    // A chunk's owner is stored before its extent is handed out, so whoever holds a pointer
    // into it (through jemalloc's or the program's own synchronisation) reads it.
    CHUNK_OWNER.get(chunk).map_or(Slot::UNATTRIBUTED, |o| {
        Slot::at(o.load(Ordering::Relaxed) as usize)
    })
}

/// Claims whole chunks of the fallback range for an extent of `size` bytes aligned to
/// `alignment` (a power of two), owned by `owner`, and returns its address; `None` when the
/// fallback range has no room left (or there is none). Chunks are never given back: jemalloc
/// retains the extents it gets and reuses them.
pub(crate) fn claim(owner: Slot, size: usize, alignment: usize) -> Option<usize> {
    let f = FALLBACK.load(Ordering::Acquire);
    if f == 0 || !alignment.is_power_of_two() {
        return None;
    }
    let (start, shift) = (f & BASE_MASK, (f & SHIFT_MASK) as u32);
    let chunk = 1usize << shift;
    // The range starts on a page, so only a larger alignment needs padding.
    let wanted = size
        .checked_add(alignment.saturating_sub(PAGE))?
        .div_ceil(chunk);
    let total = TOTAL.load(Ordering::Relaxed);
    let mut first = CLAIMED.load(Ordering::Relaxed);
    loop {
        if wanted == 0 || first.checked_add(wanted)? > total {
            return None;
        }
        match CLAIMED.compare_exchange_weak(
            first,
            first + wanted,
            Ordering::AcqRel,
            Ordering::Relaxed,
        ) {
            Ok(_) => break,
            Err(seen) => first = seen,
        }
    }
    for o in CHUNK_OWNER.get(first..first + wanted)? {
        o.store(owner.index() as u8, Ordering::Relaxed);
    }
    Some((start + (first << shift)).next_multiple_of(alignment))
}

/// Whether `ptr` lies in the fallback range.
#[inline]
pub(crate) fn contains(ptr: *const u8) -> bool {
    let f = FALLBACK.load(Ordering::Relaxed);
    f != 0
        && (ptr as usize).wrapping_sub(f & BASE_MASK)
            < TOTAL.load(Ordering::Relaxed) << (f & SHIFT_MASK)
}

/// Sets the fallback range up: `bytes` from `start` (page-aligned), cut into at most
/// [`CHUNKS`] chunks. Once, while the reservation is made.
pub(crate) fn set_up(start: usize, bytes: usize) {
    let mut shift = MIN_CHUNK_SHIFT;
    while bytes >> shift > CHUNKS {
        shift += 1;
    }
    TOTAL.store(bytes >> shift, Ordering::Relaxed);
    FALLBACK.store(start | shift as usize, Ordering::Release);
}

/// The fallback range's first address (0 without one).
pub(crate) fn start() -> usize {
    FALLBACK.load(Ordering::Relaxed) & BASE_MASK
}

/// Bytes of the fallback range (0 without one).
pub(crate) fn range_bytes() -> usize {
    TOTAL.load(Ordering::Relaxed) << (FALLBACK.load(Ordering::Relaxed) & SHIFT_MASK)
}

/// Bytes of the fallback range claimed so far.
pub(crate) fn claimed_bytes() -> usize {
    CLAIMED.load(Ordering::Relaxed) << (FALLBACK.load(Ordering::Relaxed) & SHIFT_MASK)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test touching this module's statics (the unit tests run without the
    /// allocator, so nothing else sets the fallback range up). Addresses only: nothing is
    /// mapped or touched.
    #[test]
    fn chunks_are_claimed_whole_in_order_and_remember_their_owner() {
        let query = Slot::of(crate::EngineId::Query);
        let vector = Slot::of(crate::EngineId::Vector);
        assert_eq!(owner(0x1234_0000 as *const u8), Slot::UNATTRIBUTED);
        assert_eq!(claim(query, 4096, PAGE), None, "no fallback range yet");

        // 1 MiB at a page-aligned (not chunk-aligned) start: sixteen 64 KiB chunks.
        let start = 0x7f00_0000_1000;
        set_up(start, 1 << 20);
        assert_eq!((range_bytes(), claimed_bytes()), (1 << 20, 0));

        // 100 KiB: two chunks, Query's.
        assert_eq!(claim(query, 100 << 10, PAGE), Some(start));
        assert_eq!(claimed_bytes(), 128 << 10);
        assert_eq!(owner((start + (100 << 10)) as *const u8), query);
        assert_eq!(
            owner((start + (128 << 10)) as *const u8),
            Slot::UNATTRIBUTED
        );
        assert_eq!(owner((start - 1) as *const u8), Slot::UNATTRIBUTED);

        // 64 KiB aligned to 256 KiB: padded within the chunks it claims, all Vector's.
        let at = claim(vector, 64 << 10, 256 << 10).unwrap();
        assert_eq!(at % (256 << 10), 0);
        assert!(at >= start + (128 << 10));
        assert!(at + (64 << 10) <= start + claimed_bytes());
        assert_eq!(owner(at as *const u8), vector);
        assert_eq!(owner((at + (64 << 10) - 1) as *const u8), vector);

        // More than is left, or a bad alignment, claims nothing.
        let claimed = claimed_bytes();
        assert_eq!(claim(query, 1 << 20, PAGE), None);
        assert_eq!(claim(query, 4096, 3 * PAGE), None);
        assert_eq!(claim(query, 0, PAGE), None);
        assert_eq!(claim(query, usize::MAX, PAGE), None);
        assert_eq!(claimed_bytes(), claimed);

        // The rest, to the last chunk; past the range nothing is anyone's.
        let left = (1 << 20) - claimed;
        assert_eq!(claim(query, left, PAGE), Some(start + claimed));
        assert_eq!(owner((start + (1 << 20) - 1) as *const u8), query);
        assert_eq!(owner((start + (1 << 20)) as *const u8), Slot::UNATTRIBUTED);
        assert_eq!(claim(query, 4096, PAGE), None);
    }
}
