//! The reservation: one span of address space, one range per ledger slot, so the owner of any
//! pointer is `(ptr - base) >> shift` (O(1), no header, no lookup table). Its layout, how it is
//! sized, and where it stands.

use std::ffi::c_void;
use std::ptr;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};

use crate::id::{ARENA_ENGINES, SLOTS, Slot};
use crate::sys::numa::{MAX_NODES, Topology};
use crate::sys::parse;

/// Smallest range per slot the allocator settles for (64 MiB): below it, the engine arenas are
/// not created and `install()` says why.
pub const MIN_RANGE_BYTES: usize = 1 << MIN_RANGE_SHIFT;
/// Largest range per slot (4 TiB): eleven of them stay well inside a 47-bit address space.
pub const MAX_RANGE_BYTES: usize = 1 << MAX_RANGE_SHIFT;
const MIN_RANGE_SHIFT: u32 = 26;
const MAX_RANGE_SHIFT: u32 = 42;

/// The environment variable that sets the range reserved per engine (bytes, or with a `KiB`,
/// `MiB`, `GiB` or `TiB` suffix), rounded down to a power of two within
/// [`MIN_RANGE_BYTES`]`..=`[`MAX_RANGE_BYTES`].
pub const RANGE_BYTES_ENV: &str = "NODEDB_MEM_RANGE_BYTES";

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

/// The slot that owns `ptr`: the range holding it, else `Unattributed`.
#[inline(always)]
pub(crate) fn owner_of(ptr: *const u8) -> Slot {
    let l = LAYOUT.load(Ordering::Relaxed);
    // Before the ranges exist the layout is 0 (base and shift 0), and a heap pointer's "slot"
    // is the pointer itself, far above the count.
    Slot::at(
        (ptr as usize)
            .wrapping_sub(l & BASE_MASK)
            .wrapping_shr((l & SHIFT_MASK) as u32),
    )
}

/// The first address of `slot`'s range on `node` (its whole range for node 0).
#[inline]
pub(crate) fn range_start(slot: Slot, node: usize) -> usize {
    let (base, range_shift, node_shift) = layout();
    base + (slot.index() << range_shift) + (node << node_shift)
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

/// Where the ranges stand, for address tests.
pub(crate) enum Ranges {
    /// Not created yet (or being created): the layout may still change.
    NotYet,
    /// Creating them failed: there are none, every block is `Unattributed`'s.
    None,
    /// The addresses `(start, length)` asked for.
    At(usize, usize),
}

/// The addresses of `slot`'s range, or (`None`) of all of them together.
pub(crate) fn slot_range(slot: Option<Slot>) -> Ranges {
    match stage() {
        Stage::Ready => {}
        Stage::Failed => return Ranges::None,
        _ => return Ranges::NotYet,
    }
    let (base, shift, _) = layout();
    let len = 1usize << shift;
    match slot {
        None => Ranges::At(base, len * SLOTS),
        Some(s) => Ranges::At(base + (s.index() << shift), len),
    }
}

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
    // SAFETY: advice over the engines' part of our own reservation (`ARENA_ENGINES` ranges
    // from its base); it changes how future faults are served, never the contents.
    if unsafe { libc::madvise(base as *mut c_void, len, libc::MADV_NOHUGEPAGE) } != 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL));
    }
    Ok(())
}

/// Why the engine arenas could not be created. `Copy`, allocation-free.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArenaFailure {
    /// Not even [`MIN_RANGE_BYTES`] per slot of address space could be reserved.
    Reserve {
        /// Bytes of the smallest reservation tried (eleven slots of the minimum range).
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
/// at most a half of the address space the process may map (`RLIMIT_AS`), so the rest of the
/// process keeps room.
fn planned_range_shift(topo: &Topology) -> Result<u32, ()> {
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
        while shift > MIN_RANGE_SHIFT && (SLOTS as u64) << shift > room {
            shift -= 1;
        }
    }
    Ok(shift)
}

/// Bits of a pointer's offset in its engine range that select the NUMA node's part:
/// enough for the highest node number present.
fn node_bits(topo: &Topology) -> u32 {
    let highest = (0..MAX_NODES)
        .rev()
        .find(|&n| topo.has_node(n))
        .unwrap_or(0);
    ceil_log2(highest as u64 + 1)
}

/// Reserves address space only: `PROT_NONE` private mappings cost no commit charge even under
/// `vm.overcommit_memory = 2`; the extent hooks make each extent readable and writable when
/// they hand it out. Tries the planned size first and halves it until the kernel accepts (an
/// address-space limit, or a tool such as valgrind that caps the client's address space),
/// down to [`MIN_RANGE_BYTES`] per slot.
pub(crate) fn reserve() -> bool {
    let topo = topology();
    let Ok(mut shift) = planned_range_shift(topo) else {
        return fail(ArenaFailure::Environment);
    };
    let node_shift_of = |shift: u32| shift - node_bits(topo);
    loop {
        let len = SLOTS << shift;
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
            let packed = (p as usize) | shift as usize | ((node_shift_of(shift) as usize) << 6);
            LAYOUT.store(packed, Ordering::Release);
            return true;
        }
        if shift <= MIN_RANGE_SHIFT {
            let errno = std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::ENOMEM);
            return fail(ArenaFailure::Reserve {
                bytes: SLOTS << MIN_RANGE_SHIFT,
                errno,
            });
        }
        shift -= 1;
    }
}
