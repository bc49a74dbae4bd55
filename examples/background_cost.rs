//! What the governor's background thread costs: the time of one tick's work
//! (`check_resident` + `rebalance`) measured on this thread, and the CPU time the process uses
//! while it sits idle for 10 s with the default background thread running.
//!
//! ```sh
//! cargo run --release --example background_cost
//! ```

use std::time::{Duration, Instant};

use nodedb_mem::{EngineGuard, EngineId, GovernedAlloc, MemoryGovernor};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

/// User + system CPU time of the whole process, from `/proc/self/stat` (clock ticks of 10 ms).
fn cpu_ms() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 14th, stime 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) * 10
}

fn main() -> nodedb_mem::Result<()> {
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
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
    let per_tick = t.elapsed() / n;
    let before = cpu_ms();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    let idle_cpu = cpu_ms() - before;
    println!(
        "one tick (check_resident + rebalance): {:.1} µs; idle for {:.1} s with the default \
         {} ms background thread: {idle_cpu} ms of CPU ({:.2} %)",
        per_tick.as_secs_f64() * 1e6,
        t.elapsed().as_secs_f64(),
        nodedb_mem::DEFAULT_BACKGROUND_INTERVAL.as_millis(),
        idle_cpu as f64 / t.elapsed().as_secs_f64() / 10.0
    );
    Ok(())
}
