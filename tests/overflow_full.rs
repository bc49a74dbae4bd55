//! Overflow out of room: a region that fills (1 MiB blocks use at least 95 % of its capacity),
//! then the configured policy: fall back and record a breach, or fail the allocation. Nothing
//! is lost and the counts are exact. Each test runs in its own process (nextest).

use nodedb_mem::{
    EngineGuard, EngineId, EventKind, GovernedAlloc, MemoryGovernor, OverflowConfig,
    OverflowPolicy, PressureLevel, Size, flush_thread,
};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const MIB: usize = 1 << 20;
const Q: EngineId = EngineId::Query;

fn install(
    capacity: usize,
    policy: OverflowPolicy,
) -> (&'static MemoryGovernor, tempfile::TempDir) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .budget(Q, 16 * MIB as u64)
        .overflow(OverflowConfig {
            capacity: Some(Size::Bytes(capacity as u64)),
            policy,
            ..OverflowConfig::in_dir(dir.path())
        })
        .background(None) // limits stay where the test put them
        .install()
        .unwrap();
    (gov, dir)
}

/// The site the breach event names (its own frame, not a tail call, in optimised builds too).
#[inline(never)]
fn one_mib_block(fill: u8) -> Vec<u8> {
    std::hint::black_box(vec![fill; MIB])
}

#[test]
fn one_mib_blocks_fill_their_capacity_then_fall_back_with_a_breach() {
    let capacity = 256 * MIB;
    let (gov, _dir) = install(capacity, OverflowPolicy::FallBack);
    // Fine enough that the blocks in Query's arena are sampled: the breach names their site.
    gov.set_heap_profiling(64 << 10);
    flush_thread();
    let (base, base_over) = (gov.usage(Q), gov.budget(Q).overflow_bytes());
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(512);
    // Fill until overflow cannot take a block any more.
    while nodedb_mem::overflow_breaches(Q).breaches == 0 {
        assert!(blocks.len() < 512, "overflow never filled");
        let _g = EngineGuard::enter(Q);
        blocks.push(one_mib_block(blocks.len() as u8));
    }
    flush_thread();
    let in_overflow = gov.budget(Q).overflow_bytes() - base_over;
    eprintln!(
        "1 MiB blocks in a {} MiB region before the first breach: {} MiB",
        capacity >> 20,
        in_overflow >> 20
    );
    assert!(
        in_overflow * 100 >= capacity as u64 * 95,
        "1 MiB blocks filled {} of {} MiB",
        in_overflow >> 20,
        capacity >> 20
    );
    // Eight more: served past the limit from the normal arena, each counted with its bytes.
    let before = nodedb_mem::overflow_breaches(Q);
    for _ in 0..8 {
        let _g = EngineGuard::enter(Q);
        blocks.push(vec![blocks.len() as u8; MIB]);
    }
    let after = nodedb_mem::overflow_breaches(Q);
    assert_eq!(after.breaches - before.breaches, 8);
    assert_eq!(after.breach_bytes - before.breach_bytes, 8 * MIB as u64);
    assert_eq!(after.refused, 0);
    flush_thread();
    let total = blocks.len() as u64 * MIB as u64;
    // Every byte counted, in the engine or its overflow.
    assert_eq!(
        (gov.usage(Q) - base) + (gov.budget(Q).overflow_bytes() - base_over),
        total
    );
    assert!(
        gov.usage(Q) > gov.limit(Q),
        "the breach is visible as usage past the limit"
    );
    assert_eq!(gov.pressure(Q), PressureLevel::Emergency);
    // The figures say which engine and how much: snapshot, Prometheus, an event.
    gov.check_resident().unwrap();
    let snap = gov.snapshot();
    assert_eq!(snap.engine(Q).overflow_breaches, after);
    assert_eq!(snap.engine(Q).overflow.capacity, capacity as u64);
    let figures = snap.engine(Q).overflow;
    assert!(figures.disk >= in_overflow);
    assert_eq!(figures.paged_out() + figures.resident, figures.backed);
    assert!(figures.backed >= in_overflow);
    assert!(text_has(
        &gov.prometheus(),
        &format!(
            "nodedb_mem_engine_overflow_capacity_bytes{{engine=\"query\"}} {}",
            capacity
        )
    ));
    let event = snap
        .events
        .iter()
        .find_map(|e| match e.kind {
            EventKind::OverflowBreach {
                engine,
                breaches,
                breach_bytes,
                top,
                ..
            } => Some(((engine, breaches, breach_bytes), top)),
            _ => None,
        })
        .expect("an overflow breach event");
    assert_eq!(event.0, (Q, after.breaches, after.breach_bytes));
    let top = event.1.first().expect("the breach's top sites");
    assert!(top.function.contains("one_mib_block"), "{}", event.1);
    let text = gov.prometheus();
    let line = format!(
        "nodedb_mem_engine_overflow_breach_bytes_total{{engine=\"query\"}} {}",
        after.breach_bytes
    );
    assert!(text.contains(&line), "{line}");
    // Nothing lost.
    assert!(
        blocks
            .iter()
            .enumerate()
            .all(|(i, b)| b.iter().all(|&x| x == i as u8))
    );
    drop(blocks);
    flush_thread();
    assert_eq!(
        (gov.usage(Q), gov.budget(Q).overflow_bytes()),
        (base, base_over)
    );
}

#[test]
fn a_full_disk_fails_fallible_allocations_under_fail_allocation() {
    let (gov, _dir) = install(64 * MIB, OverflowPolicy::FailAllocation);
    // (The outer vector is allocated outside the guard: only the blocks are Query's.)
    let mut held: Vec<Vec<u8>> = Vec::with_capacity(4096);
    flush_thread();
    let (base, base_over) = (gov.usage(Q), gov.budget(Q).overflow_bytes());
    // Query at its limit, so new blocks go to overflow.
    while !nodedb_mem::is_overflowing(Q) {
        let _g = EngineGuard::enter(Q);
        held.push(vec![7u8; 64 * 1024]);
    }
    // The disk is full: the overflow file cannot grow.
    nodedb_mem_alloc::ctl::overflow::fault::fail_always(libc::ENOSPC);
    let mut v: Vec<u8> = Vec::new();
    let r = {
        let _g = EngineGuard::enter(Q);
        v.try_reserve_exact(8 * MIB)
    };
    nodedb_mem_alloc::ctl::overflow::fault::clear();
    assert!(r.is_err(), "the allocation fails cleanly");
    let b = nodedb_mem::overflow_breaches(Q);
    assert_eq!((b.refused, b.refused_bytes), (1, 8 * MIB as u64));
    assert_eq!(b.breaches, 0);
    // Nothing lost, counts exact.
    assert!(held.iter().all(|h| h.iter().all(|&x| x == 7)));
    flush_thread();
    let total = held.len() as u64 * 64 * 1024;
    assert_eq!(
        (gov.usage(Q) - base) + (gov.budget(Q).overflow_bytes() - base_over),
        total
    );
    assert!(gov.usage(Q) <= gov.limit(Q) + nodedb_mem::inflight_bound().batch);
    drop(held);
    flush_thread();
    assert_eq!(
        (gov.usage(Q), gov.budget(Q).overflow_bytes()),
        (base, base_over)
    );
}

fn text_has(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

/// Without a capacity, each region may grow to the overflow directory's free space less the
/// reserve (10 %, at least 1 GiB), at most the range an engine holds.
#[test]
fn the_default_capacity_comes_from_the_disk() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let free = || {
        let path = std::ffi::CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: an all-zero statvfs is a valid value of the plain C struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a statvfs to write.
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
        st.f_bavail * st.f_frsize
    };
    let before = free();
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .overflow(OverflowConfig::in_dir(dir.path()))
        .background(None)
        .install()
        .unwrap();
    let after = free();
    let expect = |free: u64| {
        let reserve = ((free as f64 * nodedb_mem::OVERFLOW_DISK_RESERVE) as u64).max(1 << 30);
        free.saturating_sub(reserve)
            .min(nodedb_mem::range_bytes() as u64)
            .next_multiple_of(4096)
    };
    let capacity = gov.snapshot().engine(Q).overflow.capacity;
    // Other processes may write to the same disk meanwhile: between the two readings.
    let (lo, hi) = (expect(before.max(after)), expect(before.min(after)));
    assert!(
        (hi.min(lo)..=hi.max(lo)).contains(&capacity),
        "capacity {capacity} outside {lo}..={hi} (free {before} then {after})"
    );
    assert!(capacity > 0);
}
