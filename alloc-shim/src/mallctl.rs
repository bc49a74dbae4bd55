//! Every `mallctl` the allocator makes, in one place.
//!
//! jemalloc's controls take untyped buffers: the value's C type is fixed by the control's name
//! (jemalloc's manual, "MALLCTL NAMESPACE"). The typed helpers here pass one value of the type
//! the caller names and its exact size, so the only thing a caller has to get right is that
//! type — which is what each `unsafe` call's `# Safety` asks. Nothing here panics or allocates
//! through the global allocator; failures come back as jemalloc's error codes. Controls used
//! on a thread's own path (rebinding its arena, flushing its cache) and per-arena statistics
//! are resolved to MIBs once ([`Mib`]); per-arena names are built on the stack
//! ([`arena_name`]).

use std::ffi::{CStr, c_uint, c_void};
use std::mem::size_of;
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};

use tikv_jemalloc_sys as jem;

/// Runs a control that takes and returns nothing (`arena.<i>.purge`, `thread.tcache.flush`).
/// With no buffers jemalloc dereferences nothing of ours, whatever the name, so this is safe.
pub(crate) fn run(name: &CStr) -> bool {
    // SAFETY: a NUL-terminated name and no buffers: jemalloc reads and writes nothing of ours.
    unsafe {
        jem::mallctl(
            name.as_ptr(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::null_mut(),
            0,
        ) == 0
    }
}

/// jemalloc's answer for an output buffer of `R`: the value written, or the error (a size other
/// than `R`'s is `EINVAL`, as jemalloc itself reports it).
///
/// # Safety
/// `value` is the buffer jemalloc was given, with `len` its size on return, and jemalloc
/// returned `rc`.
unsafe fn answer<R: Copy>(
    rc: std::ffi::c_int,
    len: usize,
    value: std::mem::MaybeUninit<R>,
) -> Result<R, i32> {
    if rc != 0 {
        return Err(rc);
    }
    if len != size_of::<R>() {
        return Err(libc::EINVAL);
    }
    // SAFETY: success, and `len == size_of::<R>()` bytes of an `R` were written.
    Ok(unsafe { value.assume_init() })
}

/// Reads control `name` as a `T`.
///
/// # Safety
/// `T` is the C type jemalloc documents for `name`'s value (a plain value: an integer, a
/// pointer, a `repr(C)` struct), so jemalloc writes exactly `size_of::<T>()` bytes.
pub(crate) unsafe fn read<T: Copy>(name: &CStr) -> Result<T, i32> {
    let mut value = std::mem::MaybeUninit::<T>::uninit();
    let mut len = size_of::<T>();
    // SAFETY: `value` is a buffer of `len` bytes, the size of the control's type (the caller's
    // contract); the name is NUL-terminated.
    let rc = unsafe {
        jem::mallctl(
            name.as_ptr(),
            value.as_mut_ptr().cast::<c_void>(),
            &mut len,
            ptr::null_mut(),
            0,
        )
    };
    // SAFETY: `value` was the buffer, `len` its size on return.
    unsafe { answer(rc, len, value) }
}

/// Writes `value` to control `name`.
///
/// # Safety
/// `T` is the C type jemalloc documents for `name`'s new value; if that type holds pointers,
/// what they point at stays valid as long as jemalloc may use it (for extent hooks and
/// callbacks: the life of the process).
pub(crate) unsafe fn write<T>(name: &CStr, mut value: T) -> Result<(), i32> {
    // SAFETY: `value` is a `T` of `size_of::<T>()` bytes, the control's type (the caller's
    // contract); no output buffer.
    let rc = unsafe {
        jem::mallctl(
            name.as_ptr(),
            ptr::null_mut(),
            ptr::null_mut(),
            ptr::from_mut(&mut value).cast::<c_void>(),
            size_of::<T>(),
        )
    };
    if rc == 0 { Ok(()) } else { Err(rc) }
}

/// Writes `new` to control `name` and reads its result as an `R` (`arenas.create`: hooks in,
/// the new arena's index out).
///
/// # Safety
/// As for [`read`] with `R` and [`write`] with `W`.
pub(crate) unsafe fn write_read<W, R: Copy>(name: &CStr, mut new: W) -> Result<R, i32> {
    let mut value = std::mem::MaybeUninit::<R>::uninit();
    let mut len = size_of::<R>();
    // SAFETY: both buffers have the sizes of the control's types (the caller's contract).
    let rc = unsafe {
        jem::mallctl(
            name.as_ptr(),
            value.as_mut_ptr().cast::<c_void>(),
            &mut len,
            ptr::from_mut(&mut new).cast::<c_void>(),
            size_of::<W>(),
        )
    };
    // SAFETY: `value` was the buffer, `len` its size on return.
    unsafe { answer(rc, len, value) }
}

/// A control's name resolved to a MIB (`mallctlnametomib`) the first time it is used, so later
/// calls skip the name lookup. `N` is the name's number of components. Element `index` (if
/// any) may be replaced per call, for per-arena controls (`stats.arenas.<i>.resident`).
#[derive(Debug)]
pub(crate) struct Mib<const N: usize> {
    name: &'static CStr,
    /// The resolved components; `parts[0] == usize::MAX` until resolved.
    parts: [AtomicUsize; N],
}

impl<const N: usize> Mib<N> {
    pub(crate) const fn new(name: &'static CStr) -> Mib<N> {
        Mib {
            name,
            parts: [const { AtomicUsize::new(usize::MAX) }; N],
        }
    }

    /// The MIB, resolving it on first use; `None` if jemalloc does not know the name (or it
    /// has another number of components).
    fn get(&self) -> Option<[usize; N]> {
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
        self.get().is_some()
    }

    /// Runs the control with no buffers (see [`run`]).
    pub(crate) fn run(&self) -> bool {
        let Some(mib) = self.get() else {
            return false;
        };
        // SAFETY: a MIB jemalloc produced, and no buffers.
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

    /// Reads the control as an `R`, with component `index` set to `at` (`None`: as resolved).
    ///
    /// # Safety
    /// As for [`read`].
    pub(crate) unsafe fn read_at<R: Copy>(&self, at: Option<(usize, usize)>) -> Result<R, i32> {
        let Some(mut mib) = self.get() else {
            return Err(libc::ENOENT);
        };
        if let Some((index, value)) = at
            && let Some(slot) = mib.get_mut(index)
        {
            *slot = value;
        }
        let mut value = std::mem::MaybeUninit::<R>::uninit();
        let mut len = size_of::<R>();
        // SAFETY: a MIB jemalloc produced; the buffer has the control's size (the caller's
        // contract).
        let rc = unsafe {
            jem::mallctlbymib(
                mib.as_ptr(),
                N,
                value.as_mut_ptr().cast::<c_void>(),
                &mut len,
                ptr::null_mut(),
                0,
            )
        };
        // SAFETY: `value` was the buffer, `len` its size on return.
        unsafe { answer(rc, len, value) }
    }

    /// Writes `new` and reads the previous value, both `T` (`thread.arena`).
    ///
    /// # Safety
    /// As for [`read`] and [`write`] with `T`.
    pub(crate) unsafe fn swap<T: Copy>(&self, mut new: T) -> Result<T, i32> {
        let Some(mib) = self.get() else {
            return Err(libc::ENOENT);
        };
        let mut old = std::mem::MaybeUninit::<T>::uninit();
        let mut len = size_of::<T>();
        // SAFETY: a MIB jemalloc produced; both buffers have the control's size (the caller's
        // contract).
        let rc = unsafe {
            jem::mallctlbymib(
                mib.as_ptr(),
                N,
                old.as_mut_ptr().cast::<c_void>(),
                &mut len,
                ptr::from_mut(&mut new).cast::<c_void>(),
                size_of::<T>(),
            )
        };
        // SAFETY: `old` was the buffer, `len` its size on return.
        unsafe { answer(rc, len, old) }
    }
}

/// `arena.<arena><suffix>` as a NUL-terminated name on the stack (`suffix` at most 36 bytes:
/// 6 + 10 digits + 36 < 64 leaves the terminating zero).
pub(crate) struct ArenaName([u8; 64]);

impl ArenaName {
    /// The name, as jemalloc takes it.
    pub(crate) fn as_cstr(&self) -> &CStr {
        // The buffer ends in zeros (see `arena_name`), so a terminator always exists.
        CStr::from_bytes_until_nul(&self.0).unwrap_or(c"")
    }
}

/// The name of `arena`'s control `suffix` (`b".purge"`).
pub(crate) fn arena_name(arena: c_uint, suffix: &[u8]) -> ArenaName {
    let mut name = [0u8; 64];
    let prefix = b"arena.";
    name[..prefix.len()].copy_from_slice(prefix);
    let mut at = prefix.len();
    let mut digits = [0u8; 10];
    let (mut n, mut len) = (arena, 0);
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in digits[..len].iter().rev() {
        name[at] = *d;
        at += 1;
    }
    let suffix = &suffix[..suffix.len().min(36)];
    name[at..at + suffix.len()].copy_from_slice(suffix);
    ArenaName(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arena_names_are_built_on_the_stack() {
        assert_eq!(arena_name(0, b".purge").as_cstr(), c"arena.0.purge");
        assert_eq!(
            arena_name(4096, b".retain_grow_limit").as_cstr(),
            c"arena.4096.retain_grow_limit"
        );
        assert_eq!(arena_name(u32::MAX, b"").as_cstr(), c"arena.4294967295");
    }

    #[test]
    fn typed_reads_and_unknown_names() {
        // SAFETY: `arenas.narenas` is an `unsigned`.
        let n: c_uint = unsafe { read(c"arenas.narenas") }.unwrap();
        assert!(n >= 1);
        // SAFETY: no such control: jemalloc writes nothing.
        let missing = unsafe { read::<c_uint>(c"arenas.no_such_control") };
        assert_eq!(missing, Err(libc::ENOENT));
        let mib = Mib::<2>::new(c"arenas.narenas");
        // SAFETY: as above.
        assert_eq!(unsafe { mib.read_at::<c_uint>(None) }, Ok(n));
        assert!(!Mib::<3>::new(c"arenas.narenas").resolve(), "wrong length");
        assert!(!run(c"no.such.control"));
    }
}
