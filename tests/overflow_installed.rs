//! The governor with overflow: an engine driven past its budget by ordinary allocations keeps
//! its resident usage at the limit, the excess lives in overflow, and everything comes back.

use nodedb_mem::{
    EngineGuard, EngineId, GovernedAlloc, MemoryGovernor, OverflowConfig, PressureLevel,
    RebalanceConfig, flush_thread,
};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const MIB: u64 = 1 << 20;

#[test]
fn an_engine_past_its_budget_overflows_and_recovers() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .budget(EngineId::Query, 16 * MIB)
        .rebalance(RebalanceConfig {
            min_move: 1,
            ..Default::default()
        })
        .overflow(OverflowConfig::in_dir(dir.path()))
        .background(None) // this test rebalances by hand, at the moment it chooses
        .install()
        .unwrap();
    let q = EngineId::Query;
    flush_thread();
    let base = gov.usage(q);

    // 32 MiB of ordinary Vec<u8> allocations, 4 KiB each, past a 16 MiB budget; resident
    // usage is checked all along the way, not only at the end.
    let mut rows: Vec<Vec<u8>> = Vec::with_capacity(8192);
    for i in 0..8192 {
        {
            let _g = EngineGuard::enter(q);
            rows.push(vec![(i % 256) as u8; 4096]);
        }
        if i % 128 == 0 {
            flush_thread();
            let resident = gov.usage(q) - base;
            assert!(
                resident <= 16 * MIB + 4096,
                "resident {resident} above the limit at {i}"
            );
        }
    }
    flush_thread();
    let resident = gov.usage(q) - base;
    let overflow = gov.budget(q).overflow_bytes();
    assert!(
        resident <= 16 * MIB + 64 * 1024,
        "resident {resident} above the limit"
    );
    assert!(overflow >= 15 * MIB, "overflow {overflow}");
    assert!(nodedb_mem::is_overflowing(q));
    assert!(
        rows.iter()
            .enumerate()
            .all(|(i, r)| r.iter().all(|&b| b == (i % 256) as u8))
    );
    // Overflow counts in the engine's pressure, and in the metrics.
    assert_eq!(gov.pressure(q), PressureLevel::Emergency);
    let snap = gov.snapshot();
    assert_eq!(snap.engine(q).overflow_bytes, overflow);
    let line = format!("nodedb_mem_engine_overflow_bytes{{engine=\"query\"}} {overflow}");
    let text = gov.prometheus();
    assert!(text.contains(&line), "{line}");
    assert!(text.contains("nodedb_mem_overflow_breaches_total 0"));

    // Rebalancing raises Query's limit (idle engines lend): new allocations are resident again.
    gov.rebalance();
    assert!(gov.limit(q) > 32 * MIB, "limit {}", gov.limit(q));
    assert!(!nodedb_mem::is_overflowing(q));
    let fresh = {
        let _g = EngineGuard::enter(q);
        vec![0u8; 4096]
    };
    assert!(!nodedb_mem::is_overflow(fresh.as_ptr()));

    drop((rows, fresh));
    flush_thread();
    assert_eq!(gov.usage(q), base);
    assert_eq!(gov.budget(q).overflow_bytes(), 0);
    assert_eq!(nodedb_mem::overflow_stats().breaches, 0);
}

#[test]
fn a_bad_overflow_directory_is_refused_before_anything_is_installed() {
    let err = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .overflow(OverflowConfig::in_dir("/nonexistent/overflow"))
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration `overflow.dir` = /nonexistent/overflow: not a directory"
    );
    let err = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .overflow(OverflowConfig {
            capacity: Some(nodedb_mem::Size::Bytes(8 << 40)),
            ..Default::default()
        })
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration `overflow.capacity` = 8 TiB: above the 4 TiB an engine's overflow range holds"
    );
    // Within what any range holds, but above this process's range: refused by `install`,
    // which installs nothing.
    {
        let _g = nodedb_mem::EngineGuard::enter(EngineId::Query);
        drop(Box::new(0u8)); // creates the arenas and so decides the range
    }
    let range = nodedb_mem::range_bytes() as u64;
    assert!(range > 0);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let err = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .overflow(OverflowConfig {
            capacity: Some(nodedb_mem::Size::Bytes(2 * range)),
            ..OverflowConfig::in_dir(dir.path())
        })
        .install()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "invalid configuration `overflow.capacity` = {}: above the {} each engine's overflow \
             range holds in this process (set at start-up from physical memory and the \
             address-space limit; see NODEDB_MEM_RANGE_BYTES)",
            nodedb_mem::ByteSize(2 * range),
            nodedb_mem::ByteSize(range)
        )
    );
    assert!(nodedb_mem::installed().is_none());
}
