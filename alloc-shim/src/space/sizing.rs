//! How large each range is: asked for in the environment, or planned from physical memory and
//! the NUMA nodes, within the address space the process may map.

use crate::id::SLOTS;
use crate::sys::numa::{MAX_NODES, Topology};
use crate::sys::parse;

/// Smallest range per slot the allocator settles for (64 MiB): below it, the engine arenas are
/// not created and `install()` says why.
pub const MIN_RANGE_BYTES: usize = 1 << MIN_RANGE_SHIFT;
/// Largest range per slot (4 TiB): eleven of them stay well inside a 47-bit address space.
pub const MAX_RANGE_BYTES: usize = 1 << MAX_RANGE_SHIFT;
pub(crate) const MIN_RANGE_SHIFT: u32 = 26;
const MAX_RANGE_SHIFT: u32 = 42;

/// The environment variable that sets the range reserved per engine (bytes, or with a `KiB`,
/// `MiB`, `GiB` or `TiB` suffix), rounded down to a power of two within
/// [`MIN_RANGE_BYTES`]`..=`[`MAX_RANGE_BYTES`].
pub const RANGE_BYTES_ENV: &str = "NODEDB_MEM_RANGE_BYTES";

/// `ceil(log2(n))` for `n >= 1`.
const fn ceil_log2(n: u64) -> u32 {
    if n <= 1 {
        0
    } else {
        64 - (n - 1).leading_zeros()
    }
}

/// The size asked for in [`RANGE_BYTES_ENV`]: `None` when unset, `Some(Err(()))` when it is
/// not a size in range. Read with `getenv`: nothing is allocated.
fn range_from_env() -> Option<Result<u32, ()>> {
    // SAFETY: a NUL-terminated name; getenv returns null or a NUL-terminated string that we
    // only read here, before anything of ours could change the environment.
    let value = unsafe { libc::getenv(c"NODEDB_MEM_RANGE_BYTES".as_ptr()) };
    if value.is_null() {
        return None;
    }
    // SAFETY: as above: a valid C string.
    let bytes = unsafe { std::ffi::CStr::from_ptr(value) }.to_bytes();
    Some(parse_range(bytes).ok_or(()))
}

/// A size such as `268435456`, `256MiB` or `1 GiB`, as the `log2` of its largest power of two
/// within the allowed ranges.
pub(crate) fn parse_range(bytes: &[u8]) -> Option<u32> {
    const UNITS: &[(&[u8], u32)] = &[
        (b"", 0),
        (b"B", 0),
        (b"KiB", 10),
        (b"K", 10),
        (b"MiB", 20),
        (b"M", 20),
        (b"GiB", 30),
        (b"G", 30),
        (b"TiB", 40),
        (b"T", 40),
    ];
    let n = parse::size(bytes, UNITS).ok()?;
    if n < MIN_RANGE_BYTES as u64 || n > MAX_RANGE_BYTES as u64 {
        return None;
    }
    Some(63 - n.leading_zeros())
}

/// The range per slot to try first: [`RANGE_BYTES_ENV`] if set; else, for each NUMA node,
/// twice the machine's physical memory rounded up to a power of two, so one engine can hold
/// all of it on any node: jemalloc's own use of a range runs ahead of the live bytes (it grows
/// its retained extents geometrically, and pads an aligned request by its alignment: 1 GiB
/// blocks aligned to 1 GiB take 2 GiB of range each until their padding is reused). Either way
/// the slots and one range of fallback fit in at most a half of the address space the process
/// may map (`RLIMIT_AS`), so the rest of the process keeps room. Also returns that half, if
/// there is a limit.
pub(crate) fn planned_range_shift(topo: &Topology) -> Result<(u32, Option<u64>), ()> {
    let node_bits = node_bits(topo);
    let wanted = match range_from_env() {
        Some(r) => r?,
        None => {
            // SAFETY: sysconf has no preconditions (-1 on failure).
            let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
            // SAFETY: as above.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let phys = u64::try_from(pages)
                .unwrap_or(0)
                .saturating_mul(u64::try_from(page).unwrap_or(4096));
            ceil_log2(phys.max(1)) + 1 + node_bits
        }
    };
    let mut shift = wanted.clamp(MIN_RANGE_SHIFT.max(12 + node_bits), MAX_RANGE_SHIFT);
    // SAFETY: an all-zero rlimit is valid to pass for getrlimit to fill.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `lim` is a valid rlimit to write.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } == 0
        && lim.rlim_cur != libc::RLIM_INFINITY
    {
        let room = lim.rlim_cur / 2;
        while shift > MIN_RANGE_SHIFT && (SLOTS as u64 + 1) << shift > room {
            shift -= 1;
        }
        return Ok((shift, Some(room)));
    }
    Ok((shift, None))
}

/// Ranges of shared fallback space to reserve after the slots' (see `docs/design.md`, "When a
/// range is full"): what is left of `room` once the slots have theirs (at most
/// [`MAX_FALLBACK_RANGES`]); none where not even one range is left (a limit so tight that the
/// slots alone pass half of it: the rest of the process needs the address space more); one
/// without a limit, where a range already holds twice the machine's memory.
pub(crate) fn fallback_ranges(shift: u32, room: Option<u64>) -> usize {
    let Some(room) = room else {
        return 1;
    };
    let left = room.saturating_sub((SLOTS as u64) << shift) >> shift;
    (left as usize).min(MAX_FALLBACK_RANGES)
}

/// Most ranges of fallback space reserved.
pub(crate) const MAX_FALLBACK_RANGES: usize = 16;

/// Bits of a pointer's offset in its engine range that select the NUMA node's part:
/// enough for the highest node number present.
pub(crate) fn node_bits(topo: &Topology) -> u32 {
    let highest = (0..MAX_NODES)
        .rev()
        .find(|&n| topo.has_node(n))
        .unwrap_or(0);
    ceil_log2(highest as u64 + 1)
}
