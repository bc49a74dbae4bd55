//! Waking the governor's background thread early from the allocation path.
//!
//! While nothing moves, the background thread sleeps for longer than its interval (a timer
//! wake-up alone costs about 0.1 ms of CPU on a virtual machine). Before such a sleep it arms a
//! mark on every ledger slot ([`arm`]): a charge that brings a slot to its mark wakes the thread at once
//! (one `futex` wake, no lock, no allocation), so memory the allocator hands out is never seen
//! later than it would have been at the normal interval. [`nudge`] does the same for the
//! governor's own signals (an event recorded, a request queued).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::id::{EngineId, SLOTS, Slot};

/// Bumped by every wake; the futex word sleepers wait on.
static SEQ: AtomicU32 = AtomicU32::new(0);
/// Whether some background thread sleeps past its interval (so a nudge is worth a wake).
static STRETCHED: AtomicBool = AtomicBool::new(false);
/// Per ledger slot, the charge at which a settlement wakes the sleepers (`u64::MAX`: none).
static MARK: [AtomicU64; SLOTS] = [const { AtomicU64::new(u64::MAX) }; SLOTS];

/// The wake count now: pass it to [`sleep`] after looking at what the thread watches, so a wake
/// in between is not lost.
pub fn wake_seq() -> u32 {
    SEQ.load(Ordering::Acquire)
}

/// Sleeps for `timeout` unless a wake comes first (or came since `seen` was read with
/// [`wake_seq`]); returns whether one did. Spurious returns are possible and harmless (the
/// caller ticks early).
pub fn sleep(seen: u32, timeout: Duration) -> bool {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        // Under 10^9: fits every `c_long`.
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `SEQ` is a live, aligned 32-bit word for the whole program, and `ts` a valid
    // relative timeout that outlives the call; FUTEX_WAIT reads the word and sleeps only if it
    // still equals `seen`, with no other memory touched.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            SEQ.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            seen,
            &raw const ts,
        );
    }
    SEQ.load(Ordering::Acquire) != seen
}

/// Wakes every sleeper now and disarms the marks. Async-signal-safe: an atomic add and one
/// system call.
pub fn wake() {
    disarm();
    SEQ.fetch_add(1, Ordering::Release);
    // SAFETY: FUTEX_WAKE on a live, aligned 32-bit word touches no memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            SEQ.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

/// Counts a signal, and wakes the sleepers if one sleeps past its interval (a burst of
/// signals costs one wake at most). A thread that reads [`wake_seq`] before it judges whether
/// to sleep longer and passes that count to [`sleep`] misses no signal: one that came after the
/// read ends the sleep at once, even if it came before the sleeper marked its sleep stretched.
#[inline]
pub fn nudge() {
    SEQ.fetch_add(1, Ordering::Release);
    if STRETCHED.load(Ordering::Relaxed) && STRETCHED.swap(false, Ordering::AcqRel) {
        wake();
    }
}

/// Marks a stretched sleep without arming the marks, for a governor the allocator does not
/// charge (a standalone one): [`nudge`] wakes it.
pub fn stretch() {
    STRETCHED.store(true, Ordering::Release);
}

/// Arms the marks for a stretched sleep (the installed governor's: the marks are the
/// process's): a charge of `engine`'s home slot reaching `home[engine]`, or of its overflow
/// slot reaching `overflow[engine]`, wakes the sleepers. Returns `false`, and wakes nobody,
/// when a slot is already at its mark (a charge came between the caller's look and now): the
/// caller should not sleep.
///
/// The marks are stored, and the charges then read, in one total order with every charge (its
/// read-modify-write and its read of the mark are sequentially consistent): a charge either
/// sees its mark or is seen here.
///
/// `charged` reads a slot's ledger in that order (the ledger's `charged_seq_cst`; a parameter
/// so that this module, which the ledger calls on every charge, needs nothing of the ledger).
pub(crate) fn arm(
    home: &[u64; EngineId::COUNT],
    overflow: &[u64; EngineId::COUNT],
    charged: impl Fn(Slot) -> u64,
) -> bool {
    let slots = || {
        EngineId::ALL.into_iter().flat_map(|e| {
            let slot = Slot::of(e);
            let o = slot.overflow().map(|o| (o, overflow[e.index()]));
            std::iter::once((slot, home[e.index()])).chain(o)
        })
    };
    for (slot, mark) in slots() {
        MARK[slot.index()].store(mark, Ordering::SeqCst);
    }
    STRETCHED.store(true, Ordering::SeqCst);
    if slots().any(|(slot, mark)| charged(slot) >= mark) {
        disarm();
        return false;
    }
    true
}

/// Ends a stretched sleep's arrangements: no mark armed, no nudge owed a wake.
fn disarm() {
    STRETCHED.store(false, Ordering::Relaxed);
    for m in &MARK {
        m.store(u64::MAX, Ordering::Relaxed);
    }
}

/// After a charge brought `slot` to `now`: wakes the sleepers at its mark.
#[inline(always)]
pub(crate) fn check(slot: Slot, now: u64) {
    if let Some(m) = MARK.get(slot.index())
        && now >= m.load(Ordering::SeqCst)
    {
        wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wake_ends_a_sleep_a_stale_count_does_not_sleep_and_a_nudge_needs_a_stretch() {
        let seen = wake_seq();
        let t = std::thread::spawn(move || sleep(seen, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        wake();
        assert!(t.join().unwrap(), "woken, not timed out");
        // A wake between reading the count and sleeping is not lost.
        assert!(sleep(seen, Duration::from_secs(30)));
        // Nothing to wake for: the timeout.
        assert!(!sleep(wake_seq(), Duration::from_millis(1)));

        // A nudge wakes only a stretched sleeper (one test: the words are the process's).
        let seen = wake_seq();
        nudge();
        assert_eq!(wake_seq(), seen + 1, "counted");
        assert!(
            sleep(seen, Duration::from_secs(30)),
            "a sleep from before it ends at once"
        );
        assert!(arm(
            &[u64::MAX; EngineId::COUNT],
            &[u64::MAX; EngineId::COUNT],
            |_| 0,
        ));
        let before = wake_seq();
        nudge();
        assert_eq!(wake_seq(), before + 2, "counted, and a wake");
        // Later signals are counted, without a system call until the next stretched sleep.
        let again = wake_seq();
        nudge();
        assert_eq!(wake_seq(), again + 1);
        assert!(!STRETCHED.load(Ordering::Relaxed));
    }
}
