//! Checks that a process with an installed governor runs and exits where it runs (an
//! address-space limit, valgrind): `install()` with its defaults, 100 MiB allocated under a
//! Query guard and charged to Query (or, past a small range, counted as fallbacks), freed, and
//! `process::exit(0)` with the background thread running. Prints what it saw and exits 0, or
//! prints why not and exits 1.
//!
//! ```text
//! cargo build --example installed_check
//! valgrind target/debug/examples/installed_check
//! ```

use nodedb_mem::{EngineGuard, EngineId, GovernedAlloc, MemoryGovernor, flush_thread};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const MIB: usize = 1 << 20;

fn main() {
    let gov = match MemoryGovernor::builder().allow_unattributed(true).install() {
        Ok(gov) => gov,
        Err(e) => {
            println!("installed check: install failed: {e}");
            std::process::exit(1);
        }
    };
    let q = EngineId::Query;
    flush_thread();
    let before = gov.usage(q) + gov.budget(q).overflow_bytes();
    // The list itself outside the guard: only the 100 blocks are Query's.
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(100);
    {
        let _g = EngineGuard::enter(q);
        blocks.extend((0..100).map(|i| vec![i as u8; MIB]));
    }
    flush_thread();
    let charged = gov.usage(q) + gov.budget(q).overflow_bytes() - before
        + nodedb_mem::range_fallbacks(q).unattributed_bytes;
    let intact = blocks
        .iter()
        .enumerate()
        .all(|(i, b)| b.iter().all(|&x| x == i as u8));
    drop(blocks);
    flush_thread();
    let after = gov.usage(q) + gov.budget(q).overflow_bytes();
    println!(
        "installed check: {charged} of {} bytes charged to query, data intact: {intact}, back \
         to {after} of {before} bytes",
        100 * MIB
    );
    let ok = (nodedb_mem::arena_failure().is_some() || charged == (100 * MIB) as u64)
        && intact
        && after == before;
    std::process::exit(if ok { 0 } else { 1 });
}
