//! Exact attribution by the global allocator. This binary installs `GovernedAlloc`.

mod common;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicPtr, Ordering};

use nodedb_mem_alloc::{
    EngineGuard, EngineId, GovernedAlloc, ctl::arenas::owner, ctl::ledger::charged,
    ctl::thread::HOME_SWITCH_AFTER, ctl::thread::current_engine, ctl::thread::home_engine,
};

use common::{serial, settled};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

#[test]
fn a_block_that_is_its_own_size_class_is_charged_exactly() {
    let _s = serial();
    let before = settled(EngineId::Query);
    let v: Vec<u8> = {
        let _g = EngineGuard::enter(EngineId::Query);
        Vec::with_capacity(4096)
    };
    assert_eq!(owner(v.as_ptr()), EngineId::Query);
    assert_eq!(settled(EngineId::Query) - before, 4096);
    drop(v);
    assert_eq!(settled(EngineId::Query), before);
}

#[test]
fn the_size_class_is_charged_not_the_request() {
    let _s = serial();
    let before = settled(EngineId::Query);
    let b = {
        let _g = EngineGuard::enter(EngineId::Query);
        Box::new([0u8; 100]) // size class 112
    };
    assert_eq!(settled(EngineId::Query) - before, 112);
    drop(b);
    assert_eq!(settled(EngineId::Query), before);
}

#[test]
fn frees_on_another_thread_credit_the_owner() {
    let _s = serial();
    let before = settled(EngineId::Vector);
    let data: Vec<u64> = {
        let _g = EngineGuard::enter(EngineId::Vector);
        vec![7; 1000] // 8000 B -> class 8192
    };
    assert_eq!(settled(EngineId::Vector) - before, 8192);
    let other = std::thread::spawn(move || {
        let _g = EngineGuard::enter(EngineId::Timeseries); // a different engine frees it
        assert_eq!(data.iter().sum::<u64>(), 7000);
        drop(data);
    });
    other.join().unwrap();
    assert_eq!(settled(EngineId::Vector), before);
}

#[test]
fn realloc_keeps_the_owner_and_charges_the_new_class() {
    let _s = serial();
    let before = settled(EngineId::Timeseries);
    let mut v: Vec<u8> = {
        let _g = EngineGuard::enter(EngineId::Timeseries);
        Vec::with_capacity(1000) // class 1024
    };
    assert_eq!(settled(EngineId::Timeseries) - before, 1024);
    // Grown outside any guard, and inside another engine's: the block stays Timeseries'.
    v.reserve_exact(5000); // 5000 -> class 5120
    assert_eq!(owner(v.as_ptr()), EngineId::Timeseries);
    assert_eq!(settled(EngineId::Timeseries) - before, 5120);
    {
        let _g = EngineGuard::enter(EngineId::Crdt);
        v.reserve_exact(100_000); // -> page-rounded 102400 B
        v.extend(std::iter::repeat_n(1u8, 100));
        v.shrink_to_fit(); // 100 -> class 112
    }
    assert_eq!(owner(v.as_ptr()), EngineId::Timeseries);
    assert_eq!(settled(EngineId::Timeseries) - before, 112);
    assert_eq!(v.len(), 100);
    drop(v);
    assert_eq!(settled(EngineId::Timeseries), before);
}

#[test]
fn zeroed_and_over_aligned_blocks() {
    let _s = serial();
    let before = settled(EngineId::Sparse);
    let _g = EngineGuard::enter(EngineId::Sparse);
    let zeros = vec![0u8; 12288]; // alloc_zeroed, class 12288
    assert!(zeros.iter().all(|&b| b == 0));
    let layouts = [
        Layout::from_size_align(64, 4096).unwrap(), // small request, page alignment: 4096
        Layout::from_size_align(8, 64).unwrap(),    // 64
        Layout::from_size_align(100_000, 1 << 16).unwrap(), // large, 64 KiB aligned: 102400
        Layout::from_size_align(3, 1).unwrap(),     // 8
    ];
    let want = [4096u64, 64, 102_400, 8];
    for (layout, want) in layouts.into_iter().zip(want) {
        let base = settled(EngineId::Sparse);
        // SAFETY: non-zero size; freed below with the same layout.
        let p = unsafe { ALLOC.alloc_zeroed(layout) };
        assert!(!p.is_null());
        assert_eq!(p as usize % layout.align(), 0, "{layout:?}");
        assert_eq!(owner(p), EngineId::Sparse);
        // SAFETY: `p` holds `layout.size()` initialised (zeroed) bytes.
        let bytes = unsafe { std::slice::from_raw_parts(p, layout.size()) };
        assert!(bytes.iter().all(|&b| b == 0));
        assert_eq!(settled(EngineId::Sparse) - base, want, "{layout:?}");
        // SAFETY: allocated above with this layout.
        unsafe { ALLOC.dealloc(p, layout) };
        assert_eq!(settled(EngineId::Sparse), base);
    }
    drop(zeros);
    assert_eq!(settled(EngineId::Sparse), before);
}

#[test]
fn guards_nest_and_restore() {
    let _s = serial();
    let (q0, v0) = (settled(EngineId::Query), settled(EngineId::Vector));
    let (a, b, c);
    {
        let _q = EngineGuard::enter(EngineId::Query);
        a = Box::new([1u8; 256]);
        {
            let _v = EngineGuard::enter(EngineId::Vector);
            b = Box::new([2u8; 512]);
        }
        c = Box::new([3u8; 1024]);
        assert_eq!(current_engine(), EngineId::Query);
    }
    assert_eq!(current_engine(), EngineId::Unattributed);
    assert_eq!(
        (owner(a.as_ptr()), owner(b.as_ptr()), owner(c.as_ptr())),
        (EngineId::Query, EngineId::Vector, EngineId::Query)
    );
    assert_eq!(settled(EngineId::Query) - q0, 256 + 1024);
    assert_eq!(settled(EngineId::Vector) - v0, 512);
    drop((a, b, c));
    assert_eq!(
        (settled(EngineId::Query), settled(EngineId::Vector)),
        (q0, v0)
    );
}

#[test]
fn a_thread_that_stays_moves_home_and_flushes_when_it_exits() {
    let _s = serial();
    let before = settled(EngineId::Crdt);
    let n = (HOME_SWITCH_AFTER as usize) * 3;
    let mut holder: Vec<Box<[u8; 48]>> = Vec::with_capacity(n);
    let holder = std::thread::spawn(move || {
        let _g = EngineGuard::enter(EngineId::Crdt);
        for i in 0..n {
            holder.push(Box::new([i as u8; 48]));
        }
        assert_eq!(home_engine(), EngineId::Crdt);
        holder // the thread exits with prepaid credit pending; its exit flushes it
    })
    .join()
    .unwrap();
    assert!(holder.iter().all(|b| owner(b.as_ptr()) == EngineId::Crdt));
    assert_eq!(charged(EngineId::Crdt) - before, 48 * n as u64);
    drop(holder);
    assert_eq!(settled(EngineId::Crdt), before);
}

#[test]
fn batching_error_is_bounded_while_running() {
    let _s = serial();
    let before = settled(EngineId::Query);
    let _g = EngineGuard::enter(EngineId::Query);
    let mut live = 0u64;
    let mut held = Vec::with_capacity(10_000);
    for i in 0..10_000u64 {
        held.push(vec![0u8; 16 + (i as usize * 37) % 2000]);
        live += nodedb_usable(held.last().unwrap().capacity());
        let ledger = charged(EngineId::Query) - before;
        // The holder vector itself is Query's too (it was allocated inside the guard).
        let holder = nodedb_usable(held.capacity() * std::mem::size_of::<Vec<u8>>());
        assert!(
            ledger >= live + holder,
            "ledger {ledger} below live {}",
            live + holder
        );
        assert!(
            ledger <= live + holder + nodedb_mem_alloc::ctl::ledger::inflight_bound().batch,
            "ledger {ledger} live {}",
            live + holder
        );
    }
    drop(held);
    drop(_g);
    assert_eq!(settled(EngineId::Query), before);
}

/// jemalloc's usable size for a byte-aligned request (small ones here).
fn nodedb_usable(size: usize) -> u64 {
    let layout = Layout::from_size_align(size, 1).unwrap();
    // SAFETY: probe allocation through the global allocator, freed at once.
    unsafe {
        let p = ALLOC.alloc(layout);
        let u = tikv_jemalloc_sys::malloc_usable_size(p.cast()) as u64;
        ALLOC.dealloc(p, layout);
        u
    }
}

static LEAKED: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

struct AllocatesOnDrop;

impl Drop for AllocatesOnDrop {
    fn drop(&mut self) {
        // Runs during thread teardown, possibly after the allocator's own thread-local is gone.
        let _g = EngineGuard::enter(EngineId::Sparse);
        let b: Box<[u8; 2000]> = Box::new([9; 2000]);
        LEAKED.store(Box::into_raw(b).cast(), Ordering::SeqCst);
    }
}

thread_local! {
    static ON_EXIT: AllocatesOnDrop = const { AllocatesOnDrop };
    static FIRST: AllocatesFirstRegistered = const { AllocatesFirstRegistered };
}

static LEAKED_LATE: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());

/// Registered before the allocator's thread-local, so destroyed after it: its allocation and
/// free take the allocator's detached path.
struct AllocatesFirstRegistered;

impl Drop for AllocatesFirstRegistered {
    fn drop(&mut self) {
        let _g = EngineGuard::enter(EngineId::Timeseries);
        let b: Box<[u8; 3000]> = Box::new([1; 3000]);
        LEAKED_LATE.store(Box::into_raw(b).cast(), Ordering::SeqCst);
        drop(Box::new([2u8; 5000])); // allocated and freed after the allocator's state is gone
    }
}

#[test]
fn allocating_in_another_thread_locals_destructor_is_charged_and_credited() {
    let _s = serial();
    let totals = || EngineId::ALL.map(settled);
    let before = totals();
    let detached_before = nodedb_mem_alloc::ctl::thread::detached_operations();
    // A raw thread, so that nothing allocates in it before `FIRST` registers its destructor
    // (std's thread start-up does).
    extern "C" fn body(_: *mut libc::c_void) -> *mut libc::c_void {
        FIRST.with(|_| {}); // before this thread's first allocation
        let _g = EngineGuard::enter(EngineId::Sparse);
        ON_EXIT.with(|_| {});
        // Stay long enough for Sparse to become this thread's home arena.
        let keep: Vec<Box<u64>> = (0..HOME_SWITCH_AFTER * 2)
            .map(|i| Box::new(i as u64))
            .collect();
        drop(keep);
        std::ptr::null_mut()
    }
    let mut tid: libc::pthread_t = 0;
    // SAFETY: `tid` is a valid out-pointer, default attributes, `body` never unwinds (nothing
    // in it panics) and takes no argument.
    let rc =
        unsafe { libc::pthread_create(&mut tid, std::ptr::null(), body, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
    // SAFETY: `tid` is a joinable thread created above, joined once.
    assert_eq!(unsafe { libc::pthread_join(tid, std::ptr::null_mut()) }, 0);
    assert!(nodedb_mem_alloc::ctl::thread::detached_operations() >= detached_before + 3);
    let p = LEAKED.swap(std::ptr::null_mut(), Ordering::SeqCst);
    let late = LEAKED_LATE.swap(std::ptr::null_mut(), Ordering::SeqCst);
    assert!(!p.is_null() && !late.is_null());
    let (who, who_late) = (owner(p), owner(late));
    assert_eq!((who, who_late), (EngineId::Sparse, EngineId::Timeseries));
    eprintln!("blocks allocated in thread-local destructors are owned by {who} and {who_late}");
    let after = totals();
    // Each block (classes 2048 and 3072) is charged to its owner, and to nobody else; the
    // 5000-byte block allocated and freed during teardown left nothing behind.
    let mut want = [0i64; EngineId::COUNT];
    want[who.index()] += 2048;
    want[who_late.index()] += 3072;
    for e in EngineId::ALL {
        let delta = after[e.index()] as i64 - before[e.index()] as i64;
        // Unattributed also moves with whatever the test harness's own threads do.
        if e != EngineId::Unattributed {
            assert_eq!(delta, want[e.index()], "{e}");
        }
    }
    // SAFETY: leaked from boxes of these types above.
    drop(unsafe { Box::from_raw(p.cast::<[u8; 2000]>()) });
    // SAFETY: as above.
    drop(unsafe { Box::from_raw(late.cast::<[u8; 3000]>()) });
    assert_eq!(settled(who), before[who.index()]);
    assert_eq!(settled(who_late), before[who_late.index()]);
}
