//! Small-object churn, governed vs plain jemalloc, alternated in rounds in one process and on
//! one thread, without dynamic dispatch: the medians of 15 alternated rounds and their ratio.
//! Wall-clock figures on a shared 2-core VM scatter; alternating the two in one process is the
//! fairest comparison we can make. The governed allocator runs as users run it: a governor
//! installed with the defaults, its background thread included (`-- --no-background`: without
//! it). Run: `cargo bench -p nodedb-mem-benches --bench alternating`.

use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::time::Instant;

use nodedb_mem::{EngineGuard, EngineId, GovernedAlloc, MemoryGovernor};
use tikv_jemallocator::Jemalloc;

#[global_allocator]
static GLOBAL: GovernedAlloc = GovernedAlloc::new();
static JEMALLOC: Jemalloc = Jemalloc;

#[inline(never)]
fn churn<A: GlobalAlloc>(a: &A, layouts: &[Layout], ptrs: &mut [*mut u8], rounds: usize) {
    for _ in 0..rounds {
        for (p, &l) in ptrs.iter_mut().zip(layouts) {
            // SAFETY: non-zero sizes; freed below with the same layout.
            *p = unsafe { a.alloc(l) };
        }
        for (&p, &l) in ptrs.iter().zip(layouts) {
            // SAFETY: allocated above with this layout.
            unsafe { a.dealloc(black_box(p), l) };
        }
    }
}

fn ns_per_pair<A: GlobalAlloc>(a: &A, layouts: &[Layout], ptrs: &mut [*mut u8]) -> f64 {
    const ROUNDS: usize = 20_000;
    let start = Instant::now();
    churn(a, layouts, ptrs, ROUNDS);
    start.elapsed().as_nanos() as f64 / (ROUNDS * layouts.len()) as f64
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    let mut builder = MemoryGovernor::builder();
    let background = !std::env::args().any(|a| a == "--no-background");
    if !background {
        builder = builder.background(None);
    }
    builder.install().expect("install the governor");
    let layouts: Vec<Layout> = (0..64)
        .map(|i| Layout::from_size_align(16 + (i * 37) % 240, 8).expect("valid layout"))
        .collect();
    let mut ptrs = vec![std::ptr::null_mut(); layouts.len()];
    let _g = EngineGuard::enter(EngineId::Query);
    for _ in 0..1024 {
        drop(black_box(Box::new(0u64))); // make Query this thread's home engine
    }
    let (mut governed, mut jemalloc) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        governed.push(ns_per_pair(&GLOBAL, &layouts, &mut ptrs));
        jemalloc.push(ns_per_pair(&JEMALLOC, &layouts, &mut ptrs));
    }
    governed.sort_by(f64::total_cmp);
    jemalloc.sort_by(f64::total_cmp);
    let (g, j) = (governed[7], jemalloc[7]);
    println!(
        "small-object churn (16-256 B, 64 live), ns per alloc+free pair, median of 15 alternated rounds \
         (governor installed, {}):",
        if background {
            "defaults"
        } else {
            "no background thread"
        }
    );
    println!("  governed {g:.2}  (min {:.2})", governed[0]);
    println!("  jemalloc {j:.2}  (min {:.2})", jemalloc[0]);
    println!("  ratio    {:.3}", g / j);
}
