//! The per-thread in-flight bound: how far the ledger may run ahead of a thread's live bytes,
//! and every threshold of the home path's settlement that derives from it (see `ledger.rs`).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::sys::parse::{self, NumberError};

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
    const UNITS: &[(&[u8], u32)] = &[
        (b"", 0),
        (b"B", 0),
        (b"K", 10),
        (b"KiB", 10),
        (b"k", 10),
        (b"M", 20),
        (b"MiB", 20),
    ];
    let bytes = parse::size(text, UNITS).map_err(|e| match e {
        NumberError::NoDigits => "expected a number of bytes, such as 1MiB",
        NumberError::TooLarge => "too large",
        NumberError::UnknownUnit => "unknown unit (bytes, KiB or MiB)",
    })?;
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
