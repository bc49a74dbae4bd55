//! Per-engine jemalloc arenas whose extents come from one reserved virtual range per engine,
//! so the owner of any pointer is `(ptr - base) >> shift`: O(1), no header, no lookup table.
//!
//! Everything here that runs inside jemalloc (the extent hooks) or on the allocation path
//! (`owner_of`, `arena_of`) is lock-free, allocation-free and cannot panic.

use std::ffi::{c_uint, c_void};
use std::ptr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use tikv_jemalloc_sys::extent_hooks_t;

use crate::EngineId;
use crate::mallctl::{self, Mib, arena_name};
use crate::numa::{MAX_NODES, Topology};

use crate::slot::Slot;
pub(crate) use crate::slot::{ARENA_ENGINES, OVERFLOW_SLOT, SLOTS};

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

const UNINIT: u8 = 0;
const RUNNING: u8 = 1;
const READY: u8 = 2;
const FAILED: u8 = 3;

static STATE: AtomicU8 = AtomicU8::new(UNINIT);
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

/// Why the engine arenas could not be created: `(what << 32) | errno`, 0 while nothing failed.
static FAILURE: AtomicU64 = AtomicU64::new(0);
const FAIL_RESERVE: u64 = 1;
const FAIL_ARENA: u64 = 2;
const FAIL_MIB: u64 = 3;
const FAIL_ENV: u64 = 4;

/// Bump offset of each (engine, node) sub-range.
static NEXT: [[AtomicUsize; MAX_NODES]; ARENA_ENGINES] =
    [const { [const { AtomicUsize::new(0) }; MAX_NODES] }; ARENA_ENGINES];
/// Arenas per engine and node at most. Threads of one engine on one node are spread over
/// [`shards`] of them (one per CPU of the node, up to this many), all carving from the
/// engine's range on that node, so two threads do not contend on one arena's locks where
/// plain jemalloc would have given them two (it gives a thread one of `4 × CPUs` arenas).
pub(crate) const MAX_SHARDS: usize = 4;

/// Arena index of each (engine, node, shard) (valid once `STATE` is `READY`; 0, an automatic
/// arena and so never ours, where there is no such arena).
static ARENA: [[[AtomicU32; MAX_SHARDS]; MAX_NODES]; ARENA_ENGINES] =
    [const { [const { [const { AtomicU32::new(0) }; MAX_SHARDS] }; MAX_NODES] }; ARENA_ENGINES];
/// Shards created per engine and node (`1..=MAX_SHARDS` once the arenas exist).
static SHARDS: AtomicUsize = AtomicUsize::new(1);

/// How many arenas each engine has per node: the largest node's CPU count, at most
/// four.
pub fn shards() -> usize {
    SHARDS.load(Ordering::Relaxed)
}
/// The machine's topology, read once when the arenas are created.
static TOPOLOGY: std::sync::OnceLock<Topology> = std::sync::OnceLock::new();
/// `MPOL_PREFERRED` (1, the default) or `MPOL_BIND` (2) for engine extents.
static MBIND_MODE: AtomicU8 = AtomicU8::new(MPOL_PREFERRED);
const MPOL_PREFERRED: u8 = 1;
const MPOL_BIND: u8 = 2;
/// Extents whose `mbind` failed (they are used anyway, unbound).
static MBIND_FAILURES: AtomicU64 = AtomicU64::new(0);
/// Extents refused because an engine's range was exhausted.
static RANGE_EXHAUSTED: AtomicU64 = AtomicU64::new(0);

/// The hooks of one arena; jemalloc passes a pointer to `hooks` back to every hook, and
/// `repr(C)` with `hooks` first lets the hook recover the slot and node from it.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct EngineHooks {
    hooks: extent_hooks_t,
    engine: usize,
    node: usize,
}

pub(crate) const fn engine_hooks(engine: usize, node: usize) -> EngineHooks {
    EngineHooks {
        hooks: extent_hooks_t {
            alloc: Some(hook_alloc),
            dalloc: Some(hook_dalloc),
            destroy: Some(hook_destroy),
            commit: Some(hook_commit),
            decommit: Some(hook_decommit),
            purge_lazy: Some(hook_purge_lazy),
            purge_forced: Some(hook_purge_forced),
            split: Some(hook_split),
            merge: Some(hook_merge),
        },
        engine,
        node,
    }
}

/// jemalloc reads these but never writes through the pointer it is given.
static HOOKS: [[EngineHooks; MAX_NODES]; ARENA_ENGINES] = {
    let mut all = [[engine_hooks(0, 0); MAX_NODES]; ARENA_ENGINES];
    let mut e = 0;
    while e < ARENA_ENGINES {
        let mut n = 0;
        while n < MAX_NODES {
            all[e][n] = engine_hooks(e, n);
            n += 1;
        }
        e += 1;
    }
    all
};

/// The slot that owns `ptr` (see `slot.rs`): the range holding it, else `Unattributed`.
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

/// The arena of `engine` on `node` (the node a thread's memory should come from) for a thread
/// of shard `shard` (any number: taken modulo the shards created), once the arenas exist;
/// `None` for `Unattributed`, before initialisation, and if it failed.
#[inline(always)]
pub(crate) fn arena_of(engine: Slot, node: usize, shard: usize) -> Option<c_uint> {
    if engine.is_overflow() {
        return crate::overflow::overflow_arena(Slot::of(engine.engine()));
    }
    if !engine.has_arena() || !ensure_arenas() {
        return None;
    }
    let row = ARENA.get(engine.index())?;
    let shard = shard % shards().max(1);
    let at = |node: usize| {
        row.get(node)
            .and_then(|shards| shards.get(shard))
            .map(|a| a.load(Ordering::Relaxed))
            .filter(|&a| a != 0)
    };
    // A node without an arena of its own (no memory): its nearest node's, which `init` always
    // creates for node `topology().memory_node_for(node)`.
    at(node).or_else(|| at(topology().memory_node_for(node)))
}

/// Every arena of `engine` (all nodes and shards), for statistics and purging.
fn arenas_of(engine: usize) -> impl Iterator<Item = (usize, c_uint)> {
    ARENA.get(engine).into_iter().flat_map(|row| {
        row.iter().enumerate().flat_map(|(node, shards)| {
            shards
                .iter()
                .map(move |a| (node, a.load(Ordering::Relaxed)))
                .filter(|&(_, a)| a != 0)
        })
    })
}

/// Creates the ranges and arenas if nobody has yet (see `init`); whether they exist.
#[inline]
pub(crate) fn ensure_arenas() -> bool {
    if STATE.load(Ordering::Acquire) != READY {
        init();
    }
    STATE.load(Ordering::Acquire) == READY
}

/// The topology the arenas were laid out for (one node before they exist).
pub(crate) fn topology() -> &'static Topology {
    static SINGLE: Topology = Topology::single();
    TOPOLOGY.get().unwrap_or(&SINGLE)
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

/// How engine extents are bound to their node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NumaPolicy {
    /// `MPOL_PREFERRED`: the node first, others when it is full (the default).
    #[default]
    Preferred,
    /// `MPOL_BIND`: only the node; allocation faults fail when it is full.
    Strict,
}

/// Sets how extents created from now on are bound to their node.
pub fn set_numa_policy(policy: NumaPolicy) {
    let mode = match policy {
        NumaPolicy::Preferred => MPOL_PREFERRED,
        NumaPolicy::Strict => MPOL_BIND,
    };
    MBIND_MODE.store(mode, Ordering::Relaxed);
}

/// Extents whose `mbind` failed (they are used anyway, unbound).
pub fn mbind_failures() -> u64 {
    MBIND_FAILURES.load(Ordering::Relaxed)
}

/// The machine's NUMA topology as the allocator uses it.
pub fn machine_topology() -> Topology {
    ensure_arenas();
    *topology()
}

/// Binds `[addr, addr + len)` to `node` with the configured policy.
fn bind_to_node(addr: *mut c_void, len: usize, node: usize) {
    let mask: u64 = 1 << node;
    let mode = libc::c_long::from(MBIND_MODE.load(Ordering::Relaxed));
    // SAFETY: mbind only sets the memory policy of our own mapping `[addr, addr + len)`;
    // `mask` outlives the call and `maxnode` (64) is its size in bits.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len,
            mode,
            &mask as *const u64,
            64 as libc::c_ulong,
            0 as libc::c_uint,
        )
    };
    if rc != 0 {
        MBIND_FAILURES.fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether the engine arenas exist.
pub fn arenas_ready() -> bool {
    STATE.load(Ordering::Acquire) == READY
}

/// Creates the ranges and arenas if nobody has tried yet, waiting for a thread doing it, so
/// the layout is final afterwards (on the allocation path, never inside jemalloc).
pub(crate) fn settle_layout() {
    if STATE.load(Ordering::Acquire) == UNINIT {
        init();
    }
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

/// The addresses of `slot`'s range (with `slot == SLOTS`, of all of them together).
pub(crate) fn slot_range(slot: usize) -> Ranges {
    match STATE.load(Ordering::Acquire) {
        READY => {}
        FAILED => return Ranges::None,
        _ => return Ranges::NotYet,
    }
    let (base, shift, _) = layout();
    let len = 1usize << shift;
    match slot {
        SLOTS => Ranges::At(base, len * SLOTS),
        s if s < SLOTS => Ranges::At(base + (s << shift), len),
        _ => Ranges::NotYet,
    }
}

/// Keeps transparent huge pages out of the engines' ranges from now on (`MADV_NOHUGEPAGE` over
/// all of them; pages already huge stay so until freed). Under the kernel's `always` setting,
/// huge pages make the process resident beyond what its blocks hold (measured in
/// `docs/benchmarks.md`); the price is more TLB misses on random access. The error is the
/// `errno`: `ENOENT` without ranges.
pub fn prevent_huge_pages() -> Result<(), i32> {
    let Ranges::At(base, _) = slot_range(SLOTS) else {
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

/// Extents refused because an engine's virtual range was full.
pub fn range_exhaustions() -> u64 {
    RANGE_EXHAUSTED.load(Ordering::Relaxed)
}

/// Bytes of virtual address space reserved for each engine's range, and for each engine's
/// overflow range (0 before the arenas exist, or when they could not be created): what one
/// engine can hold in its arenas before its allocations fall back to the automatic arenas (see
/// [`range_fallbacks`](crate::range_fallbacks)). Sized at start-up from physical memory and the
/// NUMA node count, within the address space the process may map (see `docs/design.md`).
pub fn range_bytes() -> usize {
    if arenas_ready() {
        1usize << layout().1
    } else {
        0
    }
}

/// Bytes of one NUMA node's part of each engine's range (0 before the arenas exist).
pub fn node_range_bytes() -> usize {
    if arenas_ready() {
        1usize << layout().2
    } else {
        0
    }
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

/// Why the engine arenas do not exist, once creating them failed (`None` while they exist or
/// have not been tried).
pub fn arena_failure() -> Option<ArenaFailure> {
    ensure_arenas();
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

fn fail(what: u64, errno: i32) -> bool {
    FAILURE.store((what << 32) | u64::from(errno as u32), Ordering::Release);
    false
}

/// Reserves the ranges and creates the arenas, once. Concurrent callers wait for the thread
/// doing it (it takes well under a millisecond and allocates nothing through the global
/// allocator, so it cannot wait on itself); after a bounded number of yields they give up and
/// are served from the automatic arenas.
#[cold]
fn init() {
    if let Err(seen) = STATE.compare_exchange(UNINIT, RUNNING, Ordering::AcqRel, Ordering::Acquire)
    {
        let mut spins = 0u32;
        let mut state = seen;
        while state == RUNNING && spins < 1_000_000 {
            std::thread::yield_now();
            spins += 1;
            state = STATE.load(Ordering::Acquire);
        }
        return;
    }
    let _ = TOPOLOGY.set(Topology::read(b"/"));
    let ok =
        reserve_ranges() && create_arenas() && (crate::thread::lookup_mibs() || fail(FAIL_MIB, 0));
    if ok {
        crate::overflow::register_fork_handler();
    }
    STATE.store(if ok { READY } else { FAILED }, Ordering::Release);
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
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    let mut n: u64 = 0;
    for &d in &bytes[..digits] {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    let unit: &[u8] = bytes[digits..].trim_ascii();
    let shift = match unit {
        b"" | b"B" => 0,
        b"KiB" | b"K" => 10,
        b"MiB" | b"M" => 20,
        b"GiB" | b"G" => 30,
        b"TiB" | b"T" => 40,
        _ => return None,
    };
    let n = n.checked_mul(1u64 << shift)?;
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
/// `vm.overcommit_memory = 2`; the extent hook makes each extent readable and writable when it
/// hands it out. Tries the planned size first and halves it until the kernel accepts (an
/// address-space limit, or a tool such as valgrind that caps the client's address space),
/// down to [`MIN_RANGE_BYTES`] per slot.
fn reserve_ranges() -> bool {
    let topo = topology();
    let Ok(mut shift) = planned_range_shift(topo) else {
        return fail(FAIL_ENV, libc::EINVAL);
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
            return fail(FAIL_RESERVE, errno);
        }
        shift -= 1;
    }
}

/// jemalloc's `arena_config_t` (`include/jemalloc/internal/arena_types.h`), the value of
/// `experimental.arenas_create_ext`.
#[repr(C)]
struct ArenaConfig {
    extent_hooks: *mut extent_hooks_t,
    metadata_use_hooks: bool,
}

/// Creates one jemalloc arena whose extents come from `hooks`, with its own metadata in
/// jemalloc's default memory rather than in our ranges (`metadata_use_hooks = false`): a forked
/// child does not inherit the overflow mappings (`MADV_DONTFORK`), and jemalloc walks every
/// arena's metadata in the child after `fork`. Where this jemalloc lacks the experimental
/// control, falls back to `arenas.create` (metadata through the hooks) and says so in the
/// second value. Returns the arena index, or jemalloc's error code.
pub(crate) fn create_arena(hooks: &'static EngineHooks) -> Result<(c_uint, bool), i32> {
    let extent_hooks = ptr::from_ref(&hooks.hooks).cast_mut();
    let config = ArenaConfig {
        extent_hooks,
        metadata_use_hooks: false,
    };
    // SAFETY: `experimental.arenas_create_ext` takes an `arena_config_t` (our `repr(C)` copy)
    // and returns an `unsigned`. The hooks are a `static`, valid for the life of the process
    // as jemalloc requires, and never written through.
    match unsafe {
        mallctl::write_read::<ArenaConfig, c_uint>(c"experimental.arenas_create_ext", config)
    } {
        Ok(arena) => return Ok((arena, false)),
        Err(libc::ENOENT) => {}
        Err(rc) => return Err(rc),
    }
    // SAFETY: `arenas.create` takes an `extent_hooks_t *` and returns an `unsigned`; the hooks
    // as above.
    unsafe { mallctl::write_read::<*mut extent_hooks_t, c_uint>(c"arenas.create", extent_hooks) }
        .map(|arena| (arena, true))
}

/// [`shards`] arenas per engine and node with memory (the node threads of a memoryless node
/// use), sharing the (engine, node) hooks and so the same part of the engine's range.
fn create_arenas() -> bool {
    let topo = topology();
    let widest = (0..MAX_NODES)
        .filter(|&n| topo.has_node(n))
        .map(|n| topo.cpus_of(n).count())
        .max()
        .unwrap_or(1);
    let shards = widest.clamp(1, MAX_SHARDS);
    for (row, hooks) in ARENA.iter().zip(&HOOKS) {
        for node in 0..MAX_NODES {
            if !topo.has_node(node) || topo.memory_node_for(node) != node {
                continue;
            }
            for slot in &row[node][..shards] {
                match create_arena(&hooks[node]) {
                    Ok((arena, _)) => slot.store(arena, Ordering::Relaxed),
                    Err(rc) => return fail(FAIL_ARENA, rc),
                }
            }
        }
    }
    SHARDS.store(shards, Ordering::Relaxed);
    true
}

/// # Safety
/// `hooks` must be a pointer jemalloc got from `create_arena`, i.e. into `HOOKS` or
/// `OVERFLOW_HOOKS`.
#[inline(always)]
unsafe fn engine_of(hooks: *mut extent_hooks_t) -> usize {
    // SAFETY: per the contract, `hooks` points at the `hooks` field, the first field of a
    // `repr(C)` `EngineHooks` in a static, so the cast pointer is valid to read.
    unsafe { (*hooks.cast::<EngineHooks>()).engine }
}

/// # Safety
/// As for [`engine_of`].
#[inline(always)]
unsafe fn node_of_hooks(hooks: *mut extent_hooks_t) -> usize {
    // SAFETY: as in `engine_of`.
    unsafe { (*hooks.cast::<EngineHooks>()).node }
}

unsafe extern "C" fn hook_alloc(
    hooks: *mut extent_hooks_t,
    new_addr: *mut c_void,
    size: usize,
    alignment: usize,
    zero: *mut bool,
    commit: *mut bool,
    _arena: c_uint,
) -> *mut c_void {
    // Growing an extent in place at a given address is optional; refusing is always correct.
    if !new_addr.is_null() || alignment == 0 {
        return ptr::null_mut();
    }
    // SAFETY: jemalloc passes back the hooks pointer it was given at `arenas.create`.
    let engine = unsafe { engine_of(hooks) };
    if engine >= OVERFLOW_SLOT {
        // SAFETY: forwarded from jemalloc (valid `zero` and `commit` pointers).
        return unsafe {
            crate::overflow::overflow_extent(engine - OVERFLOW_SLOT, size, alignment, zero, commit)
        };
    }
    // SAFETY: as above.
    let node = unsafe { node_of_hooks(hooks) };
    let (base, range_shift, node_shift) = layout();
    let range = 1usize << node_shift;
    let Some(next) = NEXT.get(engine).and_then(|row| row.get(node)) else {
        return ptr::null_mut();
    };
    let start_of_range = base + (engine << range_shift) + (node << node_shift);
    let mut cur = next.load(Ordering::Relaxed);
    loop {
        // Align the absolute address (the range start is page-aligned, alignment may be more).
        let addr = (start_of_range + cur).next_multiple_of(alignment);
        let end = (addr - start_of_range).saturating_add(size);
        if end > range {
            RANGE_EXHAUSTED.fetch_add(1, Ordering::Relaxed);
            return ptr::null_mut();
        }
        match next.compare_exchange_weak(cur, end, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(_) => {
                // SAFETY: `[addr, addr + size)` lies inside our reservation (checked above) and
                // was handed out to nobody before (the bump pointer never goes back), so
                // changing its protection affects no live memory.
                let rc = unsafe {
                    libc::mprotect(
                        addr as *mut c_void,
                        size,
                        libc::PROT_READ | libc::PROT_WRITE,
                    )
                };
                if rc != 0 {
                    return ptr::null_mut();
                }
                bind_to_node(addr as *mut c_void, size, node);
                // SAFETY: jemalloc passes valid pointers to two bools. The pages have never been
                // touched: anonymous memory reads as zeros; it is now readable and writable.
                unsafe {
                    *zero = true;
                    *commit = true;
                }
                return addr as *mut c_void;
            }
            Err(seen) => cur = seen,
        }
    }
}

/// Opt out: the range stays ours and jemalloc retains the extent for reuse.
unsafe extern "C" fn hook_dalloc(
    _hooks: *mut extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    true
}

/// Arenas are never destroyed; nothing to give back to the system beyond purging.
unsafe extern "C" fn hook_destroy(
    _hooks: *mut extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _committed: bool,
    _arena: c_uint,
) {
}

/// The overflow region behind the overflow hooks `hooks`, and the file offset of
/// `addr + offset` in it; `None` for an engine arena's hooks (or in a child of `fork`, which
/// has no overflow mapping).
///
/// # Safety
/// As for [`engine_of`].
unsafe fn overflow_span(
    hooks: *mut extent_hooks_t,
    addr: *mut c_void,
    offset: usize,
) -> Option<(&'static crate::OverflowRegion, usize)> {
    // SAFETY: per this function's contract.
    let engine = unsafe { engine_of(hooks) };
    let region = crate::overflow::overflow_region_of(engine.checked_sub(OVERFLOW_SLOT)?)?;
    let at = (addr as usize).wrapping_add(offset);
    region
        .contains(at as *const u8)
        .then(|| (region, at - region.base() as usize))
}

/// Engine arenas' extents are readable and writable from the moment they are handed out:
/// nothing to commit. An overflow extent that was decommitted (its file blocks freed) gets
/// blocks again, or the commit fails (a full disk), so jemalloc never hands out file pages
/// whose first write would need a block the disk no longer has (a `SIGBUS`): it falls back
/// to a new extent, whose growth fails in turn, and the overflow policy decides.
unsafe extern "C" fn hook_commit(
    hooks: *mut extent_hooks_t,
    addr: *mut c_void,
    _size: usize,
    offset: usize,
    length: usize,
    _arena: c_uint,
) -> bool {
    // SAFETY: jemalloc passes back the hooks pointer it was given at `arenas.create`.
    if unsafe { engine_of(hooks) } < OVERFLOW_SLOT {
        return false;
    }
    // SAFETY: as above.
    match unsafe { overflow_span(hooks, addr, offset) } {
        Some((region, at)) => region.back(at, length).is_err(),
        None => true,
    }
}

/// Engine arenas opt out (jemalloc purges instead). Overflow extents free their file blocks
/// (a punched hole reads back as zeros and takes no disk), and [`hook_commit`] backs them
/// again before jemalloc reuses them: a purge followed by a full disk gives the overflow
/// policy's answer, never a fault on a hole.
unsafe extern "C" fn hook_decommit(
    hooks: *mut extent_hooks_t,
    addr: *mut c_void,
    _size: usize,
    offset: usize,
    length: usize,
    _arena: c_uint,
) -> bool {
    // SAFETY: jemalloc passes back the hooks pointer it was given at `arenas.create`.
    match unsafe { overflow_span(hooks, addr, offset) } {
        Some((region, at)) => region.punch_hole(at, length).is_err(),
        None => true,
    }
}

fn madvise(addr: *mut c_void, offset: usize, length: usize, advice: libc::c_int) -> bool {
    // SAFETY: jemalloc passes an extent it owns (page-aligned `addr`, `offset` and `length`
    // within it) inside our private anonymous mapping; MADV_FREE / MADV_DONTNEED only drop
    // page contents of that range. Returns true on failure, as the hook protocol wants.
    unsafe { libc::madvise(addr.cast::<u8>().add(offset).cast(), length, advice) != 0 }
}

unsafe extern "C" fn hook_purge_lazy(
    hooks: *mut extent_hooks_t,
    addr: *mut c_void,
    _size: usize,
    offset: usize,
    length: usize,
    _arena: c_uint,
) -> bool {
    // SAFETY: jemalloc passes back the hooks pointer it was given at `arenas.create`.
    if unsafe { engine_of(hooks) } >= OVERFLOW_SLOT {
        // `MADV_FREE` is for private anonymous memory: opt out for the shared file mapping.
        return true;
    }
    madvise(addr, offset, length, libc::MADV_FREE)
}

/// Private anonymous memory reads back as zeros after `MADV_DONTNEED`, as a forced purge
/// promises.
unsafe extern "C" fn hook_purge_forced(
    hooks: *mut extent_hooks_t,
    addr: *mut c_void,
    _size: usize,
    offset: usize,
    length: usize,
    _arena: c_uint,
) -> bool {
    // SAFETY: jemalloc passes back the hooks pointer it was given at `arenas.create`.
    if unsafe { engine_of(hooks) } >= OVERFLOW_SLOT {
        // Opt out: only a punched hole reads back as zeros on a shared file mapping, and a
        // hole in a committed extent would need a block at its next write, which a full disk
        // refuses with a `SIGBUS`. Decommitting (which punches, and has the extent backed
        // again at its next commit) is what jemalloc tries first; the extent stays as it is
        // if that failed.
        return true;
    }
    madvise(addr, offset, length, libc::MADV_DONTNEED)
}

/// Extents of one arena all lie in one mapping: splitting and merging them needs nothing.
unsafe extern "C" fn hook_split(
    _hooks: *mut extent_hooks_t,
    _addr: *mut c_void,
    _size: usize,
    _size_a: usize,
    _size_b: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    false
}

unsafe extern "C" fn hook_merge(
    _hooks: *mut extent_hooks_t,
    _addr_a: *mut c_void,
    _size_a: usize,
    _addr_b: *mut c_void,
    _size_b: usize,
    _committed: bool,
    _arena: c_uint,
) -> bool {
    false
}

/// jemalloc's view of one engine's arena, from `stats.arenas.<i>.*`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArenaStats {
    /// Bytes of physical memory the arena's pages occupy (`resident`).
    pub resident: u64,
    /// Bytes in active pages, i.e. backing live allocations (`pactive` × page size).
    pub active: u64,
    /// Bytes in dirty pages, freed but not yet returned to the system (`pdirty` × page size).
    pub dirty: u64,
    /// Bytes mapped by the arena (`mapped`).
    pub mapped: u64,
}

/// The per-arena statistics, resolved once; component 2 is the arena index.
static RESIDENT: Mib<4> = Mib::new(c"stats.arenas.0.resident");
static PACTIVE: Mib<4> = Mib::new(c"stats.arenas.0.pactive");
static PDIRTY: Mib<4> = Mib::new(c"stats.arenas.0.pdirty");
static MAPPED: Mib<4> = Mib::new(c"stats.arenas.0.mapped");

/// Statistic `mib` of `arena` (all these are `size_t`), 0 if unavailable.
fn read_stat(mib: &Mib<4>, arena: usize) -> u64 {
    // SAFETY: the per-arena `resident`, `pactive`, `pdirty` and `mapped` are `size_t`.
    unsafe { mib.read_at::<usize>(Some((2, arena))) }.map_or(0, |v| v as u64)
}

/// Asks jemalloc to refresh its statistics.
fn refresh_stats() {
    // SAFETY: `epoch` takes a `uint64_t`.
    let _ = unsafe { mallctl::write(c"epoch", 1u64) };
}

/// Refreshes jemalloc's statistics (`epoch`) and reads every engine's arena figures (summed
/// over its nodes). `Unattributed` gets the automatic arenas' share: all arenas minus the
/// engines' and their overflow arenas'. All zero before the engine arenas exist. Costs tens of
/// microseconds: sample it, never call it per allocation.
pub fn arena_stats() -> [ArenaStats; EngineId::COUNT] {
    arena_stats_by_node().0
}

/// Per-engine figures for each node, indexed `[engine][node]` (zero where there is no arena).
pub type ArenaStatsByNode = [[ArenaStats; MAX_NODES]; EngineId::COUNT];

/// As [`arena_stats`], and the same figures per node.
pub fn arena_stats_by_node() -> ([ArenaStats; EngineId::COUNT], ArenaStatsByNode) {
    let mut out = [ArenaStats::default(); EngineId::COUNT];
    let mut by_node = [[ArenaStats::default(); MAX_NODES]; EngineId::COUNT];
    if !arenas_ready()
        || ![&RESIDENT, &PACTIVE, &PDIRTY, &MAPPED]
            .iter()
            .all(|m| m.resolve())
    {
        return (out, by_node);
    }
    refresh_stats();
    let page = 4096u64;
    let read = |arena: usize| ArenaStats {
        resident: read_stat(&RESIDENT, arena),
        active: read_stat(&PACTIVE, arena) * page,
        dirty: read_stat(&PDIRTY, arena) * page,
        mapped: read_stat(&MAPPED, arena),
    };
    /// `MALLCTL_ARENAS_ALL`: statistics merged over every arena.
    const ALL_ARENAS: usize = 4096;
    let all = read(ALL_ARENAS);
    let mut rest = all;
    let mut subtract = |s: &ArenaStats| {
        rest.resident = rest.resident.saturating_sub(s.resident);
        rest.active = rest.active.saturating_sub(s.active);
        rest.dirty = rest.dirty.saturating_sub(s.dirty);
        rest.mapped = rest.mapped.saturating_sub(s.mapped);
    };
    for engine in 0..ARENA_ENGINES {
        for (node, a) in arenas_of(engine) {
            let s = read(a as usize);
            subtract(&s);
            for total in [&mut by_node[engine][node], &mut out[engine]] {
                total.resident += s.resident;
                total.active += s.active;
                total.dirty += s.dirty;
                total.mapped += s.mapped;
            }
        }
    }
    for e in 0..ARENA_ENGINES {
        if let Some(a) = crate::overflow::overflow_arena(Slot::at(e)) {
            subtract(&read(a as usize));
        }
    }
    out[EngineId::Unattributed.index()] = rest;
    (out, by_node)
}

/// The engine that owns the heap block at `ptr`, judged by its address alone: the engine
/// whose range (or overflow range) holds it, or `Unattributed` for memory outside them all.
pub fn owner(ptr: *const u8) -> EngineId {
    owner_of(ptr).engine()
}

/// Whether the heap block at `ptr` lives in an engine's overflow range.
pub fn is_overflow(ptr: *const u8) -> bool {
    owner_of(ptr).is_overflow()
}

/// Returns the dirty pages of `engine`'s arenas (on every node) to the system now
/// (`arena.<i>.purge`), leaving the other engines' alone. Takes milliseconds when there is much
/// to purge; call it from a background thread. False if an engine arena could not be purged
/// (or none exists).
pub fn purge_engine(engine: EngineId) -> bool {
    let mut any = false;
    let mut ok = true;
    ensure_arenas();
    for (_, arena) in arenas_of(engine.index()) {
        any = true;
        ok &= purge_arena(arena);
    }
    any && ok
}

/// `arena.<arena>.purge`.
fn purge_arena(arena: c_uint) -> bool {
    mallctl::run(arena_name(arena, b".purge").as_cstr())
}

/// The index of `engine`'s first arena (node 0, shard 0), for callers that want to inspect it
/// with `mallctl`; the engine has [`shards`] such arenas per node.
pub fn arena_index(engine: EngineId) -> Option<u32> {
    arena_of(Slot::of(engine), 0, 0)
}

/// Returns every arena's dirty and muzzy pages to the system now (`arena.<all>.purge`).
/// Takes milliseconds when there is much to purge; call it from a background thread.
pub fn purge_all_arenas() -> bool {
    // `MALLCTL_ARENAS_ALL`.
    mallctl::run(c"arena.4096.purge")
}

/// jemalloc's `stats.resident` after refreshing its statistics: bytes of physical memory in
/// pages jemalloc holds (data, metadata, dirty pages). `None` if statistics are unavailable.
pub fn allocator_resident() -> Option<u64> {
    refresh_stats();
    allocator_resident_as_refreshed()
}

/// jemalloc's `stats.resident` as of the last refresh of its statistics (by
/// [`arena_stats`], [`arena_stats_by_node`] or [`allocator_resident`]): saves a second
/// refresh, which walks every arena, where one was just made.
pub fn allocator_resident_as_refreshed() -> Option<u64> {
    // SAFETY: `stats.resident` is a `size_t`.
    unsafe { mallctl::read::<usize>(c"stats.resident") }
        .ok()
        .map(|v| v as u64)
}
