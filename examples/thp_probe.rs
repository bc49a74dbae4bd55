//! How much anonymous memory transparent huge pages add beyond what the engines hold, and what
//! keeping them out costs: fills Query with 812 MiB of mixed blocks, times 20 M random reads
//! over them, frees every other block, and prints resident memory, `AnonHugePages` and the
//! governed figures. Run under each `/sys/kernel/mm/transparent_hugepage/enabled` setting,
//! with and without `--no-huge-pages` (`GovernorBuilder::huge_pages(false)`):
//! `cargo run --release --example thp_probe -- --no-huge-pages`.

use nodedb_mem::{EngineGuard, EngineId, GovernedAlloc, MemoryGovernor};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

fn field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn main() {
    let huge = !std::env::args().any(|a| a == "--no-huge-pages");
    let gov = MemoryGovernor::builder()
        .global_ceiling(8u64 << 30)
        .huge_pages(huge)
        .install()
        .expect("install");
    let mib = |b: u64| b >> 20;
    let report = |what: &str| {
        nodedb_mem::flush_thread();
        let smaps = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
        println!(
            "{what:>10}: VmRSS(Rss) {} MiB, AnonHugePages {} MiB, Query {} MiB, jemalloc resident {} MiB",
            mib(field(&smaps, "Rss:")),
            mib(field(&smaps, "AnonHugePages:")),
            mib(gov.usage(EngineId::Query)),
            mib(gov
                .check_resident()
                .map(|s| s.allocator_resident)
                .unwrap_or(0)),
        );
    };
    let g = EngineGuard::enter(EngineId::Query);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut total = 0u64;
    while total < 800 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let size = 4096 + (x % (256 << 10)) as usize;
        blocks.push(vec![1u8; size]);
        total += size as u64;
    }
    report("filled");
    // Random reads across the data (what a vector search over a large index does): the cost
    // of TLB misses without huge pages.
    let started = std::time::Instant::now();
    let mut sum = 0u64;
    for _ in 0..20_000_000u32 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = &blocks[(x % blocks.len() as u64) as usize];
        sum += u64::from(b[((x >> 32) as usize) % b.len()]);
    }
    println!(
        "20 M random reads: {} ms (sum {sum})",
        started.elapsed().as_millis()
    );
    let mut i = 0;
    blocks.retain(|_| {
        i += 1;
        i % 2 == 0
    });
    report("half freed");
    std::thread::sleep(std::time::Duration::from_secs(12));
    report("after 12 s");
    drop(blocks);
    drop(g);
}
