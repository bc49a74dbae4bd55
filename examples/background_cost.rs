//! What the governor's background thread costs.
//!
//! 1. One full resident check (`check_resident`, which always refreshes jemalloc's statistics)
//!    and one `rebalance`, timed on this thread, warm: what a tick costs when it has work.
//! 2. The process idle for a while (60 s unless given) with the default background thread
//!    running and live data in every engine, measured with `getrusage`: the CPU time of the
//!    whole process, the ticks run and the statistics refreshes they made.
//!
//! ```sh
//! cargo run --release --example background_cost            # 60 s idle
//! cargo run --release --example background_cost -- 10      # 10 s idle
//! cargo run --release --example background_cost -- 60 50   # sleeping up to 50 intervals
//! ```

use std::time::{Duration, Instant};

use nodedb_mem::{EngineGuard, EngineId, GovernedAlloc, MemoryGovernor};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

/// User and system CPU time of the whole process, from `getrusage`, in microseconds.
fn cpu_us() -> (u64, u64) {
    // SAFETY: `rusage` is plain old data, for which all zeroes is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable `rusage`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    assert_eq!(rc, 0, "getrusage");
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (us(u.ru_utime), us(u.ru_stime))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let idle_secs: u64 = match std::env::args().nth(1) {
        None => 60,
        Some(s) => s
            .parse()
            .map_err(|e| format!("idle seconds {s:?}: {e} (expected a whole number)"))?,
    };
    let stretch: u32 = match std::env::args().nth(2) {
        None => nodedb_mem::BACKGROUND_STRETCH_MAX,
        Some(s) => s
            .parse()
            .map_err(|e| format!("stretch {s:?}: {e} (expected a whole number)"))?,
    };
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .background_stretch(stretch)
        .install()?;
    // Some live data in every engine, as in a running database.
    let _data: Vec<Vec<u8>> = EngineId::ALL
        .iter()
        .map(|&e| {
            let _g = EngineGuard::enter(e);
            vec![1u8; 8 << 20]
        })
        .collect();
    let n = 2000u32;
    let t = Instant::now();
    for _ in 0..n {
        gov.check_resident()?;
        gov.rebalance();
    }
    let full_tick = t.elapsed() / n;
    // Let the thread see the data settle before measuring.
    std::thread::sleep(Duration::from_millis(500));
    let before = gov.snapshot();
    let (u0, s0) = cpu_us();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(idle_secs));
    let (u1, s1) = cpu_us();
    let wall = t.elapsed().as_secs_f64();
    let after = gov.snapshot();
    let ticks = after.background_ticks - before.background_ticks;
    let refreshes = after.allocator_stats_refreshes - before.allocator_stats_refreshes;
    let cpu = (u1 - u0) + (s1 - s0);
    println!(
        "full resident check + rebalance, warm: {:.1} µs",
        full_tick.as_secs_f64() * 1e6
    );
    println!(
        "idle {wall:.1} s with the default {} ms background thread (sleeping up to {stretch} \
         intervals): {ticks} ticks, \
         {refreshes} statistics refreshes; CPU {:.1} ms (user {:.1}, system {:.1}) = {:.3} % \
         of a core, {:.1} µs per tick",
        nodedb_mem::DEFAULT_BACKGROUND_INTERVAL.as_millis(),
        cpu as f64 / 1e3,
        (u1 - u0) as f64 / 1e3,
        (s1 - s0) as f64 / 1e3,
        cpu as f64 / 1e4 / wall,
        cpu as f64 / ticks.max(1) as f64,
    );
    Ok(())
}
