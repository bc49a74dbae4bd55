//! The governor through its public API: reservations, refusals, pressure, rebalancing,
//! snapshots, Prometheus text and tracing events.

use std::thread;

use nodedb_mem::{
    EngineId, EventKind, MemError, MemoryGovernor, PressureLevel, RebalanceConfig, RebalanceMove,
    Size,
};

mod common;
use common::{MIB, two_big_engines as gov};

#[test]
fn every_engine_has_a_budget_from_the_first_instant() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(64 * MIB)
        .build()
        .unwrap();
    for e in EngineId::ALL {
        assert!(gov.limit(e) > 0, "{e}");
        let r = gov.reserve(e, 4096).unwrap();
        assert_eq!(gov.usage(e), 4096);
        drop(r);
    }
    let total: u64 = EngineId::ALL.iter().map(|&e| gov.limit(e)).sum();
    assert!(total <= gov.ceiling());
    gov.check_consistency().unwrap();
}

#[test]
fn refusal_is_deterministic_and_leaves_the_ledger_unchanged() {
    let gov = gov();
    let r = gov.reserve(EngineId::Query, 30 * MIB).unwrap();
    let err = gov.reserve(EngineId::Query, 11 * MIB).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot reserve 11 MiB for engine query: 30 MiB already used of its 40 MiB limit, 10 MiB available"
    );
    assert!(matches!(
        err,
        MemError::BudgetExceeded { engine: EngineId::Query, requested, used, limit, available }
            if requested == 11 * MIB && used == 30 * MIB && limit == 40 * MIB && available == 10 * MIB
    ));
    assert_eq!(gov.usage(EngineId::Query), 30 * MIB);
    assert_eq!(gov.budget(EngineId::Query).rejections(), 1);
    // Exactly what is left still fits.
    let rest = gov.reserve(EngineId::Query, 10 * MIB).unwrap();
    assert_eq!(gov.budget(EngineId::Query).available(), 0);
    drop((r, rest));
    assert_eq!(gov.usage(EngineId::Query), 0);
    assert_eq!(gov.budget(EngineId::Query).peak(), 40 * MIB);
    gov.check_consistency().unwrap();
}

#[test]
fn the_ceiling_refuses_what_the_engine_limit_would_allow() {
    let gov = gov();
    // Implicit charges (allocations) can go past budgets; the ceiling then stops reservations.
    gov.charge(EngineId::Unattributed, 70 * MIB);
    let err = gov.reserve(EngineId::Query, 31 * MIB).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot reserve 31 MiB for engine query: the process already uses 70 MiB of its 100 MiB global ceiling, 30 MiB available"
    );
    assert!(err.is_over_budget());
    // The engine's own admission was undone.
    assert_eq!(gov.usage(EngineId::Query), 0);
    assert_eq!(gov.budget(EngineId::Query).available(), 40 * MIB);
    assert_eq!(gov.budget(EngineId::Query).rejections(), 1);
    let r = gov.reserve(EngineId::Query, 30 * MIB).unwrap();
    assert_eq!(gov.global_usage(), 100 * MIB);
    drop(r);
    gov.credit(EngineId::Unattributed, 70 * MIB).unwrap();
    assert_eq!(gov.global_usage(), 0);
    gov.check_consistency().unwrap();
}

#[test]
fn reservations_grow_shrink_split_and_free() {
    let gov = gov();
    let mut r = gov.reserve(EngineId::Vector, 0).unwrap();
    assert_eq!(r.size(), 0);
    r.try_grow(10 * MIB).unwrap();
    r.try_resize(25 * MIB).unwrap();
    let err = r.try_grow(16 * MIB).unwrap_err();
    assert!(matches!(err, MemError::BudgetExceeded { .. }));
    assert_eq!(r.size(), 25 * MIB, "a refused growth keeps what was held");
    let part = r.split(5 * MIB).unwrap();
    assert_eq!(
        (r.size(), part.size(), part.engine()),
        (20 * MIB, 5 * MIB, EngineId::Vector)
    );
    let err = r.shrink(21 * MIB).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot take 21 MiB from a reservation of 20 MiB for engine vector"
    );
    let err = r.split(21 * MIB).unwrap_err();
    assert!(
        matches!(err, MemError::ReservationTooSmall { requested, reserved, .. }
        if requested == 21 * MIB && reserved == 20 * MIB)
    );
    r.try_resize(2 * MIB).unwrap();
    assert_eq!(gov.usage(EngineId::Vector), 7 * MIB);
    assert_eq!(r.free(), 2 * MIB);
    assert_eq!(r.free(), 0);
    drop(part);
    assert_eq!(gov.usage(EngineId::Vector), 0);
    assert_eq!(gov.budget(EngineId::Vector).reserved(), 0);
    gov.check_consistency().unwrap();
}

#[test]
fn over_release_is_a_caught_bug_not_a_clamp() {
    let gov = gov();
    gov.charge(EngineId::Crdt, 1000);
    let err = gov.credit(EngineId::Crdt, 1001).unwrap_err();
    assert_eq!(
        err.to_string(),
        "engine crdt: cannot release 1001 B, only 1000 B is charged to it"
    );
    assert_eq!(gov.usage(EngineId::Crdt), 1000);
    assert_eq!(gov.budget(EngineId::Crdt).over_releases(), 1);
    gov.credit(EngineId::Crdt, 1000).unwrap();
    assert!(gov.credit(EngineId::Crdt, 1).is_err());
    assert_eq!(gov.usage(EngineId::Crdt), 0);
    gov.check_consistency().unwrap();
}

#[test]
fn pressure_rises_at_thresholds_and_falls_with_hysteresis() {
    let gov = gov(); // Query limit 40 MiB: warning 28, critical 34, emergency 38, hysteresis 2 MiB
    let q = EngineId::Query;
    assert_eq!(gov.pressure(q), PressureLevel::Normal);
    gov.charge(q, 34 * MIB);
    assert_eq!(gov.pressure(q), PressureLevel::Critical);
    gov.credit(q, 1).unwrap(); // one byte below the critical threshold
    assert_eq!(gov.pressure(q), PressureLevel::Critical);
    gov.credit(q, 2 * MIB - 1).unwrap(); // 32 MiB: still inside the band
    assert_eq!(gov.pressure(q), PressureLevel::Critical);
    gov.credit(q, 1).unwrap(); // below 80 %
    assert_eq!(gov.pressure(q), PressureLevel::Warning);
    gov.charge(q, 10 * MIB);
    assert_eq!(gov.pressure(q), PressureLevel::Emergency);
    gov.credit(q, 42 * MIB - 1).unwrap();
    assert_eq!(gov.pressure(q), PressureLevel::Normal);
    assert_eq!(gov.budget(q).pressure_transitions(), 4);

    // The global level follows the process's usage against the ceiling.
    assert_eq!(gov.global_pressure(), PressureLevel::Normal);
    gov.charge(EngineId::Unattributed, 96 * MIB);
    assert_eq!(gov.global_pressure(), PressureLevel::Emergency);
    gov.credit(EngineId::Unattributed, 96 * MIB).unwrap();
    assert_eq!(gov.global_pressure(), PressureLevel::Normal);

    let snap = gov.snapshot();
    let transitions: Vec<_> = snap
        .events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Pressure { engine, from, to } => Some((engine, from, to)),
            _ => None,
        })
        .collect();
    use PressureLevel::*;
    assert_eq!(
        transitions,
        vec![
            (Some(q), Normal, Critical),
            (Some(q), Critical, Warning),
            (Some(q), Warning, Emergency),
            (Some(q), Emergency, Normal),
            (None, Normal, Emergency),
            (None, Emergency, Normal),
        ]
    );
}

#[test]
fn idle_engines_lend_to_busy_ones_and_get_it_back() {
    let gov = gov();
    let (q, v) = (EngineId::Query, EngineId::Vector);
    // Query busy at 36 of 40 MiB; Vector idle (nothing used).
    let query_mem = gov.reserve(q, 36 * MIB).unwrap();
    let report = gov.rebalance();
    // Query wants 36 / 0.6 = 60 MiB; Vector, idle, keeps its 10 MiB floor and lends the 20.
    assert_eq!(
        report.moves,
        vec![RebalanceMove {
            from: v,
            to: q,
            bytes: 20 * MIB
        }]
    );
    assert_eq!((gov.limit(q), gov.limit(v)), (60 * MIB, 20 * MIB));
    assert!(report.moves.iter().all(|m| m.to == q));
    let total: u64 = EngineId::ALL.iter().map(|&e| gov.limit(e)).sum();
    assert_eq!(total, 100 * MIB);
    assert_eq!(gov.pressure(q), PressureLevel::Normal);
    gov.check_consistency().unwrap();

    // Vector becomes busy below its budget: it takes its headroom back from Query, whose limit
    // shrinks back to its budget and whose pressure rises.
    let vector_mem = gov.reserve(v, gov.limit(v) * 3 / 4).unwrap();
    let report = gov.rebalance();
    assert!(report.moves.iter().any(|m| m.from == q && m.to == v));
    assert_eq!(gov.limit(v), 40 * MIB);
    assert_eq!(gov.limit(q), 40 * MIB);
    assert_eq!(gov.pressure(q), PressureLevel::Critical); // 36 of 40 MiB
    let total: u64 = EngineId::ALL.iter().map(|&e| gov.limit(e)).sum();
    assert!(total <= 100 * MIB);
    assert_eq!(gov.limits().iter().sum::<u64>(), total);
    assert_eq!(gov.limits()[v.index()], 40 * MIB);
    gov.check_consistency().unwrap();
    let snap = gov.snapshot();
    let (sq, sv) = (snap.engine(q), snap.engine(v));
    assert_eq!(sq.borrowed_total, 20 * MIB);
    assert_eq!(sv.lent_total, 20 * MIB);
    // Taking back is counted apart from borrowing, and giving back apart from lending.
    assert_eq!((sv.taken_back_total, sv.borrowed_total), (20 * MIB, 0));
    assert_eq!((sq.returned_total, sq.lent_total), (20 * MIB, 0));
    // Each side of each move counts one.
    assert_eq!((sq.rebalance_moves, sv.rebalance_moves), (2, 2));
    let text = gov.prometheus();
    for line in [
        "nodedb_mem_engine_taken_back_bytes_total{engine=\"vector\"} 20971520",
        "nodedb_mem_engine_returned_bytes_total{engine=\"query\"} 20971520",
        "nodedb_mem_engine_rebalance_moves_total{engine=\"query\"} 2",
    ] {
        assert!(text.contains(line), "{line}");
    }
    assert!(
        snap.events.iter().any(
            |e| matches!(e.kind, EventKind::Rebalance { from, to, .. } if from == q && to == v)
        )
    );
    drop((query_mem, vector_mem));
}

#[test]
fn lending_never_goes_below_the_floor_or_above_the_cap() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(100 * MIB)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, 40 * MIB)
        .cap(EngineId::Query, 45 * MIB)
        .budget(EngineId::Vector, 40 * MIB)
        .floor(EngineId::Vector, 38 * MIB)
        .rebalance(RebalanceConfig {
            min_move: 1,
            ..Default::default()
        })
        .build()
        .unwrap();
    let _busy = gov.reserve(EngineId::Query, 39 * MIB).unwrap();
    gov.rebalance();
    assert_eq!(gov.limit(EngineId::Query), 45 * MIB);
    assert!(gov.limit(EngineId::Vector) >= 38 * MIB);
    gov.rebalance();
    assert_eq!(gov.limit(EngineId::Query), 45 * MIB);
    gov.check_consistency().unwrap();
}

#[test]
fn an_engine_busy_in_the_window_does_not_lend() {
    let gov = gov();
    let (q, v) = (EngineId::Query, EngineId::Vector);
    gov.rebalance(); // start a window
    let spike = gov.reserve(v, 30 * MIB).unwrap();
    drop(spike); // Vector peaked at 75 % during this window
    let _busy = gov.reserve(q, 36 * MIB).unwrap();
    let report = gov.rebalance();
    assert!(report.moves.iter().all(|m| m.from != v), "{report:?}");
    assert_eq!(gov.limit(v), 40 * MIB);
}

fn churn(gov: &MemoryGovernor, seed: u64, rounds: u64, rebalance: bool, limit: u64) {
    let mut held = Vec::new();
    for i in 0..rounds {
        let bytes = 1 + (i * 7919 + seed * 104_729) % (12 * MIB);
        match gov.reserve(EngineId::Query, bytes) {
            Ok(r) => held.push(r),
            Err(e) => assert!(e.is_over_budget(), "{e}"),
        }
        let usage = gov.usage(EngineId::Query);
        assert!(usage <= limit, "usage {usage} above {limit}");
        if !held.is_empty() && (held.len() > 8 || i % 5 == 0) {
            held.swap_remove(0);
        }
        if rebalance && i % 500 == 0 {
            gov.rebalance();
        }
    }
}

#[test]
fn concurrent_reservations_never_exceed_the_limit_and_return_everything() {
    let gov = gov();
    thread::scope(|s| {
        for t in 0..4 {
            let gov = &gov;
            s.spawn(move || churn(gov, t, 20_000, false, 40 * MIB));
        }
    });
    assert_eq!(gov.usage(EngineId::Query), 0);
    assert_eq!(gov.global_usage(), 0);
    assert!(gov.budget(EngineId::Query).peak() <= 40 * MIB);
    assert!(
        gov.budget(EngineId::Query).rejections() > 0,
        "the test never reached the limit"
    );
    gov.check_consistency().unwrap();
}

#[test]
fn concurrent_reservations_and_rebalancing_stay_within_caps_and_the_ceiling() {
    let gov = gov();
    thread::scope(|s| {
        for t in 0..3 {
            let gov = &gov;
            s.spawn(move || churn(gov, t, 10_000, true, gov.budget(EngineId::Query).cap()));
        }
        s.spawn(|| {
            for i in 0..2_000u64 {
                let r = gov.reserve(EngineId::Vector, (i % 40) * MIB / 2);
                drop(r);
                let snap = gov.snapshot();
                let total: u64 = snap.engines.iter().map(|e| e.limit).sum();
                assert!(total <= 100 * MIB, "limits sum to {total}");
            }
        });
    });
    assert_eq!(gov.global_usage(), 0);
    assert!(gov.global_peak() <= 100 * MIB);
    gov.check_consistency().unwrap();
}

#[test]
fn prometheus_text_parses_and_carries_every_engine() {
    let gov = gov();
    let _r = gov.reserve(EngineId::Timeseries, 3 * MIB).unwrap();
    let _ = gov.reserve(EngineId::Timeseries, 10 * MIB).unwrap_err();
    let text = gov.prometheus();
    let lines = text.lines().map(|l| Ok(l.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("valid exposition");
    let value = |name: &str, engine: Option<&str>| -> f64 {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && engine.is_none_or(|e| s.labels.get("engine") == Some(e)))
            .unwrap_or_else(|| panic!("{name} {engine:?} missing"));
        match s.value {
            prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: unexpected {other:?}"),
        }
    };
    assert_eq!(value("nodedb_mem_ceiling_bytes", None), (100 * MIB) as f64);
    assert_eq!(
        value("nodedb_mem_engine_usage_bytes", Some("timeseries")),
        (3 * MIB) as f64
    );
    assert_eq!(
        value("nodedb_mem_engine_rejections_total", Some("timeseries")),
        1.0
    );
    assert_eq!(
        value("nodedb_mem_engine_limit_bytes", Some("query")),
        (40 * MIB) as f64
    );
    assert_eq!(
        value("nodedb_mem_engine_rebalance_net_bytes", Some("query")),
        0.0
    );
    for e in EngineId::ALL {
        assert!(
            scrape
                .samples
                .iter()
                .any(|s| s.metric == "nodedb_mem_engine_limit_bytes"
                    && s.labels.get("engine") == Some(e.name())),
            "{e}"
        );
    }
    for name in [
        "nodedb_mem_engine_usage_bytes",
        "nodedb_mem_engine_rejections_total",
    ] {
        assert!(scrape.docs.contains_key(name), "HELP missing for {name}");
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "TYPE missing for {name}"
        );
    }
    assert!(text.contains("# TYPE nodedb_mem_engine_rejections_total counter"));
}

#[test]
fn sizes_from_strings_configure_budgets() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(Size::parse("1GiB").unwrap().resolve(0))
        .budget(EngineId::Query, Size::parse("25%").unwrap())
        .build()
        .unwrap();
    assert_eq!(gov.limit(EngineId::Query), 256 * MIB);
}

#[test]
fn snapshot_reports_every_figure() {
    let gov = gov();
    let _r = gov.reserve(EngineId::Sparse, 1024).unwrap();
    gov.charge(EngineId::Sparse, 4096);
    let snap = gov.snapshot();
    let s = snap.engine(EngineId::Sparse);
    assert_eq!(
        (s.used, s.reserved, s.usage, s.peak),
        (4096, 1024, 5120, 5120)
    );
    assert_eq!(s.limit, 5 * MIB);
    assert_eq!(s.available, 5 * MIB - 5120);
    assert_eq!(snap.global_usage, 5120);
    assert_eq!(snap.ceiling, 100 * MIB);
    assert_eq!(snap.engines.len(), EngineId::COUNT);
    gov.credit(EngineId::Sparse, 4096).unwrap();
}

#[test]
fn the_background_rebalancer_moves_limit_and_stops_on_drop() {
    use std::time::{Duration, Instant};
    let gov = gov();
    let _busy = gov.reserve(EngineId::Query, 36 * MIB).unwrap();
    let bg = gov.spawn_rebalancer(Duration::from_millis(5)).unwrap();
    // No timing assertion: wait (up to a generous deadline) for the first step to happen.
    let deadline = Instant::now() + Duration::from_secs(30);
    while gov.limit(EngineId::Query) == 40 * MIB && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    let steps = bg.stop();
    assert!(steps >= 1);
    assert_eq!(gov.limit(EngineId::Query), 60 * MIB);
    // Stopped: nothing moves any more, and the thread's handle on the governor is gone.
    let before = gov.snapshot().events_recorded;
    thread::sleep(Duration::from_millis(20));
    assert_eq!(gov.snapshot().events_recorded, before);
    let err = gov.spawn_rebalancer(Duration::ZERO).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration `rebalance interval` = 0 s: must be above zero"
    );
}

#[test]
fn install_refuses_without_the_governed_allocator() {
    // This test binary keeps the system allocator.
    let err = MemoryGovernor::builder()
        .global_ceiling(64 * MIB)
        .install()
        .unwrap_err();
    assert!(matches!(err, MemError::AllocatorNotGlobal));
    assert_eq!(
        err.to_string(),
        "GovernedAlloc is not the global allocator: declare `#[global_allocator] static ALLOC: nodedb_mem::GovernedAlloc = nodedb_mem::GovernedAlloc::new();`"
    );
    assert!(nodedb_mem::installed().is_none());
}

#[test]
fn the_fallible_allocator_refuses_past_the_budget_and_counts_exactly() {
    use allocator_api2::vec::Vec as AVec;
    use nodedb_mem::EngineAllocator;
    let gov = gov(); // Query: 40 MiB
    let alloc = EngineAllocator::new(&gov, EngineId::Query);
    let mut v: AVec<u8, _> = AVec::new_in(alloc.clone());
    v.try_reserve_exact((30 * MIB) as usize).unwrap();
    assert_eq!(gov.usage(EngineId::Query), 30 * MIB);
    assert_eq!(
        gov.budget(EngineId::Query).reserved(),
        0,
        "the admission was released"
    );
    // Growing to 50 MiB does not fit: refused, and the vector keeps what it had.
    assert!(v.try_reserve_exact((50 * MIB) as usize).is_err());
    assert_eq!(v.capacity(), (30 * MIB) as usize);
    assert_eq!(gov.budget(EngineId::Query).rejections(), 1);

    let mut map: hashbrown::HashMap<u64, u64, hashbrown::DefaultHashBuilder, _> =
        hashbrown::HashMap::with_hasher_in(Default::default(), alloc);
    assert!(map.try_reserve(100_000).is_ok());
    assert!(
        map.try_reserve(10_000_000).is_err(),
        "160 MB of table does not fit"
    );
    let used = gov.usage(EngineId::Query);
    assert!(used > 30 * MIB && used <= 40 * MIB);
    // Over budget (the allocator-free `charge` pushes Query past its limit), shrinking still
    // works: it only gives memory back.
    gov.charge(EngineId::Query, 40 * MIB);
    v.extend_from_slice(&[1, 2, 3]);
    v.shrink_to_fit();
    assert_eq!(v.capacity(), 3);
    assert_eq!(&v[..], &[1, 2, 3]);
    gov.credit(EngineId::Query, 40 * MIB).unwrap();
    drop((v, map));
    assert_eq!(gov.usage(EngineId::Query), 0);
    gov.check_consistency().unwrap();
}

#[test]
fn checking_admission_answers_as_reserve_would_and_holds_nothing() {
    let gov = nodedb_mem::MemoryGovernor::builder()
        .global_ceiling(10 * MIB)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, 4 * MIB)
        .build()
        .unwrap();
    gov.check_admission(EngineId::Query, 4 * MIB).unwrap();
    assert_eq!(gov.usage(EngineId::Query), 0);
    assert_eq!(gov.budget(EngineId::Query).peak(), 0);
    let held = gov.reserve(EngineId::Query, 3 * MIB).unwrap();
    let err = gov.check_admission(EngineId::Query, 2 * MIB).unwrap_err();
    assert_eq!(
        err.to_string(),
        gov.reserve(EngineId::Query, 2 * MIB)
            .unwrap_err()
            .to_string(),
        "the same refusal as reserve's"
    );
    assert_eq!(gov.budget(EngineId::Query).rejections(), 2);
    gov.check_admission(EngineId::Query, MIB).unwrap();
    assert_eq!(gov.usage(EngineId::Query), 3 * MIB);
    assert_eq!(gov.budget(EngineId::Query).peak(), 3 * MIB);
    drop(held);
    assert_eq!(gov.usage(EngineId::Query), 0);
    gov.check_consistency().unwrap();
}
