//! The background thread sleeps longer while nothing moves, and whatever moves wakes it: a
//! tick skipped for being quiet never delays the answer to memory coming near the ceiling, or to
//! a request waiting for memory, past the first tick after it. This binary installs
//! `GovernedAlloc`.

use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use nodedb_mem::{
    BACKGROUND_STRETCH_MAX, EngineId, EventKind, GovernedAlloc, MemoryGovernor, Snapshot,
};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const MIB: u64 = 1 << 20;
const INTERVAL: Duration = Duration::from_millis(200);
/// What the tests add to the process's resident memory at start to make the ceiling: far
/// enough for ticks to be quiet, near enough to reach.
const ROOM: u64 = 320 * MIB;

fn resident() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

fn gov() -> &'static MemoryGovernor {
    static GOV: OnceLock<&'static MemoryGovernor> = OnceLock::new();
    GOV.get_or_init(|| {
        MemoryGovernor::builder()
            .global_ceiling(resident() + ROOM)
            .budget(EngineId::Query, 32 * MIB)
            .budget(EngineId::Vector, 96 * MIB)
            .background(Some(INTERVAL))
            .install()
            .expect("first install")
    })
}

/// The ledger is process-wide: one test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn wait_for(what: &str, mut ok: impl FnMut(&Snapshot) -> bool) -> Snapshot {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let s = gov().snapshot();
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the thread sleeps at least `intervals` intervals after each tick and has just
/// finished one (so its whole sleep lies ahead); returns that tick's count and the sleep.
fn stretched_and_just_ticked(intervals: u32) -> (u64, Duration) {
    let s = wait_for("a stretched sleep", |s| {
        s.background_sleep >= INTERVAL * intervals
    });
    let s = wait_for("the next tick", |n| n.background_ticks > s.background_ticks);
    assert!(s.background_sleep >= INTERVAL * intervals);
    (s.background_ticks, s.background_sleep)
}

#[test]
fn quiet_ticks_stretch_the_sleep_refresh_nothing_and_an_allocation_wakes_the_thread() {
    let _serial = serial();
    let gov = gov();
    // Quiet ticks: the sleep doubles up to its cap, and jemalloc's statistics are not read.
    let (ticks, _) = stretched_and_just_ticked(BACKGROUND_STRETCH_MAX);
    let refreshes = gov.snapshot().allocator_stats_refreshes;
    let s = wait_for("two more ticks", |s| s.background_ticks >= ticks + 2);
    assert_eq!(s.background_sleep, INTERVAL * BACKGROUND_STRETCH_MAX);
    assert_eq!(
        s.allocator_stats_refreshes, refreshes,
        "a quiet tick refreshes no statistics"
    );

    // A tick has just ended and the next is a full stretched sleep away. Memory handed out
    // now wakes the thread: resident memory near the ceiling is answered by the first ticks
    // after the allocation, long before that sleep would have ended.
    let (_, sleep) = stretched_and_just_ticked(BACKGROUND_STRETCH_MAX);
    let seen = gov.snapshot().events_recorded;
    let start = Instant::now();
    let data = vec![1u8; usize::try_from(ROOM).unwrap()];
    // Resident memory is near the ceiling from here: the tick under way, or the next.
    let filled = gov.snapshot().background_ticks;
    let s = wait_for("the answer near the ceiling", |s| {
        s.events
            .iter()
            .any(|e| e.seq >= seen && matches!(e.kind, EventKind::ResidentNearCeiling { .. }))
    });
    let took = start.elapsed();
    assert!(
        s.background_ticks <= filled + 2,
        "answered by tick {} after tick {filled}",
        s.background_ticks
    );
    assert!(
        took < sleep / 2,
        "answered after {took:?}; the stretched sleep was {sleep:?}"
    );
    assert_eq!(
        s.background_sleep, INTERVAL,
        "no longer quiet: back to the interval"
    );
    drop(data);
}

#[test]
fn a_request_waiting_for_memory_wakes_the_thread_to_rebalance() {
    let _serial = serial();
    let gov = gov();
    let (_, sleep) = stretched_and_just_ticked(BACKGROUND_STRETCH_MAX / 2);
    // Query's 32 MiB cannot hold 48 MiB until rebalancing lends it Vector's idle limit.
    let start = Instant::now();
    let r = gov
        .reserve_blocking(EngineId::Query, None, 48 * MIB, Duration::from_secs(30))
        .expect("granted once Vector lends");
    let took = start.elapsed();
    assert!(
        took < sleep / 2,
        "granted after {took:?}; the stretched sleep was {sleep:?}"
    );
    assert!(gov.limit(EngineId::Query) >= 48 * MIB);
    drop(r);
}

#[test]
fn the_longest_sleep_is_a_setting_and_one_interval_never_stretches() {
    let _serial = serial();
    let tick = Duration::from_millis(10);
    for (stretch, longest) in [(1, tick), (4, tick * 4)] {
        // A standalone governor: nothing is charged to it, so every tick after the first
        // is quiet.
        let gov = MemoryGovernor::builder()
            .global_ceiling(16u64 << 30)
            .background_stretch(stretch)
            .build()
            .unwrap();
        let bg = gov.spawn_rebalancer(tick).unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        let mut sleeps = Vec::new();
        while gov.snapshot().background_ticks < 12 {
            sleeps.push(gov.snapshot().background_sleep);
            assert!(Instant::now() < until, "twelve ticks");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(bg);
        let s = gov.snapshot();
        assert_eq!(s.background_sleep, longest, "stretch {stretch}");
        assert!(
            sleeps.iter().all(|&d| d <= longest),
            "stretch {stretch}: {sleeps:?}"
        );
    }
}
