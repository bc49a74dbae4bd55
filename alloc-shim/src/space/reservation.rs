//! The reservation: one span of address space, one range per ledger slot, so the owner of any
//! pointer is `(ptr - base) >> shift` (O(1), no header, no lookup table), then a shared
//! fallback range for extents an engine's full range cannot take, whose chunks record their
//! owner. Its layout and where it stands.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

use crate::id::{ARENA_ENGINES, Node, SLOTS, Slot};
use crate::sys::numa::Topology;

use super::chunks;
pub use super::sizing::{MAX_RANGE_BYTES, MIN_RANGE_BYTES, RANGE_BYTES_ENV};
use super::sizing::{MIN_RANGE_SHIFT, fallback_ranges, node_bits, planned_range_shift};

/// Where setting up the ranges and arenas stands (see [`Stage`]).
static STAGE: AtomicU8 = AtomicU8::new(Stage::Untried as u8);

/// Where setting up the ranges and the engine arenas stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Stage {
    /// Nobody has tried yet.
    Untried = 0,
    /// A thread is setting them up.
    Running = 1,
    /// The ranges and arenas exist.
    Ready = 2,
    /// Setting them up failed (see [`failure`]): every block is `Unattributed`'s.
    Failed = 3,
}

/// The stage now.
#[inline]
pub(crate) fn stage() -> Stage {
    match STAGE.load(Ordering::Acquire) {
        0 => Stage::Untried,
        1 => Stage::Running,
        2 => Stage::Ready,
        _ => Stage::Failed,
    }
}

/// Claims the set-up for the calling thread (`Untried` → `Running`); the stage seen otherwise.
pub(crate) fn claim() -> Result<(), Stage> {
    STAGE
        .compare_exchange(
            Stage::Untried as u8,
            Stage::Running as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .map(|_| ())
        .map_err(|_| stage())
}

/// Ends the set-up claimed with [`claim`].
pub(crate) fn finish(ok: bool) {
    let to = if ok { Stage::Ready } else { Stage::Failed };
    STAGE.store(to as u8, Ordering::Release);
}

/// The start of the reservation and the two shifts of its layout, packed in one word so the
/// owner of a pointer costs one load: bits 0..6 `log2` of the range per slot, bits 6..12
/// `log2` of one node's part of an engine's range, the rest the (page-aligned) base. 0 until
/// the reservation exists, so `owner_of` finds nothing before then.
static LAYOUT: AtomicUsize = AtomicUsize::new(0);
const SHIFT_MASK: usize = 0x3f;
const BASE_MASK: usize = !0xfff;

/// The base, the range shift and the node shift (all 0 before the reservation exists).
#[inline(always)]
pub(crate) fn layout() -> (usize, u32, u32) {
    let l = LAYOUT.load(Ordering::Relaxed);
    (
        l & BASE_MASK,
        (l & SHIFT_MASK) as u32,
        ((l >> 6) & SHIFT_MASK) as u32,
    )
}

/// The slot that owns `ptr`: the range holding it, the owner of its chunk in the fallback
/// range, else `Unattributed`.
#[inline(always)]
pub(crate) fn owner_of(ptr: *const u8) -> Slot {
    let l = LAYOUT.load(Ordering::Relaxed);
    // Before the ranges exist the layout is 0 (base and shift 0), and a heap pointer's "slot"
    // is the pointer itself, far above the count.
    let index = (ptr as usize)
        .wrapping_sub(l & BASE_MASK)
        .wrapping_shr((l & SHIFT_MASK) as u32);
    if index < SLOTS {
        Slot::at(index)
    } else {
        chunks::owner(ptr)
    }
}

/// The first address of `slot`'s range on `node` (its whole range for node 0).
#[inline]
pub(crate) fn range_start(slot: Slot, node: Node) -> usize {
    let (base, range_shift, node_shift) = layout();
    base + (slot.index() << range_shift) + (node.index() << node_shift)
}

/// The node a pointer's memory was placed on (0 outside the engines' ranges).
pub fn node_of(ptr: *const u8) -> usize {
    if !owner_of(ptr).has_arena() {
        return 0;
    }
    let (base, range_shift, node_shift) = layout();
    let nodes = 1usize << (range_shift - node_shift);
    ((ptr as usize).wrapping_sub(base) >> node_shift) & (nodes - 1)
}

/// Bytes of the shared fallback range (0 without one, or before the arenas exist).
pub fn fallback_range_bytes() -> usize {
    if stage() == Stage::Ready {
        chunks::range_bytes()
    } else {
        0
    }
}

/// Bytes of the fallback range claimed for extents so far (address space, not memory).
pub fn fallback_claimed_bytes() -> usize {
    chunks::claimed_bytes()
}

/// Where the ranges stand, for address tests.
pub(crate) enum Ranges {
    /// Not created yet (or being created): the layout may still change.
    NotYet,
    /// Creating them failed: there are none, every block is `Unattributed`'s.
    None,
    /// The addresses `(start, length)` asked for.
    At(usize, usize),
}

/// The addresses of `slot`'s range, or (`None`) of the whole reservation: every slot's range
/// and the fallback range.
pub(crate) fn slot_range(slot: Option<Slot>) -> Ranges {
    match stage() {
        Stage::Ready => {}
        Stage::Failed => return Ranges::None,
        _ => return Ranges::NotYet,
    }
    let (base, shift, _) = layout();
    let len = 1usize << shift;
    match slot {
        None => Ranges::At(base, RESERVED.load(Ordering::Relaxed)),
        Some(s) => Ranges::At(base + (s.index() << shift), len),
    }
}

/// Bytes of the whole reservation (0 before it exists).
static RESERVED: AtomicUsize = AtomicUsize::new(0);

/// Bytes of virtual address space reserved for each engine's range, and for each engine's
/// overflow range (0 before the arenas exist, or when they could not be created): what one
/// engine can hold in its arenas before its allocations fall back to the automatic arenas.
/// Sized at start-up from physical memory and the NUMA node count, within the address space
/// the process may map (see `docs/design.md`).
pub fn range_bytes() -> usize {
    if stage() == Stage::Ready {
        1usize << layout().1
    } else {
        0
    }
}

/// Bytes of one NUMA node's part of each engine's range (0 before the arenas exist).
pub fn node_range_bytes() -> usize {
    if stage() == Stage::Ready {
        1usize << layout().2
    } else {
        0
    }
}

/// Keeps transparent huge pages out of the engines' ranges from now on (`MADV_NOHUGEPAGE` over
/// all of them; pages already huge stay so until freed). Under the kernel's `always` setting,
/// huge pages make the process resident beyond what its blocks hold (measured in
/// `docs/benchmarks.md`); the price is more TLB misses on random access. The error is the
/// `errno`: `ENOENT` without ranges.
pub fn prevent_huge_pages() -> Result<(), i32> {
    let Ranges::At(base, _) = slot_range(None) else {
        return Err(libc::ENOENT);
    };
    let len = ARENA_ENGINES << layout().1;
    for (at, len) in [(base, len), (chunks::start(), chunks::range_bytes())] {
        if len == 0 {
            continue;
        }
        // SAFETY: advice over the engines' part of our own reservation (`ARENA_ENGINES`
        // ranges from its base) or over its fallback range; it changes how future faults are
        // served, never the contents.
        if unsafe { libc::madvise(at as *mut c_void, len, libc::MADV_NOHUGEPAGE) } != 0 {
            return Err(std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL));
        }
    }
    Ok(())
}

/// Why the engine arenas could not be created. `Copy`, allocation-free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArenaFailure {
    /// Not even [`MIN_RANGE_BYTES`] per slot of address space could be reserved.
    Reserve {
        /// Bytes of the smallest reservation tried (eleven slots of the minimum range; a
        /// twelfth, the fallback range, was tried first).
        bytes: usize,
        /// `errno` of the failed `mmap`.
        errno: i32,
    },
    /// jemalloc refused to create an arena (its `mallctl` error code).
    CreateArena {
        /// jemalloc's return code.
        rc: i32,
    },
    /// jemalloc lacks a control name the allocator needs.
    Mallctl,
    /// [`RANGE_BYTES_ENV`] holds no size in range.
    Environment,
}

impl std::fmt::Display for ArenaFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArenaFailure::Reserve { bytes, errno } => write!(
                f,
                "reserving {} MiB of address space for the engine ranges failed ({}); the \
                 process may map too little (raise `ulimit -v`)",
                bytes >> 20,
                std::io::Error::from_raw_os_error(*errno)
            ),
            ArenaFailure::CreateArena { rc } => write!(
                f,
                "jemalloc could not create an engine arena ({})",
                std::io::Error::from_raw_os_error(*rc)
            ),
            ArenaFailure::Mallctl => {
                f.write_str("this jemalloc lacks `thread.arena` or `thread.tcache.flush`")
            }
            ArenaFailure::Environment => write!(
                f,
                "{RANGE_BYTES_ENV} must be a size from {} MiB to {} TiB (bytes, or with a \
                 KiB, MiB, GiB or TiB suffix)",
                MIN_RANGE_BYTES >> 20,
                MAX_RANGE_BYTES >> 40
            ),
        }
    }
}

impl std::error::Error for ArenaFailure {}

/// Why the set-up failed: `(what << 32) | errno`, 0 while nothing failed.
static FAILURE: AtomicU64 = AtomicU64::new(0);
const FAIL_RESERVE: u64 = 1;
const FAIL_ARENA: u64 = 2;
const FAIL_MIB: u64 = 3;
const FAIL_ENV: u64 = 4;

/// Records why the set-up failed; returns `false` for the caller to pass on.
pub(crate) fn fail(why: ArenaFailure) -> bool {
    let (what, errno) = match why {
        ArenaFailure::Reserve { errno, .. } => (FAIL_RESERVE, errno),
        ArenaFailure::CreateArena { rc } => (FAIL_ARENA, rc),
        ArenaFailure::Mallctl => (FAIL_MIB, 0),
        ArenaFailure::Environment => (FAIL_ENV, libc::EINVAL),
    };
    FAILURE.store((what << 32) | u64::from(errno as u32), Ordering::Release);
    false
}

/// Why the set-up failed, as recorded (`None` while nothing failed).
pub(crate) fn failure() -> Option<ArenaFailure> {
    let f = FAILURE.load(Ordering::Acquire);
    let errno = (f & 0xffff_ffff) as u32 as i32;
    match f >> 32 {
        FAIL_RESERVE => Some(ArenaFailure::Reserve {
            bytes: SLOTS << MIN_RANGE_SHIFT,
            errno,
        }),
        FAIL_ARENA => Some(ArenaFailure::CreateArena { rc: errno }),
        FAIL_MIB => Some(ArenaFailure::Mallctl),
        FAIL_ENV => Some(ArenaFailure::Environment),
        _ => None,
    }
}

/// The machine's topology, read once when the arenas are created.
static TOPOLOGY: std::sync::OnceLock<Topology> = std::sync::OnceLock::new();

/// Reads the topology the ranges are laid out for (once; the set-up's first step).
pub(crate) fn read_topology() {
    let _ = TOPOLOGY.set(Topology::read(b"/"));
}

/// The topology the arenas were laid out for (one node before they exist).
pub(crate) fn topology() -> &'static Topology {
    static SINGLE: Topology = Topology::single();
    TOPOLOGY.get().unwrap_or(&SINGLE)
}

/// Reserves address space only: `PROT_NONE` private mappings cost no commit charge even under
/// `vm.overcommit_memory = 2`; the extent hooks make each extent readable and writable when
/// they hand it out. Tries the planned size first and halves it until the kernel accepts (an
/// address-space limit, or a tool such as valgrind that caps the client's address space),
/// down to [`MIN_RANGE_BYTES`] per slot.
pub(crate) fn reserve() -> bool {
    let topo = topology();
    let Ok((mut shift, room)) = planned_range_shift(topo) else {
        return fail(ArenaFailure::Environment);
    };
    let mut fallback = fallback_ranges(shift, room);
    let node_shift_of = |shift: u32| shift - node_bits(topo);
    loop {
        let len = (SLOTS + fallback) << shift;
        // SAFETY: a fresh anonymous private mapping at an address of the kernel's choice: no
        // existing memory is affected.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            let base = p as usize;
            if fallback > 0 {
                chunks::set_up(base + (SLOTS << shift), fallback << shift);
            }
            RESERVED.store(len, Ordering::Relaxed);
            let packed = base | shift as usize | ((node_shift_of(shift) as usize) << 6);
            LAYOUT.store(packed, Ordering::Release);
            return true;
        }
        if shift <= MIN_RANGE_SHIFT {
            // Last, the slots' ranges alone: engines keep their own attribution, and a full
            // range falls back outside the reservation, as `Unattributed`'s.
            if fallback > 0 {
                fallback = 0;
                continue;
            }
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::ENOMEM);
            return fail(ArenaFailure::Reserve {
                bytes: SLOTS << MIN_RANGE_SHIFT,
                errno,
            });
        }
        shift -= 1;
        fallback = fallback.min(1);
    }
}
