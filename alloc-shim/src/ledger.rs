//! The allocator's own ledger: bytes charged to each engine by the global allocator.
//!
//! # Exact by construction
//!
//! jemalloc counts every thread's allocated and deallocated bytes itself. A thread's
//! allocations and frees of its *home* engine's small blocks go straight to jemalloc and are
//! settled into the ledger later, as the net change of those counters (less what the thread's
//! slower paths charged or credited directly), at least every [`Bound::interval`] bytes in
//! either direction. The thread holds *headroom*: bytes charged to its home engine ahead of its
//! allocations (bought against the engine's limit), which its next allocations draw on before
//! anyone counts them. A settlement leaves the ledger alone while the headroom left stays within
//! `headroom_min..=headroom_max`, and otherwise brings it back to `headroom` in one atomic
//! operation, so a thread whose allocations and frees balance never touches the shared
//! counter. Everything else (other engines' blocks, blocks above [`FAST_MAX`]) is charged and
//! credited when it happens. So for every engine, at every instant,
//!
//! ```text
//! charged = live bytes + Σ threads' (headroom − net home bytes not yet settled)
//!           0 <= headroom − unsettled < headroom_max + interval = batch
//! ```
//!
//! Unsettled home allocations stay below `interval + FAST_MAX + 1 = headroom_min` (jemalloc
//! calls the hook inside the allocation that crosses an interval, and the home path takes
//! nothing larger than [`FAST_MAX`]), and unsettled frees below `interval`. So the ledger
//! never understates an engine, not even inside an allocation, and since headroom is bought
//! only within the limit, a settlement never takes the ledger past the limit either. A thread
//! only gives back bytes that were charged — its own headroom, or blocks freed — so `charged`
//! can never go below zero or wrap. When every thread has flushed (thread exit or
//! [`flush_thread`](crate::flush_thread)), `charged` equals the live bytes exactly; while
//! threads run it overstates them by less than the bound (`batch`) per thread. The bound is the
//! process's, fixed before any thread holds headroom ([`inflight_bound`]: 64 KiB unless
//! [`INFLIGHT_BOUND_ENV`] says otherwise, up to 4 MiB); every threshold derives from it
//! ([`Bound`]).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::EngineId;
use crate::slot::{ARENA_ENGINES, SLOTS, Slot};
use crate::sync::Word;

/// The default per-thread in-flight bound: a thread's headroom and its home bytes not yet
/// settled keep the ledger less than this many bytes above the live bytes, and never below
/// them. Exactness is what peers lack (their batched trackers drift by 4 MiB per thread);
/// a larger bound costs fewer settlements (`docs/benchmarks.md` has the table).
pub const DEFAULT_INFLIGHT_BOUND: u64 = 64 * 1024;

/// The least and most in-flight bound a process may choose.
pub const MIN_INFLIGHT_BOUND: u64 = 64 * 1024;
/// See [`MIN_INFLIGHT_BOUND`].
pub const MAX_INFLIGHT_BOUND: u64 = 4 << 20;

/// The environment variable that sets the process's in-flight bound: a power of two from
/// [`MIN_INFLIGHT_BOUND`] to [`MAX_INFLIGHT_BOUND`], in bytes or with a `KiB`/`MiB` suffix
/// (`1MiB`). Read once, at the first allocation that needs the bound (before `main`); a value
/// that does not parse leaves the default, and `install()` refuses it with the reason.
pub const INFLIGHT_BOUND_ENV: &str = "NODEDB_MEM_INFLIGHT_BOUND";

/// The thresholds an in-flight bound implies (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bound {
    /// The bound itself: the ledger is less than this many bytes above a thread's live bytes.
    pub batch: u64,
    /// jemalloc calls the thread-event hook each time a thread's allocated, or its
    /// deallocated, bytes grow by this much (three eighths of the bound); the thread settles
    /// its home delta then. Each call costs about 60 ns here, so the larger the interval, the
    /// cheaper the hot path.
    pub interval: u64,
    /// The least headroom a thread may hold and still allocate on the home path: the interval
    /// plus the largest home-path block, all it can allocate before its next settlement, so
    /// the ledger never lags the live bytes.
    pub headroom_min: u64,
    /// The headroom a settlement that touches the ledger leaves the thread with (the middle of
    /// the band).
    pub headroom: u64,
    /// The most headroom a thread keeps (frees give it back beyond this): the bound less the
    /// interval.
    pub headroom_max: u64,
}

impl Bound {
    /// The thresholds of bound `batch` (a power of two in the allowed range).
    pub const fn of(batch: u64) -> Bound {
        let interval = batch / 8 * 3;
        let headroom_max = batch - interval;
        let headroom_min = interval + FAST_MAX as u64 + 1;
        Bound {
            batch,
            interval,
            headroom_min,
            headroom: (headroom_min + headroom_max) / 2,
            headroom_max,
        }
    }

    /// The default bound's thresholds (24 KiB interval, headroom 32–40 KiB).
    pub const DEFAULT: Bound = Bound::of(DEFAULT_INFLIGHT_BOUND);
}

const _: () = {
    let (lo, hi) = (Bound::of(MIN_INFLIGHT_BOUND), Bound::of(MAX_INFLIGHT_BOUND));
    assert!(
        lo.headroom_min <= lo.headroom
            && lo.headroom <= lo.headroom_max
            && lo.headroom_max + lo.interval == lo.batch
            && hi.headroom_min <= hi.headroom
            && hi.headroom <= hi.headroom_max
            && hi.headroom_max + hi.interval == hi.batch,
        "the headroom band of every allowed bound"
    );
    let d = Bound::DEFAULT;
    assert!(
        d.interval == 24 * 1024
            && d.headroom_min == 32 * 1024
            && d.headroom == 36 * 1024
            && d.headroom_max == 40 * 1024,
        "the default bound's thresholds"
    );
};

/// The process's bound (`0` until fixed). Fixed once, by the first thread that registers for
/// the home path (before any thread holds headroom), and never changed after.
static BOUND: AtomicU64 = AtomicU64::new(0);

/// The process's in-flight bound, fixing it (from [`INFLIGHT_BOUND_ENV`], else the default) if
/// no thread has yet.
#[inline]
pub fn inflight_bound() -> Bound {
    let b = BOUND.load(Ordering::Relaxed);
    Bound::of(if b != 0 { b } else { fix_bound() })
}

#[cold]
fn fix_bound() -> u64 {
    let want = bound_from_env()
        .ok()
        .flatten()
        .unwrap_or(DEFAULT_INFLIGHT_BOUND);
    match BOUND.compare_exchange(0, want, Ordering::AcqRel, Ordering::Acquire) {
        Ok(_) => want,
        Err(fixed) => fixed,
    }
}

/// The bound [`INFLIGHT_BOUND_ENV`] asks for: `Ok(None)` when unset, `Err` with the reason when
/// it does not parse or is out of range. Reads the environment without allocating (it runs
/// inside the allocator).
pub fn bound_from_env() -> Result<Option<u64>, &'static str> {
    // SAFETY: the name is a NUL-terminated constant; `getenv` returns null or a pointer into
    // the environment, valid until the environment changes, read at once below.
    let p = unsafe { libc::getenv(c"NODEDB_MEM_INFLIGHT_BOUND".as_ptr()) };
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null, so a NUL-terminated string from the environment.
    let text = unsafe { std::ffi::CStr::from_ptr(p) }.to_bytes();
    parse_bound(text).map(Some)
}

/// Parses a bound: digits, then nothing or `K`/`KiB`/`M`/`MiB`; a power of two from
/// [`MIN_INFLIGHT_BOUND`] to [`MAX_INFLIGHT_BOUND`].
pub fn parse_bound(text: &[u8]) -> Result<u64, &'static str> {
    let text = text.trim_ascii();
    let digits = text.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 {
        return Err("expected a number of bytes, such as 1MiB");
    }
    let mut n: u64 = 0;
    for &c in &text[..digits] {
        n = n
            .checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(c - b'0')))
            .ok_or("too large")?;
    }
    let unit: u64 = match text[digits..].trim_ascii() {
        b"" | b"B" => 1,
        b"K" | b"KiB" | b"k" => 1024,
        b"M" | b"MiB" => 1 << 20,
        _ => return Err("unknown unit (bytes, KiB or MiB)"),
    };
    let bytes = n.checked_mul(unit).ok_or("too large")?;
    if !(MIN_INFLIGHT_BOUND..=MAX_INFLIGHT_BOUND).contains(&bytes) {
        return Err("must be between 64 KiB and 4 MiB");
    }
    if !bytes.is_power_of_two() {
        return Err("must be a power of two");
    }
    Ok(bytes)
}

/// The largest request (and alignment) the home path serves without charging it at once, a
/// mask so that one test covers both (`size | align <= FAST_MAX`); its usable size is at most
/// `FAST_MAX + 1`. Anything larger is charged and credited exactly when it happens.
pub const FAST_MAX: usize = 8 * 1024 - 1;

/// Allocations and frees of at least this many bytes always update the ledger immediately
/// (as, in fact, does everything above [`FAST_MAX`]).
pub const DIRECT_THRESHOLD: u64 = 1 << 20;

#[repr(align(128))]
pub(crate) struct EngineLedger {
    charged: AtomicU64,
    peak: AtomicU64,
    window_peak: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: EngineLedger = EngineLedger {
    charged: AtomicU64::new(0),
    peak: AtomicU64::new(0),
    window_peak: AtomicU64::new(0),
};

/// One ledger per slot: the engines, Unattributed, and each engine's overflow.
static LEDGER: [EngineLedger; SLOTS] = [EMPTY; SLOTS];

#[inline(always)]
fn ledger(slot: Slot) -> &'static EngineLedger {
    // A `Slot` is always below `SLOTS`; fall back to the unattributed bucket rather than panic
    // if that were ever broken.
    match LEDGER.get(slot.index()) {
        Some(l) => l,
        None => &LEDGER[Slot::UNATTRIBUTED.index()],
    }
}

#[inline(always)]
pub(crate) fn charge(engine: Slot, bytes: u64) {
    let l = ledger(engine);
    let now = add(&l.charged, bytes);
    charged_to(l, engine, now);
}

/// Adds `bytes` to `w` unconditionally; the new value.
#[inline(always)]
pub(crate) fn add<W: Word>(w: &W, bytes: u64) -> u64 {
    // Sequentially consistent, as every read-modify-write that raises a charge: the wake marks
    // rely on one total order with the background thread's arming (`wake::arm`). It costs what
    // `AcqRel` does on x86 (a locked instruction either way) and on ARMv8.1 (`ldaddal`).
    w.fetch_add(bytes, Ordering::SeqCst).wrapping_add(bytes)
}

/// Takes `bytes` the caller holds (charged before) from `w`; the new value.
#[inline(always)]
pub(crate) fn sub<W: Word>(w: &W, bytes: u64) -> u64 {
    w.fetch_sub(bytes, Ordering::AcqRel).wrapping_sub(bytes)
}

/// Charges `bytes` unless that would take `engine`'s ledger past `limit`, and says whether it
/// did. The check and the charge are one compare-and-swap, so concurrent charges cannot
/// together pass the limit: a ledger charged only through here never exceeds it.
#[inline]
pub(crate) fn try_charge(engine: Slot, bytes: u64, limit: u64) -> bool {
    if limit == u64::MAX {
        charge(engine, bytes);
        return true;
    }
    let l = ledger(engine);
    match add_within(&l.charged, bytes, limit) {
        Some(now) => {
            charged_to(l, engine, now);
            true
        }
        None => {
            if engine.has_arena() {
                update_over(engine, limit);
            }
            false
        }
    }
}

/// Adds `bytes` to `w` unless the sum would pass `limit`: the new value, or `None` (nothing
/// added). One compare-and-swap loop, so concurrent callers cannot together pass the limit.
#[inline]
pub(crate) fn add_within<W: Word>(w: &W, bytes: u64, limit: u64) -> Option<u64> {
    let mut cur = w.load(Ordering::Relaxed);
    loop {
        let now = cur.checked_add(bytes).filter(|&n| n <= limit)?;
        // Sequentially consistent on success: see `add`.
        match w.compare_exchange_weak(cur, now, Ordering::SeqCst, Ordering::Relaxed) {
            Ok(_) => return Some(now),
            Err(actual) => cur = actual,
        }
    }
}

/// What a settlement does, decided from the thread's own figures alone: `held` the headroom it
/// held at the last settlement, `added` and `freed` its home bytes since then, `buy` whether it
/// wants headroom for what follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Plan {
    /// The headroom left is within the band: keep it, leave the ledger alone.
    Keep(u64),
    /// Tell the ledger: add `add`, remove `sub`, and charge `want` more as headroom if the
    /// limit allows (see [`settle_within`]).
    Settle { add: u64, sub: u64, want: u64 },
}

/// The settlement rule (see the module docs): keep headroom within
/// `headroom_min..=headroom_max` of the process's [`Bound`] untouched, else settle back to
/// `headroom` (or to nothing, without `buy`).
#[inline]
pub(crate) fn plan(held: u64, added: u64, freed: u64, buy: bool) -> Plan {
    let b = inflight_bound();
    match held.saturating_add(freed).checked_sub(added) {
        Some(left) if buy && (b.headroom_min..=b.headroom_max).contains(&left) => Plan::Keep(left),
        _ => Plan::Settle {
            add: added,
            sub: freed.saturating_add(held),
            want: if buy { b.headroom } else { 0 },
        },
    }
}

/// Applies a [`Plan::Settle`] to `w`: adds `add`, removes `sub`, and adds `want` more if the
/// result stays within `limit`. Returns the new value and whether `want` was added. The
/// settled part goes in even past the limit: those bytes are already allocated, and the
/// headroom held covered them (see the module docs).
#[inline]
pub(crate) fn settle_within<W: Word>(
    w: &W,
    add: u64,
    sub: u64,
    want: u64,
    limit: u64,
) -> (u64, bool) {
    let mut cur = w.load(Ordering::Relaxed);
    loop {
        // `sub` was charged (as headroom, or as blocks now freed): it cannot exceed `cur` plus
        // what is being added; saturate rather than wrap if that were ever broken.
        let settled = cur.saturating_add(add).saturating_sub(sub);
        let (now, bought) = match settled.checked_add(want) {
            Some(n) if n <= limit => (n, true),
            _ => (settled, false),
        };
        // Sequentially consistent on success: see `add`.
        match w.compare_exchange_weak(cur, now, Ordering::SeqCst, Ordering::Relaxed) {
            Ok(_) => return (now, bought),
            Err(actual) => cur = actual,
        }
    }
}

/// A thread's settlement against `w`: decides with [`plan`], applies with [`settle_within`].
/// Returns the headroom the thread holds afterwards, and the ledger's new value if it was
/// touched.
#[inline]
pub(crate) fn settle_home<W: Word>(
    w: &W,
    held: u64,
    added: u64,
    freed: u64,
    buy: bool,
    limit: u64,
) -> (u64, Option<u64>) {
    match plan(held, added, freed, buy) {
        Plan::Keep(left) => (left, None),
        Plan::Settle { add, sub, want } => {
            if add == 0 && sub == 0 && want == 0 {
                return (0, None);
            }
            let (now, bought) = settle_within(w, add, sub, want, limit);
            (if bought { want } else { 0 }, Some(now))
        }
    }
}

/// [`settle_home`] on `engine`'s ledger; returns the headroom the thread holds afterwards.
#[inline]
pub(crate) fn settle(engine: Slot, held: u64, added: u64, freed: u64, buy: bool) -> u64 {
    let l = ledger(engine);
    let limit = limit_of(engine);
    let (headroom, now) = settle_home(&l.charged, held, added, freed, buy, limit);
    if let Some(now) = now {
        charged_to(l, engine, now);
    }
    headroom
}

/// After a charge brought `l` to `now`: the peaks and the over-limit flag.
#[inline(always)]
fn charged_to(l: &EngineLedger, engine: Slot, now: u64) {
    crate::wake::check(engine, now);
    if l.peak.load(Ordering::Relaxed) < now {
        l.peak.fetch_max(now, Ordering::AcqRel);
    }
    if l.window_peak.load(Ordering::Relaxed) < now {
        l.window_peak.fetch_max(now, Ordering::AcqRel);
    }
    if engine.has_arena() {
        update_over(engine, now);
    }
}

/// Gives back `bytes`; the caller holds them (as live bytes of an object being freed, or as
/// its own headroom), so the counter cannot go below zero.
#[inline(always)]
pub(crate) fn credit(engine: Slot, bytes: u64) {
    let now = sub(&ledger(engine).charged, bytes);
    if engine.has_arena() {
        update_over(engine, now);
    }
}

/// Bytes charged to `engine` by the global allocator: its live heap bytes plus, for threads
/// that have not flushed, their headroom less their unsettled home bytes (less than the
/// in-flight bound per thread; see the module docs).
pub fn charged(engine: EngineId) -> u64 {
    ledger(Slot::of(engine)).charged.load(Ordering::Acquire)
}

/// [`charged`] by slot, read in the total order of the charges that raise it (see `add`).
pub(crate) fn charged_seq_cst(slot: Slot) -> u64 {
    ledger(slot).charged.load(Ordering::SeqCst)
}

/// [`charged`] by slot index, for the allocator's limit checks.
#[inline]
pub(crate) fn charged_at(slot: Slot) -> u64 {
    ledger(slot).charged.load(Ordering::Relaxed)
}

/// Bytes of `engine`'s live blocks in its overflow region, exact at every instant (no thread's
/// home is an overflow region, so they are charged and credited as they happen). Zero for
/// `Unattributed`, which never overflows.
pub fn overflow_charged(engine: EngineId) -> u64 {
    match Slot::of(engine).overflow() {
        Some(slot) => ledger(slot).charged.load(Ordering::Acquire),
        None => 0,
    }
}

/// The highest value [`charged`] has reached for `engine`.
pub fn charged_peak(engine: EngineId) -> u64 {
    ledger(Slot::of(engine)).peak.load(Ordering::Acquire)
}

/// The highest value of [`charged`] since the last [`take_window_peak`], without restarting
/// the window.
pub fn window_peak(engine: EngineId) -> u64 {
    let l = ledger(Slot::of(engine));
    let now = l.charged.load(Ordering::Acquire);
    l.window_peak.load(Ordering::Acquire).max(now)
}

/// The highest value of [`charged`] since the previous call, restarting the window at the
/// current value. For rebalancing: "how busy was this engine lately".
pub fn take_window_peak(engine: EngineId) -> u64 {
    let l = ledger(Slot::of(engine));
    let now = l.charged.load(Ordering::Acquire);
    l.window_peak.swap(now, Ordering::AcqRel).max(now)
}

// ---------------------------------------------------------------------------------------------
// Limits: what the governor publishes for each engine, and the over-limit flag they drive.

/// Per-engine limit on the allocator's ledger; above it, new allocations overflow.
static LIMIT: [AtomicU64; ARENA_ENGINES] = [const { AtomicU64::new(u64::MAX) }; ARENA_ENGINES];
/// Whether an engine is over its limit (set above it, cleared below 95 % of it).
static OVER: [std::sync::atomic::AtomicBool; ARENA_ENGINES] =
    [const { std::sync::atomic::AtomicBool::new(false) }; ARENA_ENGINES];

/// Whether `engine`'s new allocations should go to its overflow arena now.
#[inline(always)]
pub(crate) fn is_over(engine: Slot) -> bool {
    match OVER.get(engine.index()) {
        Some(flag) => flag.load(Ordering::Relaxed),
        None => false,
    }
}

/// Re-evaluates `engine`'s over-limit flag after its ledger moved to `charged`: set at the
/// limit, cleared below 95 % of it (hysteresis, so the flag does not flap on one block).
#[inline]
pub(crate) fn update_over(engine: Slot, charged: u64) {
    let (Some(limit), Some(flag)) = (LIMIT.get(engine.index()), OVER.get(engine.index())) else {
        return;
    };
    let limit = limit.load(Ordering::Relaxed);
    if charged >= limit {
        if !flag.load(Ordering::Relaxed) {
            flag.store(true, Ordering::Relaxed);
        }
    } else if flag.load(Ordering::Relaxed) && charged < limit / 20 * 19 {
        flag.store(false, Ordering::Relaxed);
    }
}

/// The limit published for ledger slot `slot` (`u64::MAX`: none; overflow slots have none).
#[inline]
pub(crate) fn limit_of(slot: Slot) -> u64 {
    match LIMIT.get(slot.index()) {
        Some(limit) => limit.load(Ordering::Relaxed),
        None => u64::MAX,
    }
}

/// Whether charging `bytes` more would take `engine` past its published limit. Only asked for
/// large blocks (at least [`crate::DIRECT_THRESHOLD`]), before they are placed, so that one
/// block cannot carry an engine far past its limit before the over flag is set; small blocks
/// overshoot by at most a thread's batch.
#[inline]
pub(crate) fn would_cross(engine: Slot, bytes: u64) -> bool {
    match LIMIT.get(engine.index()) {
        Some(limit) => {
            let limit = limit.load(Ordering::Relaxed);
            limit != u64::MAX && charged_at(engine).saturating_add(bytes) > limit
        }
        None => false,
    }
}

/// Sets the limit above which `engine`'s new allocations go to its overflow region (`None`:
/// no limit). The governor publishes each engine's limit here.
pub fn set_overflow_limit(engine: EngineId, limit: Option<u64>) {
    if let Some(slot) = LIMIT.get(engine.index()) {
        slot.store(limit.unwrap_or(u64::MAX), Ordering::Relaxed);
        update_over(Slot::of(engine), crate::charged(engine));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_parse_and_their_thresholds_follow() {
        assert_eq!(parse_bound(b"1MiB"), Ok(1 << 20));
        assert_eq!(parse_bound(b" 256 KiB "), Ok(256 << 10));
        assert_eq!(parse_bound(b"65536"), Ok(64 << 10));
        assert_eq!(parse_bound(b"4M"), Ok(4 << 20));
        assert_eq!(parse_bound(b"96K"), Err("must be a power of two"));
        assert_eq!(
            parse_bound(b"32KiB"),
            Err("must be between 64 KiB and 4 MiB")
        );
        assert_eq!(
            parse_bound(b"8MiB"),
            Err("must be between 64 KiB and 4 MiB")
        );
        assert_eq!(
            parse_bound(b"1GiB"),
            Err("unknown unit (bytes, KiB or MiB)")
        );
        assert_eq!(
            parse_bound(b"MiB"),
            Err("expected a number of bytes, such as 1MiB")
        );
        assert_eq!(parse_bound(b"99999999999999999999"), Err("too large"));
        let b = Bound::of(1 << 20);
        assert_eq!(
            (b.interval, b.headroom_min, b.headroom, b.headroom_max),
            (384 << 10, 392 << 10, 516 << 10, 640 << 10)
        );
        assert_eq!(b.headroom_max + b.interval, b.batch);
        // This test process runs at the default.
        assert_eq!(inflight_bound(), Bound::DEFAULT);
    }
}
