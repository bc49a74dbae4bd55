//! jemalloc's own per-thread byte counters and its thread-event hook: how the home path costs
//! nothing of ours.
//!
//! jemalloc counts, for every thread, the usable bytes it has allocated and deallocated
//! (`thread.allocatedp` / `thread.deallocatedp` point at the two counters), on its fast path
//! anyway. Its `experimental.hooks.thread_event` control registers a process-wide callback
//! that jemalloc calls on a thread each time that thread's allocated (or deallocated) bytes
//! have grown by the hook's interval since the previous call. The home path therefore leaves
//! all counting to jemalloc; the callback settles the thread's home delta into the ledger
//! (see `settle.rs`).
//!
//! The control is experimental: it is looked up once, and where registering fails every
//! thread keeps checking its counters itself on a slower path (see `settle.rs`), with the
//! same bounds.

use std::sync::atomic::{AtomicU8, Ordering};

use super::{ThreadState, with};
use crate::accounting::bound::inflight_bound;
use crate::sys::mallctl::{ThreadEventCallback, UserHook, keys};

/// Registers `callback` with `experimental.hooks.thread_event`, called on a thread each time
/// its allocated or deallocated bytes grow by `interval`. Returns jemalloc's error code where
/// it refuses (`ENOENT` where this jemalloc lacks the control).
///
/// The governed allocator registers its own once ([`thread_events_active`]); this is public
/// for the hot-path benchmark, which registers one that does nothing under plain jemalloc to
/// measure jemalloc's event machinery alone.
///
/// # Safety
/// `callback` is called inside jemalloc with its reentrancy guard raised, on any thread, for
/// the rest of the process: it must not allocate, lock anything an allocation may hold, or
/// unwind. (jemalloc copies the hook object during the call.)
#[doc(hidden)]
pub unsafe fn register_thread_event_hook(
    callback: ThreadEventCallback,
    interval: u64,
) -> Result<(), i32> {
    keys::HOOKS_THREAD_EVENT.write(UserHook {
        callback,
        interval,
        is_alloc_only: false,
    })
}

const UNTRIED: u8 = 0;
const TRYING: u8 = 1;
const ACTIVE: u8 = 2;
const FAILED: u8 = 3;
static HOOK: AtomicU8 = AtomicU8::new(UNTRIED);

/// Registers the thread-event hook, once per process. Returns whether it is registered.
/// Concurrent first callers do not wait: a thread that finds registration under way runs on
/// the checked path until its next look.
pub(crate) fn ensure_hook() -> bool {
    match HOOK.load(Ordering::Acquire) {
        ACTIVE => return true,
        UNTRIED => {}
        _ => return false,
    }
    if HOOK
        .compare_exchange(UNTRIED, TRYING, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return HOOK.load(Ordering::Acquire) == ACTIVE;
    }
    // The bound is fixed here, before any thread holds headroom under it.
    let interval = inflight_bound().interval;
    // SAFETY: `on_thread_event` reaches only this thread's own state through `try_with`; it
    // neither allocates, locks nor unwinds.
    let registered = unsafe { register_thread_event_hook(on_thread_event, interval) }.is_ok();
    let state = if registered { ACTIVE } else { FAILED };
    HOOK.store(state, Ordering::Release);
    state == ACTIVE
}

/// Whether jemalloc's thread-event hook is registered in this process (so threads leave the
/// home path's counting to jemalloc). `false` before the first allocation that needed it, and
/// where this jemalloc lacks the experimental control: threads then check their counters on
/// a slower path, with the same bounds.
pub fn thread_events_active() -> bool {
    HOOK.load(Ordering::Acquire) == ACTIVE
}

/// jemalloc calls this on a thread whose allocated (or deallocated) bytes grew by the bound's
/// interval ([`Bound::interval`](crate::ctl::ledger::Bound::interval)) since the last call; it runs inside jemalloc with its reentrancy guard raised,
/// so it must not allocate (nothing it reaches does) and cannot unwind (nothing it reaches
/// panics).
///
/// # Safety
/// Called by jemalloc only, on the thread the event is for; it has no preconditions of its
/// own (it reaches nothing but that thread's state).
unsafe extern "C" fn on_thread_event(is_alloc: bool, allocated: u64, _deallocated: u64) {
    let _ = with(|t: &ThreadState| {
        t.on_event(is_alloc);
        if is_alloc && !t.is_detached() {
            t.sample_tick(allocated);
        }
    });
}

/// Where jemalloc keeps the calling thread's allocated and deallocated byte counters, or
/// `None` if this jemalloc cannot say. The pointers stay valid for the thread's life.
pub(crate) fn thread_counters() -> Option<(*const u64, *const u64)> {
    let read = |key: &crate::sys::mallctl::Ctl<*mut u64, (), 2>| {
        let p = key.read().ok()?;
        (!p.is_null()).then_some(p.cast_const())
    };
    Some((
        read(&keys::THREAD_ALLOCATEDP)?,
        read(&keys::THREAD_DEALLOCATEDP)?,
    ))
}
