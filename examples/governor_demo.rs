//! A small tour of the governor: budgets, a refused reservation, pressure levels and a
//! rebalancing step, ending with a verdict. Run with
//! `cargo run --release --example governor_demo`.

use std::process::ExitCode;

use nodedb_mem::{
    ByteSize, EngineGuard, EngineId, GovernedAlloc, MemoryGovernor, PressureLevel, RebalanceConfig,
    flush_thread,
};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn table(gov: &MemoryGovernor) {
    println!(
        "  {:<13} {:>12} {:>12} {:>12} {:>10}",
        "engine", "usage", "limit", "peak", "pressure"
    );
    for e in gov.snapshot().engines {
        println!(
            "  {:<13} {:>12} {:>12} {:>12} {:>10}",
            e.engine.name(),
            mib(e.usage),
            mib(e.limit),
            mib(e.peak),
            e.pressure.name()
        );
    }
}

fn run() -> nodedb_mem::Result<bool> {
    const MIB: u64 = 1 << 20;
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .rebalance(RebalanceConfig::default())
        .install()?;
    println!(
        "ceiling {} ({}); default budgets keep 10% for allocator overhead:",
        ByteSize(gov.ceiling()),
        gov.ceiling_source()
    );
    table(gov);

    let mut checks = Vec::new();

    println!("\nThe vector engine loads 100,000 vectors of 128 f32 (one 512 B block each):");
    let before = gov.usage(EngineId::Vector);
    let vectors: Vec<Vec<f32>> = {
        let _g = EngineGuard::enter(EngineId::Vector);
        (0..100_000u32)
            .map(|i| (0..128).map(|d| (i * 31 + d) as f32).collect())
            .collect()
    };
    flush_thread();
    let charged = gov.usage(EngineId::Vector) - before;
    // 100,000 blocks of 512 B plus the outer vector of 100,000 × 24 B (2,400,000 B, page-rounded).
    let expected = 100_000 * 512 + 2_400_256;
    println!(
        "  vector usage grew by {} (expected {}: the blocks' size classes)",
        ByteSize(charged),
        ByteSize(expected)
    );
    checks.push((
        "the allocator charged the vector engine exactly",
        charged == expected,
    ));
    drop(vectors);
    flush_thread();
    checks.push((
        "freeing gave it all back",
        gov.usage(EngineId::Vector) == before,
    ));

    let query_limit = gov.limit(EngineId::Query);

    println!("\nA GROUP BY reserves memory for its hash table in 32 MiB steps:");
    let mut table_mem = gov.reserve(EngineId::Query, 0)?;
    let refusal = loop {
        match table_mem.try_grow(32 * MIB) {
            Ok(()) => continue,
            Err(e) => break e,
        }
    };
    println!("  refused at {}: {refusal}", ByteSize(table_mem.size()));
    println!("  -> the operator spills to disk instead of growing");
    checks.push((
        "the reservation was refused at the budget",
        refusal.is_over_budget(),
    ));
    checks.push((
        "usage never passed the limit",
        gov.budget(EngineId::Query).peak() <= query_limit,
    ));

    let level = gov.pressure(EngineId::Query);
    println!("  query pressure: {level}");
    checks.push((
        "query pressure is critical or above",
        level >= PressureLevel::Critical,
    ));

    println!("\nThe other engines are idle; one rebalancing step lends their headroom:");
    let report = gov.rebalance();
    for m in &report.moves {
        println!("  {} -> {}: {}", m.from, m.to, ByteSize(m.bytes));
    }
    let relieved = gov.pressure(EngineId::Query);
    println!(
        "  query limit {} -> {}, pressure {level} -> {relieved}",
        ByteSize(query_limit),
        ByteSize(gov.limit(EngineId::Query))
    );
    checks.push((
        "the rebalancer raised the query limit",
        gov.limit(EngineId::Query) > query_limit,
    ));
    let total: u64 = EngineId::ALL.iter().map(|&e| gov.limit(e)).sum();
    checks.push((
        "limits still sum to at most the ceiling",
        total <= gov.ceiling(),
    ));

    drop(table_mem);
    println!("\nAfter the query finishes:");
    table(gov);
    checks.push((
        "every reserved byte came back",
        gov.budget(EngineId::Query).reserved() == 0,
    ));
    checks.push(("the ledger is consistent", gov.check_consistency().is_ok()));

    println!("\nVerdict:");
    let mut pass = true;
    for (what, ok) in checks {
        println!("  [{}] {what}", if ok { "PASS" } else { "FAIL" });
        pass &= ok;
    }
    println!("{}", if pass { "PASS" } else { "FAIL" });
    Ok(pass)
}
