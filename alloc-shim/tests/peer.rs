//! The allocator tests of tikv-jemallocator 0.7 (`tests/smoke.rs`, `grow_in_place.rs`,
//! `shrink_in_place.rs`, `usable_size.rs`) and the over-alignment checks of std's allocator
//! tests, ported to `GovernedAlloc` and run both inside an engine guard and outside any, with
//! the per-engine counts checked after each. This binary installs `GovernedAlloc`.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::Mutex;

use nodedb_mem_alloc::{
    EngineGuard, EngineId, GovernedAlloc, ctl::arenas::owner, ctl::ledger::charged,
    ctl::thread::flush_thread,
};

#[global_allocator]
static A: GovernedAlloc = GovernedAlloc::new();

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `body` outside any guard and then inside each engine's, and checks after each run that
/// every engine's ledger is back where it was and the blocks were the expected engine's.
fn everywhere(body: impl Fn(EngineId)) {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    for engine in [
        EngineId::Unattributed,
        EngineId::Query,
        EngineId::Vector,
        EngineId::Crdt,
    ] {
        flush_thread();
        let before = EngineId::ALL.map(charged);
        {
            let _g = (engine != EngineId::Unattributed).then(|| EngineGuard::enter(engine));
            body(engine);
        }
        flush_thread();
        assert_eq!(EngineId::ALL.map(charged), before, "under {engine}");
    }
}

/// `jemalloc`'s size class of `size` bytes (what the ledger charges).
fn size_class(size: usize) -> usize {
    // SAFETY: nallocx has no preconditions for a non-zero size and no flags.
    unsafe { tikv_jemalloc_sys::nallocx(size, 0) }
}

#[test]
fn smoke() {
    everywhere(|e| {
        let mut a = Vec::new();
        a.push(3);
        a.reserve(1);
        a.push(4);
        assert_eq!(owner(a.as_ptr().cast()), e);
        flush_thread();
    });
}

#[test]
fn overaligned() {
    everywhere(|e| {
        let (size, align, iterations) = (8, 16, 100);
        let layout = Layout::from_size_align(size, align).unwrap();
        flush_thread();
        let before = charged(e);
        // SAFETY: non-zero size; every pointer is freed below with the same layout.
        let pointers: Vec<*mut u8> = (0..iterations)
            .map(|_| unsafe { A.alloc(layout) })
            .collect();
        for &ptr in &pointers {
            assert!(!ptr.is_null());
            assert_eq!(
                ptr as usize % align,
                0,
                "Got a pointer less aligned than requested"
            );
            assert_eq!(owner(ptr), e);
        }
        flush_thread();
        // The outer Vec is the engine's too.
        let outer = size_class(iterations * size_of::<*mut u8>());
        assert_eq!(charged(e) - before, (iterations * 16 + outer) as u64);
        for &ptr in &pointers {
            // SAFETY: allocated above with this layout.
            unsafe { A.dealloc(ptr, layout) };
        }
    });
}

/// std's allocator test: every alignment up to 4 MiB, at sizes below, at and above it.
#[test]
fn every_alignment_up_to_four_mib() {
    everywhere(|e| {
        for shift in 0..=22 {
            let align = 1usize << shift;
            for size in [1, align / 2 + 1, align, align + 1, 3 * align] {
                let layout = Layout::from_size_align(size.max(1), align).unwrap();
                flush_thread();
                let before = charged(e);
                // SAFETY: non-zero size; freed below.
                let p = unsafe { A.alloc_zeroed(layout) };
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0, "size {size} align {align}");
                // SAFETY: `p` holds `layout.size()` zeroed bytes.
                let bytes = unsafe { std::slice::from_raw_parts(p, layout.size()) };
                assert!(bytes.iter().all(|&b| b == 0));
                assert_eq!(owner(p), e);
                flush_thread();
                // SAFETY: flags with only an alignment.
                let class = unsafe {
                    tikv_jemalloc_sys::nallocx(
                        layout.size(),
                        tikv_jemalloc_sys::MALLOCX_ALIGN(align),
                    )
                };
                assert_eq!(
                    charged(e) - before,
                    class as u64,
                    "size {size} align {align}"
                );
                // SAFETY: allocated above with this layout.
                unsafe { A.dealloc(p, layout) };
            }
        }
    });
}

/// tikv-jemallocator's `grow_in_place`, through `realloc`: 7 bytes grow to 8 within their class
/// (the block stays), to 9 into the next class; the data follows and the owner stays.
#[test]
fn grow_in_place() {
    everywhere(|e| {
        let l7 = Layout::from_size_align(7, 1).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { A.alloc(l7) };
        // SAFETY: `p` holds 7 bytes.
        unsafe { std::ptr::copy_nonoverlapping(b"abcdefg".as_ptr(), p, 7) };
        // SAFETY: `p` is live with layout `l7`; 8 is non-zero.
        let q = unsafe { A.realloc(p, l7, 8) };
        assert_eq!(q, p, "7 -> 8 bytes stays in its size class");
        // SAFETY: `q` is live with 8 bytes.
        let r = unsafe { A.realloc(q, Layout::from_size_align(8, 1).unwrap(), 9) };
        // SAFETY: `r` holds at least the 7 bytes written.
        assert_eq!(unsafe { std::slice::from_raw_parts(r, 7) }, b"abcdefg");
        assert_eq!(owner(r), e);
        // SAFETY: `r` is live with 9 bytes.
        unsafe { A.dealloc(r, Layout::from_size_align(9, 1).unwrap()) };
    });
}

/// tikv-jemallocator's `shrink_in_place`, through `realloc`: a 40 KiB block shrunk to 1 byte
/// is freed with the new layout.
#[test]
fn shrink_in_place() {
    everywhere(|e| {
        let orig = Layout::from_size_align(10 * 4096, 1).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { A.alloc(orig) };
        // SAFETY: `p` holds 40 KiB; write its first byte.
        unsafe { p.write(42) };
        // SAFETY: `p` is live with `orig`; 1 is non-zero.
        let q = unsafe { A.realloc(p, orig, 1) };
        assert!(!q.is_null());
        // SAFETY: `q` holds one byte, kept by realloc.
        assert_eq!(unsafe { q.read() }, 42);
        assert_eq!(owner(q), e);
        flush_thread();
        // SAFETY: `q` is live with 1 byte.
        unsafe { A.dealloc(q, Layout::from_size_align(1, 1).unwrap()) };
    });
}

/// tikv-jemallocator's `usable_size`: a box of a `u32` has at least 4 usable bytes, and the
/// ledger charges exactly that usable size.
#[test]
fn usable_size() {
    everywhere(|e| {
        flush_thread();
        let before = charged(e);
        let a = Box::new(3_u32);
        // SAFETY: `a` points at a live allocation of this (jemalloc-based) allocator.
        let usable =
            unsafe { tikv_jemalloc_sys::malloc_usable_size(std::ptr::from_ref(&*a).cast()) };
        assert!(usable >= 4);
        flush_thread();
        assert_eq!(charged(e) - before, usable as u64);
    });
}

/// Every small and large size class at seven alignments: charged exactly its class.
#[test]
fn every_size_class_at_seven_alignments() {
    everywhere(|e| {
        let mut size = 1usize;
        while size <= 4 << 20 {
            for align in [1, 8, 16, 64, 4096, 1 << 16, 1 << 21] {
                let layout = Layout::from_size_align(size, align).unwrap();
                flush_thread();
                let before = charged(e);
                // SAFETY: non-zero size; freed below.
                let p = unsafe { A.alloc(layout) };
                assert!(!p.is_null() && (p as usize).is_multiple_of(align));
                flush_thread();
                // SAFETY: flags with only an alignment.
                let class = unsafe {
                    tikv_jemalloc_sys::nallocx(size, tikv_jemalloc_sys::MALLOCX_ALIGN(align))
                };
                assert_eq!(
                    charged(e) - before,
                    class as u64,
                    "size {size} align {align}"
                );
                // SAFETY: allocated above with this layout.
                unsafe { A.dealloc(p, layout) };
            }
            size = size_class(size) + 1;
        }
    });
}
