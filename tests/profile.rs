//! Heap profiles per engine through an installed governor: sites found by name, the sampled
//! estimate against the exact ledger, the pprof, folded and flame-graph outputs, and blocks
//! freed on another thread leaving the profile. This binary installs `GovernedAlloc`.

use std::io::Read as _;
use std::sync::OnceLock;

use nodedb_mem::{
    EngineGuard, EngineId, EventKind, GovernedAlloc, HeapProfile, MemError, MemoryGovernor,
    TopSites,
};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const KIB: usize = 1 << 10;

fn gov() -> &'static MemoryGovernor {
    static GOV: OnceLock<&'static MemoryGovernor> = OnceLock::new();
    GOV.get_or_init(|| {
        MemoryGovernor::builder()
            .global_ceiling(8 << 30)
            .background(None)
            .install()
            .expect("install")
    })
}

#[inline(never)]
fn query_rows(n: usize) -> Vec<Vec<u8>> {
    // Not a tail call: the site keeps its own frame in optimised builds too.
    std::hint::black_box((0..n).map(|i| vec![i as u8; 4 * KIB]).collect())
}

#[inline(never)]
fn vector_index(n: usize) -> Vec<Vec<u8>> {
    // Not a tail call: the site keeps its own frame in optimised builds too.
    std::hint::black_box((0..n).map(|i| vec![i as u8; 4 * KIB]).collect())
}

#[inline(never)]
fn query_hash_table(n: usize) -> Vec<Vec<u8>> {
    // Not a tail call: the site keeps its own frame in optimised builds too.
    std::hint::black_box((0..n).map(|i| vec![i as u8; 8 * KIB]).collect())
}

fn share(p: &HeapProfile, name: &str) -> f64 {
    let total: f64 = p.sites.iter().map(|s| s.bytes).sum();
    p.sites
        .iter()
        .filter(|s| s.frames.iter().any(|f| f.function.contains(name)))
        .map(|s| s.bytes)
        .sum::<f64>()
        / total
}

#[test]
fn profiles_name_each_engines_sites_match_the_ledger_and_write_every_format() {
    let gov = gov();
    assert_eq!(
        gov.heap_profiling(),
        nodedb_mem::DEFAULT_HEAP_PROFILE_INTERVAL
    );
    gov.set_heap_profiling(16 * KIB as u64);
    let rows = {
        let _g = EngineGuard::enter(EngineId::Query);
        query_rows(25 * 1024) // 100 MiB
    };
    let index = {
        let _g = EngineGuard::enter(EngineId::Vector);
        vector_index(5 * 1024) // 20 MiB
    };
    let maps = mappings_of_this_binary();
    let q = gov.heap_profile(Some(EngineId::Query));
    let v = gov.heap_profile(Some(EngineId::Vector));
    assert_eq!(
        mappings_of_this_binary(),
        maps,
        "the symbol reader kept the binary"
    );
    let err = q.error().unwrap();
    println!(
        "query: {} sites, sampled {:.0} B, exact {} B, error {:.2} %; top: {}",
        q.sites.len(),
        q.estimated_bytes(),
        q.exact_bytes,
        err * 100.0,
        q.sites[0].name()
    );
    assert!(q.exact_bytes >= 100 << 20);
    assert!(err.abs() < 0.05, "{err}");
    // Scaled to the ledger, the sites add up to it.
    let scaled: f64 = q.sites.iter().map(|s| s.bytes).sum();
    assert!((scaled - q.exact_bytes as f64).abs() < 1.0, "{scaled}");
    assert!(share(&q, "query_rows") >= 0.95);
    assert!(
        q.sites[0].name().contains("query_rows"),
        "{}",
        q.sites[0].name()
    );
    // By function: the site's stacks merged, the largest first, the bytes all kept.
    let f = q.by_function();
    assert!(f[0].function.contains("query_rows"), "{f:?}");
    assert!(f[0].bytes >= 0.95 * q.exact_bytes as f64, "{f:?}");
    assert!(f.windows(2).all(|w| w[0].bytes >= w[1].bytes), "{f:?}");
    let merged: f64 = f.iter().map(|r| r.bytes).sum();
    assert!((merged - scaled).abs() < 1.0, "{merged} against {scaled}");
    assert_eq!(
        f.iter().map(|r| r.samples).sum::<usize>(),
        q.sites.iter().map(|s| s.samples).sum::<usize>()
    );
    assert_eq!(f.iter().map(|r| r.sites).sum::<usize>(), q.sites.len());
    assert!(share(&v, "vector_index") >= 0.95);
    assert_eq!(share(&v, "query_rows"), 0.0);
    assert!(q.sites.iter().all(|s| s.engine == EngineId::Query));
    // No frame of the allocator or the sampler is left at the top of a stack.
    assert!(q.sites.iter().all(|s| s.frames.first().is_none_or(|f| {
        !f.function.starts_with("nodedb_mem_alloc::") && !f.function.starts_with("backtrace::")
    })));

    // pprof: gzip, a protobuf naming the site and its engine.
    let pprof = q.to_pprof();
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&pprof[..])
        .read_to_end(&mut raw)
        .unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(text.contains("inuse_space") && text.contains("query_rows"));
    assert!(text.contains("engine") && text.contains("query"));
    // Folded stacks: a line per site, engine first, bytes last.
    let folded = q.to_folded();
    assert_eq!(folded.lines().count(), q.sites.len());
    assert!(folded.lines().all(|l| l.starts_with("query;")));
    let sum: u64 = folded
        .lines()
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert!(sum.abs_diff(q.exact_bytes) <= q.sites.len() as u64);
    // The flame graph.
    let svg = String::from_utf8(q.to_flamegraph_svg().unwrap()).unwrap();
    assert!(svg.starts_with("<?xml") && svg.contains("query_rows"));

    // Freed on another thread: gone from the profile, the ledger back.
    std::thread::spawn(move || drop(rows)).join().unwrap();
    let after = gov.heap_profile(Some(EngineId::Query));
    assert!(
        after
            .sites
            .iter()
            .all(|s| !s.frames.iter().any(|f| f.function.contains("query_rows"))),
        "{:?}",
        after.top(3)
    );
    drop(index);
    gov.set_heap_profiling(0);
}

/// How many mappings of this test's own binary the process has (the loader's segments, and a
/// whole-file mapping while a symbol reader keeps the binary open).
fn mappings_of_this_binary() -> usize {
    let exe = std::fs::read_link("/proc/self/exe").unwrap();
    let exe = exe.to_str().unwrap();
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.ends_with(exe))
        .count()
}

/// Refuses a reservation of one byte over Query's limit and returns the refusal's event's
/// top sites.
fn refuse_query(gov: &MemoryGovernor) -> TopSites {
    let limit = gov.limit(EngineId::Query);
    let err = gov.reserve(EngineId::Query, limit + 1).unwrap_err();
    assert!(matches!(err, MemError::BudgetExceeded { .. }), "{err}");
    gov.snapshot()
        .events
        .iter()
        .rev()
        .find_map(|e| match e.kind {
            EventKind::BudgetRejected {
                engine: EngineId::Query,
                requested,
                top,
                ..
            } if requested == limit + 1 => Some(top),
            _ => None,
        })
        .expect("the refusal's event")
}

#[test]
fn a_budget_refusal_carries_the_engines_top_sites() {
    let gov = gov();
    gov.set_heap_profiling(16 * KIB as u64);
    let (table, rows) = {
        let _g = EngineGuard::enter(EngineId::Query);
        (query_hash_table(8 * 1024), query_rows(2 * 1024)) // 64 MiB, 8 MiB
    };
    // Refused under Query's own guard: the first lookup reads the binary's symbols, and the
    // reader's caches, kept for the life of the process, are not charged to Query.
    nodedb_mem::flush_thread();
    let maps = mappings_of_this_binary();
    let before = gov.usage(EngineId::Query);
    let t0 = std::time::Instant::now();
    let top = {
        let _g = EngineGuard::enter(EngineId::Query);
        refuse_query(gov)
    };
    println!("first refusal with top sites: {:?}", t0.elapsed());
    nodedb_mem::flush_thread();
    let grew = gov.usage(EngineId::Query) as i64 - before as i64;
    assert!(grew < 64 << 10, "Query grew by {grew} B");
    // The symbol reader gave the binary back (it kept it mapped, its symbols resident, for
    // the life of the process).
    assert_eq!(mappings_of_this_binary(), maps);
    println!("top sites: {top}");
    let sites: Vec<_> = top.iter().collect();
    assert!(sites.len() >= 2, "{top}");
    assert!(sites[0].function.contains("query_hash_table"), "{top}");
    assert!(sites[1].function.contains("query_rows"), "{top}");
    let table_bytes = 64u64 << 20;
    assert!(
        sites[0].bytes.abs_diff(table_bytes) < table_bytes / 20,
        "{top}"
    );

    // Within a second the same sites are reported again, without a new scan.
    drop(table);
    let t1 = std::time::Instant::now();
    assert_eq!(refuse_query(gov), top);
    println!("second refusal: {:?}", t1.elapsed());
    // A second on, they are computed again: the table is gone.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let t2 = std::time::Instant::now();
    let later = refuse_query(gov);
    println!("third refusal, recomputed: {:?}", t2.elapsed());
    assert!(
        later.first().unwrap().function.contains("query_rows"),
        "{later}"
    );
    drop(rows);
    gov.set_heap_profiling(0);
}

#[test]
fn samples_taken_at_a_peak_resolve_into_that_moments_profile_after_the_blocks_are_freed() {
    let gov = gov();
    gov.set_heap_profiling(16 * KIB as u64);
    let rows = {
        let _g = EngineGuard::enter(EngineId::Query);
        query_rows(10 * 1024) // 40 MiB
    };
    let at_peak = gov.heap_samples(Some(EngineId::Query));
    assert_eq!(at_peak.engine(), Some(EngineId::Query));
    assert!(at_peak.len() > 100, "{}", at_peak.len());
    let exact = at_peak.exact_bytes();
    assert!(exact >= 40 << 20, "{exact}");
    std::thread::spawn(move || drop(rows)).join().unwrap();
    // Freed since: gone from a profile taken now, there in the one taken at the peak.
    let now = gov.heap_profile(Some(EngineId::Query));
    assert!(share(&now, "query_rows").is_nan() || share(&now, "query_rows") < 0.01);
    let then = at_peak.resolve();
    assert_eq!(then.exact_bytes, exact);
    assert!(share(&then, "query_rows") >= 0.95, "{:?}", then.top(3));
    assert!(then.error().unwrap().abs() < 0.10, "{:?}", then.error());
    gov.set_heap_profiling(0);
}

#[inline(never)]
fn tenant_rows(n: usize) -> Vec<Vec<u8>> {
    // Not a tail call: the site keeps its own frame in optimised builds too.
    std::hint::black_box((0..n).map(|i| vec![i as u8; 4 * KIB]).collect())
}

#[test]
fn samples_carry_the_scope_the_thread_was_tagged_with() {
    let gov = gov();
    gov.set_heap_profiling(16 * KIB as u64);
    let sales = gov.create_scope("sales", None, 1 << 30).unwrap();
    let acme = gov.create_scope("acme", Some(&sales), 1 << 30).unwrap();
    let (acme_rows, sales_rows, plain_rows) = {
        let _g = EngineGuard::enter(EngineId::Query);
        let _sales = sales.tag_thread();
        let sales_rows = query_rows(2 * 1024); // 8 MiB
        let acme_rows = {
            let _acme = acme.tag_thread();
            tenant_rows(4 * 1024) // 16 MiB
        };
        // Back under `sales` once the inner tag drops, and untagged after the outer.
        (acme_rows, sales_rows, {
            drop(_sales);
            query_hash_table(512) // 4 MiB
        })
    };
    let p = gov.heap_profile(Some(EngineId::Query));
    let scope_of = |name: &str| -> Vec<(Option<u64>, Option<&str>)> {
        p.sites
            .iter()
            .filter(|s| s.frames.iter().any(|f| f.function.contains(name)))
            .map(|s| (s.scope.map(|id| id.get()), s.scope_path.as_deref()))
            .collect()
    };
    let (a, s, u) = (
        scope_of("tenant_rows"),
        scope_of("query_rows"),
        scope_of("query_hash_table"),
    );
    assert!(!a.is_empty() && !s.is_empty() && !u.is_empty());
    assert!(
        a.iter()
            .all(|&x| x == (Some(acme.id().get()), Some("sales/acme"))),
        "{a:?}"
    );
    assert!(
        s.iter()
            .all(|&x| x == (Some(sales.id().get()), Some("sales"))),
        "{s:?}"
    );
    assert!(u.iter().all(|&x| x == (None, None)), "{u:?}");
    let acme_bytes = p.scope_bytes(acme.id());
    assert!(
        (acme_bytes - (16 << 20) as f64).abs() < (16 << 20) as f64 * 0.15,
        "{acme_bytes}"
    );
    // In the outputs: a folded frame and a pprof label.
    assert!(p.to_folded().contains("query;scope:sales/acme;"));
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&p.to_pprof()[..])
        .read_to_end(&mut raw)
        .unwrap();
    assert!(String::from_utf8_lossy(&raw).contains("sales/acme"));
    drop((acme_rows, sales_rows, plain_rows));
    gov.set_heap_profiling(0);
}
