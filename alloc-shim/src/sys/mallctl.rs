//! Every `mallctl` the allocator makes, each key declared once with its C types ([`keys`]).
//!
//! jemalloc's controls take untyped buffers: the value's C type is fixed by the control's name
//! (jemalloc's manual, "MALLCTL NAMESPACE"). A [`Ctl`] names a control together with the type
//! it reads (`R`) and the type it writes (`W`), `()` where it takes or gives nothing; declaring
//! one is the only `unsafe` step ([`Ctl::declare`]), and every call through it passes buffers
//! of exactly those types. Names resolve to MIBs once (`mallctlnametomib`); a per-arena control
//! (`arena.<i>.purge`, `stats.arenas.<i>.resident`) is declared with arena 0 and called with
//! the arena replaced in its MIB ([`Ctl::at`]), so no name is built at run time. Nothing here
//! panics or allocates through the global allocator; failures come back as jemalloc's error
//! codes.

use std::ffi::{CStr, c_uint, c_void};
use std::marker::PhantomData;
use std::mem::{MaybeUninit, size_of};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tikv_jemalloc_sys::{self as jem, extent_hooks_t};

/// `MALLCTL_ARENAS_ALL`: the arena index that stands for every arena (merged statistics, a
/// purge of all of them).
pub(crate) const ALL_ARENAS: c_uint = 4096;

/// A control whose value reads as `R` and is written as `W` (`()`: none), with `N` components
/// in its name, resolved to a MIB on first use.
#[derive(Debug)]
pub(crate) struct Ctl<R, W, const N: usize> {
    name: &'static CStr,
    /// The resolved components; `parts[0] == usize::MAX` until resolved.
    parts: [AtomicUsize; N],
    _types: PhantomData<fn(W) -> R>,
}

impl<R, W, const N: usize> Ctl<R, W, N> {
    /// Declares control `name` with its types.
    ///
    /// # Safety
    /// `R` is the C type jemalloc documents for reading `name` and `W` the one for writing it
    /// (`()` where the control reads or writes nothing), both plain values (integers, pointers,
    /// `repr(C)` structs); if `W` holds pointers, what they point at stays valid as long as
    /// jemalloc may use it (extent hooks and callbacks: the life of the process).
    pub(crate) const unsafe fn declare(name: &'static CStr) -> Ctl<R, W, N> {
        Ctl {
            name,
            parts: [const { AtomicUsize::new(usize::MAX) }; N],
            _types: PhantomData,
        }
    }

    /// The MIB, resolving it on first use; `None` if jemalloc does not know the name (or it
    /// has another number of components).
    fn mib(&self) -> Option<[usize; N]> {
        let first = self.parts[0].load(Ordering::Acquire);
        if first != usize::MAX {
            let mut mib = [0usize; N];
            for (m, p) in mib.iter_mut().zip(&self.parts) {
                *m = p.load(Ordering::Relaxed);
            }
            mib[0] = first;
            return Some(mib);
        }
        let mut mib = [0usize; N];
        let mut len = N;
        // SAFETY: `mib` has room for `len` components; jemalloc writes at most that many and
        // stores the count in `len`; the name is NUL-terminated.
        let rc = unsafe { jem::mallctlnametomib(self.name.as_ptr(), mib.as_mut_ptr(), &mut len) };
        if rc != 0 || len != N {
            return None;
        }
        // Racing resolvers store the same values; the first component goes last (Release), so
        // a reader that sees it resolved sees the rest.
        for (p, m) in self.parts.iter().zip(mib).skip(1) {
            p.store(m, Ordering::Relaxed);
        }
        self.parts[0].store(mib[0], Ordering::Release);
        Some(mib)
    }

    /// Whether the name resolves.
    pub(crate) fn resolve(&self) -> bool {
        self.mib().is_some()
    }

    /// This per-arena control for `arena` (component `index` of the name replaced).
    pub(crate) fn at(&self, index: usize, arena: c_uint) -> At<'_, R, W, N> {
        At {
            ctl: self,
            replace: Some((index, arena as usize)),
        }
    }

    fn whole(&self) -> At<'_, R, W, N> {
        At {
            ctl: self,
            replace: None,
        }
    }

    /// Reads the control.
    pub(crate) fn read(&self) -> Result<R, i32>
    where
        R: Copy,
    {
        self.whole().read()
    }

    /// Writes the control.
    pub(crate) fn write(&self, new: W) -> Result<(), i32> {
        self.whole().write(new)
    }

    /// Writes the control and reads its result (`thread.arena`: the old arena; `arenas.create`:
    /// the new one).
    pub(crate) fn write_read(&self, new: W) -> Result<R, i32>
    where
        R: Copy,
    {
        self.whole().call(Some(new))
    }

    /// Runs a control that reads and writes nothing; whether jemalloc accepted it.
    pub(crate) fn run(&self) -> bool {
        self.whole().run()
    }
}

/// A control with one component of its MIB replaced (see [`Ctl::at`]).
pub(crate) struct At<'a, R, W, const N: usize> {
    ctl: &'a Ctl<R, W, N>,
    replace: Option<(usize, usize)>,
}

impl<R, W, const N: usize> At<'_, R, W, N> {
    fn mib(&self) -> Option<[usize; N]> {
        let mut mib = self.ctl.mib()?;
        if let Some((index, value)) = self.replace
            && let Some(slot) = mib.get_mut(index)
        {
            *slot = value;
        }
        Some(mib)
    }

    /// Reads the control (as [`Ctl::read`]).
    pub(crate) fn read(&self) -> Result<R, i32>
    where
        R: Copy,
    {
        self.call(None)
    }

    /// Writes the control (as [`Ctl::write`]).
    pub(crate) fn write(&self, new: W) -> Result<(), i32> {
        let Some(mib) = self.mib() else {
            return Err(libc::ENOENT);
        };
        let mut new = new;
        // SAFETY: a MIB jemalloc produced; `new` is a `W` of `size_of::<W>()` bytes, the
        // control's type (the declaration's contract); no output buffer.
        let rc = unsafe {
            jem::mallctlbymib(
                mib.as_ptr(),
                N,
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::from_mut(&mut new).cast::<c_void>(),
                size_of::<W>(),
            )
        };
        if rc == 0 { Ok(()) } else { Err(rc) }
    }

    /// Runs the control with no buffers (as [`Ctl::run`]).
    pub(crate) fn run(&self) -> bool {
        let Some(mib) = self.mib() else {
            return false;
        };
        // SAFETY: a MIB jemalloc produced, and no buffers: jemalloc reads and writes nothing
        // of ours.
        unsafe {
            jem::mallctlbymib(
                mib.as_ptr(),
                N,
                ptr::null_mut(),
                ptr::null_mut(),
                ptr::null_mut(),
                0,
            ) == 0
        }
    }

    /// Reads an `R`, writing `new` first if given.
    fn call(&self, new: Option<W>) -> Result<R, i32>
    where
        R: Copy,
    {
        let Some(mib) = self.mib() else {
            return Err(libc::ENOENT);
        };
        let mut value = MaybeUninit::<R>::uninit();
        let mut len = size_of::<R>();
        let mut new = new;
        let (newp, newlen) = match new.as_mut() {
            Some(w) => (ptr::from_mut(w).cast::<c_void>(), size_of::<W>()),
            None => (ptr::null_mut(), 0),
        };
        // SAFETY: a MIB jemalloc produced; `value` is a buffer of `len` bytes, the size of the
        // control's read type, and `newp` (if any) a `W` of `newlen` bytes, its write type
        // (the declaration's contract).
        let rc = unsafe {
            jem::mallctlbymib(
                mib.as_ptr(),
                N,
                value.as_mut_ptr().cast::<c_void>(),
                &mut len,
                newp,
                newlen,
            )
        };
        if rc != 0 {
            return Err(rc);
        }
        if len != size_of::<R>() {
            return Err(libc::EINVAL);
        }
        // SAFETY: success, and `len == size_of::<R>()` bytes of an `R` were written.
        Ok(unsafe { value.assume_init() })
    }
}

/// A thread-event callback: whether the event is an allocation one, then the thread's
/// allocated and deallocated byte counters.
pub type ThreadEventCallback =
    unsafe extern "C" fn(is_alloc: bool, allocated: u64, deallocated: u64);

/// jemalloc's `user_hook_object_t` (`include/jemalloc/internal/thread_event_registry.h`).
#[repr(C)]
pub(crate) struct UserHook {
    pub(crate) callback: ThreadEventCallback,
    pub(crate) interval: u64,
    pub(crate) is_alloc_only: bool,
}

/// jemalloc's `arena_config_t` (`include/jemalloc/internal/arena_types.h`), the value of
/// `experimental.arenas_create_ext`.
#[repr(C)]
pub(crate) struct ArenaConfig {
    pub(crate) extent_hooks: *mut extent_hooks_t,
    pub(crate) metadata_use_hooks: bool,
}

/// Every control the allocator uses, with its types from jemalloc's manual.
pub(crate) mod keys {
    use std::ffi::c_uint;

    use super::{ArenaConfig, Ctl, UserHook};
    use tikv_jemalloc_sys::extent_hooks_t;

    /// The index in a per-arena control's MIB that is the arena (`arena.<i>.purge`).
    pub(crate) const ARENA_PART: usize = 1;
    /// The same in `stats.arenas.<i>.*`.
    pub(crate) const STATS_ARENA_PART: usize = 2;

    /// Declares a control with its types (see [`Ctl::declare`]).
    macro_rules! key {
        ($(#[$doc:meta])* $name:ident: $r:ty, $w:ty, $n:literal = $key:literal) => {
            $(#[$doc])*
            pub(crate) static $name: Ctl<$r, $w, $n> =
                // SAFETY: the types are those jemalloc 5.3's manual gives the control, `()`
                // where it reads or writes nothing; the hooks and callbacks written through
                // them are statics and functions, valid for the life of the process.
                unsafe { Ctl::declare($key) };
        };
    }

    key! {
        /// `unsigned`, read and written: the calling thread's arena.
        THREAD_ARENA: c_uint, c_uint, 2 = c"thread.arena"
    }
    key! {
        /// Flushes the calling thread's cache.
        THREAD_TCACHE_FLUSH: (), (), 3 = c"thread.tcache.flush"
    }
    key! {
        /// `uint64_t *`: where jemalloc counts the calling thread's allocated bytes.
        THREAD_ALLOCATEDP: *mut u64, (), 2 = c"thread.allocatedp"
    }
    key! {
        /// `uint64_t *`: the same for its deallocated bytes.
        THREAD_DEALLOCATEDP: *mut u64, (), 2 = c"thread.deallocatedp"
    }
    key! {
        /// `unsigned`: a new explicit thread cache.
        TCACHE_CREATE: c_uint, (), 2 = c"tcache.create"
    }
    key! {
        /// `unsigned` written: destroys that explicit cache.
        TCACHE_DESTROY: (), c_uint, 2 = c"tcache.destroy"
    }
    key! {
        /// `user_hook_object_t` written: registers a thread-event hook.
        HOOKS_THREAD_EVENT: (), UserHook, 3 = c"experimental.hooks.thread_event"
    }
    key! {
        /// `arena_config_t` in, `unsigned` out: a new arena with its own extent hooks.
        ARENAS_CREATE_EXT: c_uint, ArenaConfig, 2 = c"experimental.arenas_create_ext"
    }
    key! {
        /// `extent_hooks_t *` in, `unsigned` out: the same where the above is missing.
        ARENAS_CREATE: c_uint, *mut extent_hooks_t, 2 = c"arenas.create"
    }
    key! {
        /// Purges arena `<i>` (per arena, [`ARENA_PART`]; `ALL_ARENAS` for every one).
        ARENA_PURGE: (), (), 3 = c"arena.0.purge"
    }
    key! {
        /// `size_t` written: the most arena `<i>` grows its retained memory by at once.
        ARENA_RETAIN_GROW_LIMIT: (), usize, 3 = c"arena.0.retain_grow_limit"
    }
    key! {
        /// `uint64_t` written: refreshes the statistics.
        EPOCH: (), u64, 1 = c"epoch"
    }
    key! {
        /// `size_t`: bytes in physically resident pages jemalloc holds.
        STATS_RESIDENT: usize, (), 2 = c"stats.resident"
    }
    key! {
        /// `size_t`, per arena ([`STATS_ARENA_PART`]): resident bytes.
        STATS_ARENA_RESIDENT: usize, (), 4 = c"stats.arenas.0.resident"
    }
    key! {
        /// `size_t`, per arena: pages in active extents.
        STATS_ARENA_PACTIVE: usize, (), 4 = c"stats.arenas.0.pactive"
    }
    key! {
        /// `size_t`, per arena: dirty pages.
        STATS_ARENA_PDIRTY: usize, (), 4 = c"stats.arenas.0.pdirty"
    }
    key! {
        /// `size_t`, per arena: mapped bytes.
        STATS_ARENA_MAPPED: usize, (), 4 = c"stats.arenas.0.mapped"
    }
}

#[cfg(test)]
mod tests {
    use super::keys::*;
    use super::*;

    #[test]
    fn typed_reads_unknown_names_and_per_arena_controls() {
        // SAFETY: `arenas.narenas` reads an `unsigned`.
        let narenas = unsafe { Ctl::<c_uint, (), 2>::declare(c"arenas.narenas") };
        let n = narenas.read().unwrap();
        assert!(n >= 1);
        // SAFETY: no such control: jemalloc writes nothing.
        let missing = unsafe { Ctl::<c_uint, (), 2>::declare(c"arenas.no_such_control") };
        assert_eq!(missing.read(), Err(libc::ENOENT));
        // SAFETY: as above: the wrong number of components never resolves.
        let wrong = unsafe { Ctl::<c_uint, (), 3>::declare(c"arenas.narenas") };
        assert!(!wrong.resolve(), "wrong length");
        // SAFETY: as above.
        let unknown = unsafe { Ctl::<(), (), 3>::declare(c"no.such.control") };
        assert!(!unknown.run());
        assert!(ARENA_PURGE.at(ARENA_PART, 0).run());
        assert!(!ARENA_PURGE.at(ARENA_PART, n + 100).run(), "no such arena");
        assert!(EPOCH.write(1).is_ok());
        assert!(
            STATS_ARENA_MAPPED
                .at(STATS_ARENA_PART, ALL_ARENAS)
                .read()
                .unwrap()
                > 0
        );
    }
}
