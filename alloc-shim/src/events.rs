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

use crate::ledger::INTERVAL;
use crate::mallctl;
use crate::thread::THREAD;

/// jemalloc's `user_hook_object_t` (`include/jemalloc/internal/thread_event_registry.h`).
#[repr(C)]
struct UserHook {
    callback: unsafe extern "C" fn(is_alloc: bool, allocated: u64, deallocated: u64),
    interval: u64,
    is_alloc_only: bool,
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
    let hook = UserHook {
        callback: on_thread_event,
        interval: INTERVAL,
        is_alloc_only: false,
    };
    // SAFETY: `experimental.hooks.thread_event` takes one `user_hook_object_t` (our `repr(C)`
    // copy). The callback is a plain function, valid for the life of the process, that neither
    // allocates nor unwinds.
    let rc = match unsafe { mallctl::write(c"experimental.hooks.thread_event", hook) } {
        Ok(()) => 0,
        Err(rc) => rc,
    };
    let state = if rc == 0 { ACTIVE } else { FAILED };
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

/// jemalloc calls this on a thread whose allocated (or deallocated) bytes grew by
/// [`INTERVAL`] since the last call; it runs inside jemalloc with its reentrancy guard raised,
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
