//! Allocations of an engine over its limit go to its file-backed overflow region, and come
//! back once it is under again; failures follow the configured policy. This binary installs
//! `GovernedAlloc` and enables overflow once, for all its tests.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::{Mutex, MutexGuard, OnceLock};

use nodedb_mem_alloc::{
    EngineGuard, EngineId, GovernedAlloc, ctl::arenas::is_overflow, ctl::arenas::owner,
    ctl::ledger::charged, ctl::ledger::overflow_charged, ctl::ledger::set_overflow_limit,
    ctl::overflow::OverflowPolicy, ctl::overflow::enable_overflow,
    ctl::overflow::fault as overflow_fault, ctl::overflow::is_overflowing,
    ctl::overflow::overflow_region, ctl::overflow::overflow_stats, ctl::thread::flush_thread,
};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const MIB: usize = 1 << 20;

fn setup() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    static ENABLED: OnceLock<tempfile::TempDir> = OnceLock::new();
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    ENABLED.get_or_init(|| {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        enable_overflow(dir.path(), 32 * MIB, false, OverflowPolicy::FallBack).unwrap();
        dir
    });
    guard
}

fn settled(engine: EngineId) -> (usize, usize) {
    flush_thread();
    (charged(engine) as usize, overflow_charged(engine) as usize)
}

#[test]
fn an_engine_over_its_limit_allocates_in_overflow_and_comes_back() {
    let _s = setup();
    let e = EngineId::Timeseries;
    let (base, base_over) = settled(e);
    set_overflow_limit(e, Some((base + 4 * MIB) as u64));
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(10_000);
    {
        let _g = EngineGuard::enter(e);
        for i in 0..8 * 256 {
            // 8 MiB of 4 KiB blocks: the first ~4 MiB in the arena, the rest in overflow.
            blocks.push(vec![i as u8; 4096]);
        }
    }
    assert!(is_overflowing(e));
    let (now, over) = settled(e);
    let in_overflow = blocks.iter().filter(|b| is_overflow(b.as_ptr())).count();
    assert!(in_overflow > 900, "{in_overflow} blocks in overflow");
    assert!(blocks.iter().all(|b| owner(b.as_ptr()) == e));
    assert_eq!(over - base_over, in_overflow * 4096);
    // Resident usage stayed at the limit (give or take one block and a thread's batch).
    assert!(
        now - base <= 4 * MIB + 64 * 1024 + 4096,
        "{} over the base",
        now - base
    );
    // The data in overflow is intact.
    assert!(
        blocks
            .iter()
            .enumerate()
            .all(|(i, b)| b.iter().all(|&x| x == i as u8))
    );
    // The overflow file grew to hold it.
    assert!(overflow_region(e).unwrap().len() >= in_overflow * 4096);
    // Freeing the arena blocks brings the engine under its limit: allocations come back.
    blocks.retain(|b| is_overflow(b.as_ptr()));
    flush_thread();
    assert!(!is_overflowing(e));
    let back = {
        let _g = EngineGuard::enter(e);
        vec![1u8; 4096]
    };
    assert!(!is_overflow(back.as_ptr()));
    drop(back);
    drop(blocks);
    assert_eq!(settled(e), (base, base_over));
    set_overflow_limit(e, None);
}

#[test]
fn paging_out_overflow_keeps_the_data() {
    let _s = setup();
    let e = EngineId::Crdt;
    let (base, _) = settled(e);
    set_overflow_limit(e, Some(base as u64)); // everything new overflows
    let blocks: Vec<Vec<u8>> = {
        let _g = EngineGuard::enter(e);
        (0..1024).map(|i| vec![(i % 251) as u8; 8192]).collect()
    };
    assert!(blocks.iter().all(|b| is_overflow(b.as_ptr())));
    assert!(nodedb_mem_alloc::ctl::overflow::page_out_overflow() >= 8 * MIB as u64);
    assert!(
        blocks
            .iter()
            .enumerate()
            .all(|(i, b)| b.iter().all(|&x| x == (i % 251) as u8))
    );
    drop(blocks);
    set_overflow_limit(e, None);
}

#[test]
fn when_overflow_cannot_grow_the_policy_decides() {
    let _s = setup();
    let e = EngineId::Sparse;
    let (base, base_over) = settled(e);
    set_overflow_limit(e, Some(base as u64));
    // The overflow file cannot grow (disk full): the allocation is served normally and counted.
    let before = overflow_stats();
    overflow_fault::fail_always(libc::ENOSPC); // a disk that stays full
    let layout = Layout::from_size_align(16 * MIB, 8).unwrap(); // needs a new extent
    let p = {
        let _g = EngineGuard::enter(e);
        // SAFETY: non-zero size; freed below.
        unsafe { ALLOC.alloc(layout) }
    };
    overflow_fault::clear();
    assert!(!p.is_null());
    assert!(!is_overflow(p), "served from the normal arena");
    let after = overflow_stats();
    assert_eq!(after.breaches, before.breaches + 1);
    assert!(after.extent_failures > before.extent_failures);
    assert_eq!(
        settled(e),
        (base + 16 * MIB, base_over),
        "charged where it lives"
    );
    // SAFETY: allocated above with this layout.
    unsafe { ALLOC.dealloc(p, layout) };
    assert_eq!(settled(e), (base, base_over));
    set_overflow_limit(e, None);
}

#[test]
fn a_full_overflow_region_refuses_under_the_fail_policy() {
    let _s = setup();
    let e = EngineId::Vector;
    let (base, base_over) = settled(e);
    set_overflow_limit(e, Some(base as u64));
    nodedb_mem_alloc::ctl::overflow::set_overflow_policy(OverflowPolicy::FailAllocation);
    // Bigger than the whole 32 MiB region: it cannot take it.
    let layout = Layout::from_size_align(40 * MIB, 8).unwrap();
    let before = overflow_stats();
    let p = {
        let _g = EngineGuard::enter(e);
        // SAFETY: non-zero size.
        unsafe { ALLOC.alloc(layout) }
    };
    assert!(p.is_null(), "refused");
    assert_eq!(overflow_stats().refused, before.refused + 1);
    // Fallible collections see a clean error.
    let mut v: Vec<u8> = Vec::new();
    {
        let _g = EngineGuard::enter(e);
        assert!(v.try_reserve_exact(40 * MIB).is_err());
    }
    assert_eq!(
        settled(e),
        (base, base_over),
        "nothing charged for refused requests"
    );
    nodedb_mem_alloc::ctl::overflow::set_overflow_policy(OverflowPolicy::FallBack);
    let p = {
        let _g = EngineGuard::enter(e);
        // SAFETY: non-zero size; freed below.
        unsafe { ALLOC.alloc(layout) }
    };
    assert!(
        !p.is_null() && !is_overflow(p),
        "served normally, counted as a breach"
    );
    assert_eq!(overflow_stats().breaches, before.breaches + 1);
    // SAFETY: allocated above with this layout.
    unsafe { ALLOC.dealloc(p, layout) };
    assert_eq!(settled(e), (base, base_over));
    set_overflow_limit(e, None);
}

#[test]
fn failing_growth_at_each_point_of_a_sequence_loses_no_byte() {
    // In the spirit of Seastar's exhaustive failure tests: an engine keeps allocating into
    // overflow (nothing is freed, so the file has to keep growing), and round i lets the next
    // growth of the file fail. Whatever fails, every block is charged exactly where it lives.
    let _s = setup();
    let e = EngineId::Query;
    let (base, base_over) = settled(e);
    set_overflow_limit(e, Some(base as u64));
    let mut kept: Vec<Vec<u8>> = Vec::with_capacity(64); // outside the engine
    let mut rounds_with_a_failure = 0;
    let breaches0 = overflow_stats().breaches;
    for i in 0..6 {
        let before = overflow_stats();
        overflow_fault::fail_after(0, if i % 2 == 0 { libc::EIO } else { libc::ENOSPC });
        {
            let _g = EngineGuard::enter(e);
            for k in 0..4 {
                kept.push(vec![(i * 4 + k) as u8; 1 << 20]);
            }
        }
        overflow_fault::clear();
        let after = overflow_stats();
        rounds_with_a_failure += usize::from(after.extent_failures > before.extent_failures);
        let (now, over) = settled(e);
        let in_arena: usize = kept
            .iter()
            .filter(|b| !is_overflow(b.as_ptr()))
            .map(Vec::capacity)
            .sum();
        let in_overflow: usize = kept
            .iter()
            .filter(|b| is_overflow(b.as_ptr()))
            .map(Vec::capacity)
            .sum();
        assert_eq!(now - base, in_arena, "round {i}");
        assert_eq!(over - base_over, in_overflow, "round {i}");
        assert_eq!(
            overflow_stats().breaches,
            breaches0 + kept.iter().filter(|b| !is_overflow(b.as_ptr())).count() as u64,
            "round {i}"
        );
    }
    assert!(
        kept.iter()
            .enumerate()
            .all(|(k, b)| b.iter().all(|&x| x == k as u8))
    );
    eprintln!("{rounds_with_a_failure} of 6 rounds hit an injected failure");
    assert!(
        rounds_with_a_failure >= 2,
        "the injected failures were rarely reached"
    );
    drop(kept);
    assert_eq!(settled(e), (base, base_over));
    set_overflow_limit(e, None);
}

#[test]
fn a_large_block_that_would_cross_the_limit_goes_to_overflow_at_once() {
    let _s = setup();
    let e = EngineId::Vector;
    let (base, base_over) = settled(e);
    // 3 MiB of room: a 2 MiB block fits, a second one would cross the limit.
    set_overflow_limit(e, Some((base + 3 * MIB) as u64));
    let (a, b) = {
        let _g = EngineGuard::enter(e);
        (vec![1u8; 2 * MIB], vec![2u8; 2 * MIB])
    };
    assert!(!is_overflow(a.as_ptr()));
    assert!(
        is_overflow(b.as_ptr()),
        "the crossing block was placed in the arena"
    );
    let (now, over) = settled(e);
    assert_eq!(now - base, 2 * MIB);
    assert_eq!(over - base_over, 2 * MIB);
    drop((a, b));
    assert_eq!(settled(e), (base, base_over));
    set_overflow_limit(e, None);
}

#[test]
fn a_large_block_growing_past_the_limit_moves_to_overflow_with_its_data() {
    let _s = setup();
    let e = EngineId::Query;
    let (base, base_over) = settled(e);
    set_overflow_limit(e, Some((base + 4 * MIB + MIB / 2) as u64));
    let mut v: Vec<u64> = {
        let _g = EngineGuard::enter(e);
        (0..(MIB / 8) as u64).collect() // 1 MiB, in the arena
    };
    assert!(!is_overflow(v.as_ptr().cast()));
    // Growth to 4 MiB fits; to 5 MiB it would cross: the block moves, the data with it.
    v.reserve_exact(3 * MIB / 8);
    assert!(!is_overflow(v.as_ptr().cast()));
    assert_eq!(settled(e).0 - base, 4 * MIB);
    v.reserve_exact(4 * MIB / 8);
    assert!(
        is_overflow(v.as_ptr().cast()),
        "grew in place past the limit"
    );
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
    let (now, over) = settled(e);
    assert_eq!((now - base, over - base_over), (0, 5 * MIB));
    // The thread freeing it is not the engine's: the credit still reaches overflow.
    std::thread::spawn(move || drop(v)).join().unwrap();
    assert_eq!(settled(e), (base, base_over));
    set_overflow_limit(e, None);
}

#[test]
fn concurrent_small_allocations_never_take_the_ledger_past_the_limit() {
    let _s = setup();
    let e = EngineId::Crdt;
    let (base, base_over) = settled(e);
    let limit = base + MIB;
    set_overflow_limit(e, Some(limit as u64));
    // Four threads, 2 MiB each of 1000 B blocks (1 KiB size class): most of it cannot fit.
    let blocks: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                s.spawn(move || {
                    let mut kept = Vec::with_capacity(2048);
                    let _g = EngineGuard::enter(e);
                    for i in 0..2048 {
                        kept.push(vec![(t * 7 + i) as u8; 1000]);
                    }
                    flush_thread();
                    kept
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Prepaid credit included, the engine's ledger never passed its limit.
    assert!(
        nodedb_mem_alloc::ctl::ledger::charged_peak(e) <= limit as u64,
        "peak {} over the limit {limit}",
        nodedb_mem_alloc::ctl::ledger::charged_peak(e)
    );
    let all = || blocks.iter().flatten();
    let in_overflow = all().filter(|b| is_overflow(b.as_ptr())).count();
    let in_arena = all().count() - in_overflow;
    assert!(in_overflow > 4 * 1024, "{in_overflow} blocks in overflow");
    assert_eq!(
        settled(e),
        (base + in_arena * 1024, base_over + in_overflow * 1024)
    );
    assert!(blocks.iter().enumerate().all(|(t, v)| {
        v.iter()
            .enumerate()
            .all(|(i, b)| b[999] == (t * 7 + i) as u8)
    }));
    drop(blocks);
    assert_eq!(settled(e), (base, base_over));
    set_overflow_limit(e, None);
}
