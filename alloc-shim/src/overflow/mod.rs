//! Overflow: where an engine's implicit allocations go while it is over its limit — one
//! file-backed [`OverflowRegion`] and jemalloc arena per engine, the policy for what overflow
//! cannot take, its counters, and what a child of `fork` does without it.

mod backing;
mod error;
#[cfg(feature = "testing")]
pub mod fault;
#[cfg(not(feature = "testing"))]
mod fault;
mod file;
pub(crate) mod pushout;
mod region;

pub use region::{OverflowError, OverflowRegion, PageOutMethod};

use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};

use crate::accounting::bound::DIRECT_THRESHOLD;
use crate::accounting::ledger::would_cross;
use crate::accounting::limits::is_over;
use crate::id::{ARENA_ENGINES, Arena, EngineId, Node, Slot};
use crate::space::arenas::ensure_arenas;
use crate::space::hooks;
use crate::space::reservation::{range_bytes, range_start};
use crate::sys::mallctl::keys;

/// What happens when an engine's overflow region cannot take an allocation (full, or its
/// file cannot grow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OverflowPolicy {
    /// Serve it from the engine's normal arena and count a breach (the default: nothing
    /// fails, the budget is exceeded and says so).
    #[default]
    FallBack,
    /// Return null, so fallible allocations (`try_reserve`) fail; infallible ones abort.
    FailAllocation,
}

static OVERFLOW_POLICY: AtomicU8 = AtomicU8::new(0);
static OVERFLOW_ARENA: [AtomicU32; ARENA_ENGINES] = [const { AtomicU32::new(0) }; ARENA_ENGINES];
/// Allocations that overflow could not take and that were served normally instead.
static BREACHES: AtomicU64 = AtomicU64::new(0);
/// Allocations refused (null) because overflow could not take them.
static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Whether a new block of `usable` bytes for `engine` belongs in its overflow region: the
/// engine is over its limit, or the block is large and would take it over.
#[inline]
pub(crate) fn wants_overflow(engine: Slot, usable: u64) -> bool {
    is_over(engine) || (usable >= DIRECT_THRESHOLD && would_cross(engine, usable))
}

/// The overflow arena of engine `e`, when overflow is enabled.
#[inline]
pub(crate) fn overflow_arena(e: Slot) -> Option<Arena> {
    if !backing::is_on() {
        return None;
    }
    OVERFLOW_ARENA
        .get(e.index())
        .map(|a| Arena(a.load(Ordering::Relaxed)))
}

/// The configured policy for allocations overflow cannot take.
pub(crate) fn overflow_policy() -> OverflowPolicy {
    if OVERFLOW_POLICY.load(Ordering::Relaxed) == 1 {
        OverflowPolicy::FailAllocation
    } else {
        OverflowPolicy::FallBack
    }
}

/// Per engine: allocations overflow could not take that were served normally (`[0]` count,
/// `[1]` bytes) and that were refused.
static ENGINE_BREACHES: [[AtomicU64; 2]; ARENA_ENGINES] =
    [const { [const { AtomicU64::new(0) }; 2] }; ARENA_ENGINES];
static ENGINE_REFUSALS: [[AtomicU64; 2]; ARENA_ENGINES] =
    [const { [const { AtomicU64::new(0) }; 2] }; ARENA_ENGINES];

/// Counts an allocation of `bytes` for `engine` that overflow could not take and that was
/// served from the engine's normal arena.
pub(crate) fn count_breach(engine: Slot, bytes: u64) {
    BREACHES.fetch_add(1, Ordering::Relaxed);
    if let Some([n, b]) = ENGINE_BREACHES.get(engine.index()) {
        n.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Counts an allocation of `bytes` for `engine` refused because overflow could not take it.
pub(crate) fn count_refusal(engine: Slot, bytes: u64) {
    REFUSED.fetch_add(1, Ordering::Relaxed);
    if let Some([n, b]) = ENGINE_REFUSALS.get(engine.index()) {
        n.fetch_add(1, Ordering::Relaxed);
        b.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// One engine's allocations that its overflow region could not take: served from its normal
/// arena past its limit (policy `FallBack`) or refused (`FailAllocation`), counted and in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverflowBreaches {
    /// Allocations served normally past the limit.
    pub breaches: u64,
    /// Their bytes.
    pub breach_bytes: u64,
    /// Allocations refused.
    pub refused: u64,
    /// Their bytes.
    pub refused_bytes: u64,
}

/// The breaches and refusals of `engine`'s overflow (zero for `Unattributed`).
pub fn overflow_breaches(engine: EngineId) -> OverflowBreaches {
    let (Some([bn, bb]), Some([rn, rb])) = (
        ENGINE_BREACHES.get(engine.index()),
        ENGINE_REFUSALS.get(engine.index()),
    ) else {
        return OverflowBreaches::default();
    };
    OverflowBreaches {
        breaches: bn.load(Ordering::Relaxed),
        breach_bytes: bb.load(Ordering::Relaxed),
        refused: rn.load(Ordering::Relaxed),
        refused_bytes: rb.load(Ordering::Relaxed),
    }
}

/// What one engine's overflow region holds on disk and in memory now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverflowFigures {
    /// Bytes of the region backed by its file so far (it never shrinks).
    pub backed: u64,
    /// Bytes of the region resident in memory now (`mincore`).
    pub resident: u64,
    /// Bytes of disk the backing file occupies (`st_blocks`; punched holes free them).
    pub disk: u64,
    /// The region's capacity.
    pub capacity: u64,
}

impl OverflowFigures {
    /// Bytes of the region backed by the file but not resident: pushed out (or evicted by the
    /// kernel), to be read back from the disk on the next touch.
    pub fn paged_out(&self) -> u64 {
        self.backed.saturating_sub(self.resident)
    }
}

/// Reads `engine`'s overflow figures from the kernel (`mincore` over the region through
/// [`sys::resident_range`](crate::sys::resident_range), and `fstat`): milliseconds for gigabytes; sample it. Zero without
/// overflow.
pub fn overflow_figures(engine: EngineId) -> OverflowFigures {
    use std::os::fd::AsRawFd;
    let Some(region) = overflow_region(engine) else {
        return OverflowFigures::default();
    };
    let len = region.len();
    // The region is mapped for its whole length while the process lives.
    let resident = crate::sys::resident_range(region.base() as usize, len).unwrap_or(0);
    // SAFETY: an all-zero stat is valid for fstat to fill.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the region's open descriptor and a stat to write.
    let disk = if unsafe { libc::fstat(region.file().as_raw_fd(), &mut st) } == 0 {
        (st.st_blocks as u64).saturating_mul(512)
    } else {
        0
    };
    OverflowFigures {
        backed: len as u64,
        resident,
        disk,
        capacity: region.capacity() as u64,
    }
}

/// Creates every engine's overflow region in `dir` (`capacity` bytes each, at most
/// [`range_bytes`])
/// over its reserved overflow range, and the overflow arenas. Once per process.
pub fn enable_overflow(
    dir: &std::path::Path,
    capacity: usize,
    allow_tmpfs: bool,
    policy: OverflowPolicy,
) -> Result<(), OverflowError> {
    let err = |op: &'static str, errno: i32| OverflowError::Os { op, errno };
    if !ensure_arenas() {
        return Err(err("creating the engine arenas", libc::ENOMEM));
    }
    let range = range_bytes();
    if capacity > range {
        return Err(OverflowError::Exhausted {
            requested: capacity,
            capacity: range,
        });
    }
    // One caller at a time from the check to the last region stored: a second caller must
    // never map its own file over the first one's range.
    let mut created = ENABLING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if backing::REGIONS.iter().any(|r| r.get().is_some()) {
        return Err(err("enabling overflow (already enabled)", libc::EEXIST));
    }
    // The arenas first: without their metadata outside the hooks, a forked child would die.
    // Created once: a call that failed later on leaves them for the next call to use.
    let arenas = match *created {
        Some(arenas) => arenas,
        None => {
            let mut arenas = [Arena(0); ARENA_ENGINES];
            for (e, at) in arenas.iter_mut().enumerate() {
                let Some(slot) = Slot::at(e).overflow() else {
                    continue;
                };
                hooks::register(slot, &backing::OVERFLOW_BACKING);
                match hooks::create_arena(slot, Node::FIRST) {
                    Ok((arena, false)) => *at = arena,
                    Ok((_, true)) => {
                        return Err(err(
                            "creating an overflow arena safe across fork",
                            libc::ENOTSUP,
                        ));
                    }
                    Err(rc) => return Err(err("creating an overflow arena", rc)),
                }
            }
            *created = Some(arenas);
            arenas
        }
    };
    // Every region is made before any is stored, so a failure part-way (a full disk, too many
    // open files) leaves nothing behind: the regions made so far are dropped, which puts the
    // reservation back over their ranges, and a later call can try again.
    let mut regions: [Option<OverflowRegion>; ARENA_ENGINES] = Default::default();
    for (e, slot) in regions.iter_mut().enumerate() {
        let Some(overflow) = Slot::at(e).overflow() else {
            continue;
        };
        let at = range_start(overflow, Node::FIRST) as *mut u8;
        *slot = Some(OverflowRegion::create_at(
            dir,
            capacity,
            allow_tmpfs,
            Some(at),
        )?);
    }
    for (slot, region) in backing::REGIONS.iter().zip(regions) {
        if let Some(region) = region
            && slot.set(region).is_err()
        {
            // Unreachable: the slots are only set here, under `ENABLING`, after the check.
            return Err(err("enabling overflow (already enabled)", libc::EEXIST));
        }
    }
    for (slot, arena) in OVERFLOW_ARENA.iter().zip(arenas) {
        set_retain_grow_limit(arena, OVERFLOW_GROW_LIMIT);
        slot.store(arena.index(), Ordering::Relaxed);
    }
    register_fork_handler();
    set_overflow_policy(policy);
    backing::set_on(true);
    Ok(())
}

/// Held by [`enable_overflow`] from its check to the last region stored; keeps the overflow
/// arenas once created, for a call after a failed one.
static ENABLING: std::sync::Mutex<Option<[Arena; ARENA_ENGINES]>> = std::sync::Mutex::new(None);

/// The most an overflow arena asks its region for at once (beyond what one allocation needs).
/// jemalloc grows an arena's retained memory geometrically; a request that does not fit what is
/// left of the region fails although smaller ones would: with 1 MiB blocks, a 512 MiB region
/// filled to ~400 MiB. With growth capped at 4 MiB, at most that much of a region is lost.
const OVERFLOW_GROW_LIMIT: usize = 4 << 20;

/// `arena.<arena>.retain_grow_limit = limit`.
fn set_retain_grow_limit(arena: Arena, limit: usize) -> bool {
    keys::ARENA_RETAIN_GROW_LIMIT
        .at(keys::ARENA_PART, arena.index())
        .write(limit)
        .is_ok()
}

/// Changes what happens when overflow cannot take an allocation.
pub fn set_overflow_policy(policy: OverflowPolicy) {
    OVERFLOW_POLICY.store(
        u8::from(policy == OverflowPolicy::FailAllocation),
        Ordering::Relaxed,
    );
}

/// Whether `engine`'s new allocations currently go to its overflow region.
pub fn is_overflowing(engine: EngineId) -> bool {
    is_over(Slot::of(engine)) && overflow_arena(Slot::of(engine)).is_some()
}

/// Counters of the overflow path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OverflowStats {
    /// Allocations served normally because overflow could not take them (policy `FallBack`).
    pub breaches: u64,
    /// Allocations refused because overflow could not take them (policy `FailAllocation`).
    pub refused: u64,
    /// Extents the overflow regions could not provide.
    pub extent_failures: u64,
}

/// The overflow path's counters.
pub fn overflow_stats() -> OverflowStats {
    OverflowStats {
        breaches: BREACHES.load(Ordering::Relaxed),
        refused: REFUSED.load(Ordering::Relaxed),
        extent_failures: backing::extent_failures(),
    }
}

/// Pushes every overflow region's pages out of memory and out of the page cache (see
/// [`OverflowRegion::push_out`]). Returns the bytes swept.
pub fn page_out_overflow() -> u64 {
    let mut total = 0u64;
    for region in (0..ARENA_ENGINES).filter_map(backing::region_of) {
        let len = region.len();
        if len > 0 && region.push_out(0, len).is_ok() {
            total += len as u64;
        }
    }
    total
}

/// The overflow region of `engine`, once enabled (`None` in a child of `fork`, which does not
/// inherit the regions).
pub fn overflow_region(engine: EngineId) -> Option<&'static OverflowRegion> {
    backing::region_of(engine.index())
}

// ---------------------------------------------------------------------------------------------
// fork: the child keeps the engine arenas (private memory, copied as usual) but not overflow.

/// Registers [`after_fork_in_child`], once (when overflow is first enabled).
fn register_fork_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: the child handler is an `extern "C" fn()` that lives as long as the process.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    });
}

/// Whether this process is a child of `fork` of a process that had overflow enabled
/// (overflow is off in it).
pub fn is_forked_child() -> bool {
    backing::is_forked()
}

/// Runs in a child of `fork`, on its only thread, before `fork` returns there.
///
/// # Safety
/// Called by the C library only, in the child of `fork`, with no other thread running. The overflow
/// mappings are `MADV_DONTFORK` (the child sharing the parent's file pages would corrupt the
/// parent's heap), so the child has none: turn overflow off, so the child's engines allocate in
/// their normal arenas, and reserve the holes again so nothing else is mapped inside the
/// overflow ranges (whose addresses would be taken for overflow blocks). Only system calls and
/// atomic stores: safe between `fork` and `exec`.
unsafe extern "C" fn after_fork_in_child() {
    backing::set_forked();
    backing::set_on(false);
    for region in backing::REGIONS.iter().filter_map(std::sync::OnceLock::get) {
        // SAFETY: the region's range lies inside our reservation; in the child nothing is
        // mapped there any more (the parent's mapping was not inherited), so replacing it with
        // an inaccessible reservation affects no memory of the child's.
        unsafe {
            libc::mmap(
                region.base().cast(),
                region.capacity(),
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
                -1,
                0,
            );
        }
    }
}
