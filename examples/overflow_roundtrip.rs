//! Writes twice the ceiling of live data in one engine and reads it back, either through
//! overflow (a budget of an eighth of the ceiling, so most of it lives in the engine's overflow
//! region and is pushed out as it grows) or held in the engine's normal arena (a budget and a
//! ceiling large enough for all of it). Prints one line of figures; `docs/benchmarks.md` has
//! the alternated runs.
//!
//! ```sh
//! cargo run --release --example overflow_roundtrip -- overflow
//! cargo run --release --example overflow_roundtrip -- arena
//! ```

use std::time::Instant;

use nodedb_mem::{EngineGuard, EngineId, GovernedAlloc, MemoryGovernor, OverflowConfig};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const MIB: usize = 1 << 20;
const CEILING: u64 = 512 << 20;
const BLOCK: usize = 64 * 1024;

fn status_mib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        / 1024
}

fn main() -> nodedb_mem::Result<()> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "overflow".into());
    let total = 2 * CEILING as usize;
    let dir = std::env::current_dir().map_err(|source| nodedb_mem::MemError::Io {
        what: "reading the current directory".into(),
        source,
    })?;
    let builder = MemoryGovernor::builder().overflow(OverflowConfig::in_dir(&dir));
    let gov = match mode.as_str() {
        "overflow" => builder
            .global_ceiling(CEILING)
            .budget(EngineId::Query, CEILING / 8),
        "arena" => builder
            .global_ceiling(4 * CEILING)
            .budget(EngineId::Query, 3 * CEILING),
        other => {
            eprintln!("unknown mode {other:?}: expected `overflow` or `arena`");
            std::process::exit(2);
        }
    }
    .install()?;

    let n = total / BLOCK;
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(n);
    let t = Instant::now();
    for i in 0..n {
        let _g = EngineGuard::enter(EngineId::Query);
        blocks.push(vec![i as u8; BLOCK]);
    }
    let write = t.elapsed();
    let peak = status_mib("VmHWM:");
    let t = Instant::now();
    let mut sum = 0u64;
    for b in &blocks {
        sum += b.iter().step_by(512).map(|&x| u64::from(x)).sum::<u64>();
    }
    let read = t.elapsed();
    let push = nodedb_mem::push_out_stats(EngineId::Query);
    println!(
        "{mode}: {} MiB written in {:.3} s ({:.2} GB/s), read back in {:.3} s ({:.2} GB/s); \
         VmHWM {peak} MiB after writing; overflow {} MiB; push-outs {} over {} MiB in {} ms; \
         checksum {sum}",
        total / MIB,
        write.as_secs_f64(),
        total as f64 / write.as_secs_f64() / 1e9,
        read.as_secs_f64(),
        total as f64 / read.as_secs_f64() / 1e9,
        gov.budget(EngineId::Query).overflow_bytes() >> 20,
        push.calls,
        push.bytes >> 20,
        push.nanos / 1_000_000
    );
    drop(blocks);
    Ok(())
}
