//! Checks that attribution works in the environment this runs in (an address-space limit,
//! valgrind): the engine arenas exist, and 100 MiB allocated under a Query guard are charged
//! to Query (past a small range, in the shared fallback range, still Query's; beyond that too,
//! counted as fallbacks charged to `Unattributed`). Prints the range each engine got
//! and exits 0, or prints why not and exits 1.
//!
//! ```text
//! cargo build -p nodedb-mem-alloc --example attribution_check
//! (ulimit -v 8000000; target/debug/examples/attribution_check)
//! valgrind target/debug/examples/attribution_check
//! ```

use nodedb_mem_alloc::{
    EngineGuard, EngineId, GovernedAlloc, ctl::arenas::arena_failure, ctl::arenas::arenas_ready,
    ctl::arenas::range_bytes, ctl::arenas::range_fallbacks, ctl::ledger::charged,
    ctl::thread::flush_thread,
};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const MIB: usize = 1 << 20;

fn main() {
    let q = EngineId::Query;
    {
        let _g = EngineGuard::enter(q);
        drop(Box::new(0u8));
    }
    if !arenas_ready() {
        match arena_failure() {
            Some(why) => println!("attribution check: no engine arenas: {why}"),
            None => println!("attribution check: no engine arenas"),
        }
        std::process::exit(1);
    }
    flush_thread();
    let before = charged(q);
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(100);
    {
        let _g = EngineGuard::enter(q);
        blocks.extend((0..100).map(|i| vec![i as u8; MIB]));
    }
    flush_thread();
    let fell = range_fallbacks(q);
    let attributed = charged(q) - before + fell.unattributed_bytes;
    let intact = blocks
        .iter()
        .enumerate()
        .all(|(i, b)| b.iter().all(|&x| x == i as u8));
    println!(
        "attribution check: range {} MiB per engine, {} of {} bytes attributed to query ({} \
         outside its range, {} of them unattributed), data intact: {intact}",
        range_bytes() / MIB,
        attributed,
        100 * MIB,
        fell.bytes,
        fell.unattributed_bytes
    );
    drop(blocks);
    flush_thread();
    if attributed != (100 * MIB) as u64 || !intact || charged(q) != before {
        std::process::exit(1);
    }
}
