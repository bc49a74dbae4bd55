//! jemalloc's own per-thread byte counters and its thread-event hook: how the home path costs
//! nothing of ours.
//!
//! jemalloc counts, for every thread, the usable bytes it has allocated and deallocated
//! (`thread.allocatedp` / `thread.deallocatedp` point at the two counters), on its fast path
//! anyway. Its `experimental.hooks.thread_event` control registers a process-wide callback
//! that jemalloc calls on a thread each time that thread's allocated (or deallocated) bytes
//! have grown by the hook's interval since the previous call. The home path therefore leaves
//! all counting to jemalloc; the callback settles the thread's home delta into the ledger
//! (see `ThreadState::settle`).
//!
//! The control is experimental: it is looked up once, and where registering fails every
//! thread keeps checking its counters itself on a slower path (see `thread.rs`), with the
//! same bounds.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::mallctl;
use crate::thread::THREAD;

/// A thread-event callback: whether the event is an allocation one, then the thread's
/// allocated and deallocated byte counters.
pub type ThreadEventCallback =
    unsafe extern "C" fn(is_alloc: bool, allocated: u64, deallocated: u64);

/// jemalloc's `user_hook_object_t` (`include/jemalloc/internal/thread_event_registry.h`).
#[repr(C)]
struct UserHook {
    callback: ThreadEventCallback,
    interval: u64,
    is_alloc_only: bool,
}

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
/// unwind.
#[doc(hidden)]
pub unsafe fn register_thread_event_hook(
    callback: ThreadEventCallback,
    interval: u64,
) -> Result<(), i32> {
    let hook = UserHook {
        callback,
        interval,
        is_alloc_only: false,
    };
    // SAFETY: `experimental.hooks.thread_event` takes one `user_hook_object_t` (our `repr(C)`
    // copy, read during the call). The callback is a function, valid for the life of the
    // process, that neither allocates nor unwinds (the caller's contract).
    unsafe { mallctl::write(c"experimental.hooks.thread_event", hook) }
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
    let interval = crate::ledger::inflight_bound().interval;
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
/// interval ([`Bound::interval`](crate::Bound::interval)) since the last call; it runs inside jemalloc with its reentrancy guard raised,
/// so it must not allocate (nothing it reaches does) and cannot unwind (nothing it reaches
/// panics).
unsafe extern "C" fn on_thread_event(is_alloc: bool, _allocated: u64, _deallocated: u64) {
    let _ = THREAD.try_with(|t| t.on_event(is_alloc));
}

/// Where jemalloc keeps the calling thread's allocated and deallocated byte counters, or
/// `None` if this jemalloc cannot say. The pointers stay valid for the thread's life.
pub(crate) fn thread_counters() -> Option<(*const u64, *const u64)> {
    fn read(name: &std::ffi::CStr) -> Option<*const u64> {
        // SAFETY: `thread.allocatedp` and `thread.deallocatedp` are `uint64_t *`.
        let p = unsafe { mallctl::read::<*mut u64>(name) }.ok()?;
        (!p.is_null()).then_some(p.cast_const())
    }
    Some((read(c"thread.allocatedp")?, read(c"thread.deallocatedp")?))
}
