//! Scopes: budgets in a tree under the ceiling, beside the engines' budgets. Exact figures at
//! every level, the level that refused, limits changed while reservations are live, removal,
//! names, and many threads under one parent.

use std::sync::{Arc, Barrier};
use std::thread;

use nodedb_mem::{
    EngineId, EventKind, MAX_CEILING, MemError, MemoryGovernor, PressureLevel, Scope,
};

mod common;
use common::{MIB, two_big_engines as gov};

/// Every level's usage: (engine, tenant, database, global).
fn levels(
    gov: &MemoryGovernor,
    engine: EngineId,
    t: &nodedb_mem::Scope,
    d: &nodedb_mem::Scope,
) -> [u64; 4] {
    [gov.usage(engine), t.usage(), d.usage(), gov.global_usage()]
}

#[test]
fn a_scoped_reservation_counts_at_every_level_and_gives_every_level_back() {
    let gov = gov();
    let db = gov.create_scope("sales", None, 20 * MIB).unwrap();
    let acme = gov.create_scope("acme", Some(&db), 8 * MIB).unwrap();
    let initech = gov.create_scope("initech", Some(&db), 8 * MIB).unwrap();
    assert_eq!(acme.path(), "sales/acme");
    assert_eq!(acme.name(), "acme");
    assert_eq!(acme.parent(), Some(db.id()));
    assert_eq!(db.parent(), None);

    let a = gov.reserve_in(EngineId::Query, &acme, 3 * MIB).unwrap();
    let b = gov.reserve_in(EngineId::Vector, &initech, 5 * MIB).unwrap();
    let c = gov.reserve_in(EngineId::Query, &db, MIB).unwrap();
    assert_eq!(a.scope().map(Scope::path), Some("sales/acme"));
    assert_eq!(
        (acme.usage(), initech.usage(), db.usage()),
        (3 * MIB, 5 * MIB, 9 * MIB)
    );
    assert_eq!(gov.usage(EngineId::Query), 4 * MIB);
    assert_eq!(gov.usage(EngineId::Vector), 5 * MIB);
    assert_eq!(gov.global_usage(), 9 * MIB);
    assert_eq!((acme.reservations(), db.reservations()), (1, 1));
    assert_eq!(acme.available(), 5 * MIB);
    gov.check_consistency().unwrap();

    drop((a, b, c));
    assert_eq!((acme.usage(), initech.usage(), db.usage()), (0, 0, 0));
    assert_eq!(gov.global_usage(), 0);
    assert_eq!((acme.peak(), db.peak()), (3 * MIB, 9 * MIB));
    assert_eq!((acme.reservations(), db.reservations()), (0, 0));
    gov.check_consistency().unwrap();
}

#[test]
fn a_refusal_names_the_level_that_refused_and_leaves_every_level_as_it_was() {
    let gov = gov();
    // Tenants overcommit their database: 12 + 12 > 16.
    let db = gov.create_scope("sales", None, 16 * MIB).unwrap();
    let acme = gov.create_scope("acme", Some(&db), 12 * MIB).unwrap();
    let initech = gov.create_scope("initech", Some(&db), 12 * MIB).unwrap();
    let held = gov.reserve_in(EngineId::Query, &acme, 10 * MIB).unwrap();
    let before = levels(&gov, EngineId::Query, &acme, &db);

    // The tenant refuses.
    let err = gov.reserve_in(EngineId::Query, &acme, 3 * MIB).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot reserve 3 MiB for engine query in scope sales/acme: 10 MiB already used of its \
         12 MiB limit, 2 MiB available"
    );
    assert!(err.is_over_budget());
    assert_eq!(levels(&gov, EngineId::Query, &acme, &db), before);

    // The database refuses a reservation its tenant has room for.
    let err = gov
        .reserve_in(EngineId::Query, &initech, 7 * MIB)
        .unwrap_err();
    let MemError::ScopeExceeded {
        scope,
        engine,
        requested,
        used,
        limit,
        available,
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(
        (
            scope.as_str(),
            *engine,
            *requested,
            *used,
            *limit,
            *available
        ),
        (
            "sales",
            EngineId::Query,
            7 * MIB,
            10 * MIB,
            16 * MIB,
            6 * MIB
        )
    );
    assert_eq!(initech.usage(), 0);
    assert_eq!(levels(&gov, EngineId::Query, &acme, &db), before);

    // The engine refuses before any scope is touched.
    let err = gov
        .reserve_in(EngineId::Sparse, &initech, 6 * MIB)
        .unwrap_err();
    assert!(
        matches!(
            err,
            MemError::BudgetExceeded {
                engine: EngineId::Sparse,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!((initech.usage(), db.usage()), (0, 10 * MIB));

    // The ceiling refuses last: every scope taken is given back.
    let big = gov.create_scope("big", None, MAX_CEILING).unwrap();
    let v = gov.reserve(EngineId::Vector, 40 * MIB).unwrap();
    let q = gov.reserve_in(EngineId::Query, &big, 30 * MIB).unwrap();
    gov.charge(EngineId::Unattributed, 28 * MIB);
    let err = gov.reserve_in(EngineId::Crdt, &big, 5 * MIB).unwrap_err();
    assert!(matches!(err, MemError::CeilingExceeded { .. }), "{err:?}");
    assert_eq!(big.usage(), 30 * MIB);
    assert_eq!(gov.usage(EngineId::Crdt), 0);

    // Only the scope that refused counts the refusal.
    assert_eq!(
        (acme.rejections(), initech.rejections(), db.rejections()),
        (1, 0, 1)
    );
    assert_eq!(big.rejections(), 0);
    drop((held, v, q));
    gov.credit(EngineId::Unattributed, 28 * MIB).unwrap();
    assert_eq!(gov.global_usage(), 0);
    gov.check_consistency().unwrap();
}

#[test]
fn growing_splitting_and_shrinking_stay_in_the_scope() {
    let gov = gov();
    let db = gov.create_scope("db", None, 8 * MIB).unwrap();
    let mut r = gov.reserve_in(EngineId::Query, &db, 4 * MIB).unwrap();
    let err = r.try_grow(5 * MIB).unwrap_err();
    assert!(matches!(err, MemError::ScopeExceeded { .. }), "{err:?}");
    assert_eq!(r.size(), 4 * MIB);
    r.try_grow(4 * MIB).unwrap();
    assert_eq!(db.usage(), 8 * MIB);
    let half = r.split(2 * MIB).unwrap();
    assert_eq!(half.scope().map(Scope::path), Some("db"));
    assert_eq!(db.reservations(), 2);
    assert_eq!(db.usage(), 8 * MIB);
    r.shrink(MIB).unwrap();
    assert_eq!(db.usage(), 7 * MIB);
    r.try_resize(3 * MIB).unwrap();
    assert_eq!(db.usage(), 5 * MIB);
    drop(r);
    assert_eq!((db.usage(), db.reservations()), (2 * MIB, 1));
    drop(half);
    assert_eq!((db.usage(), db.reservations()), (0, 0));
    gov.check_consistency().unwrap();
}

#[test]
fn a_limit_changed_below_usage_keeps_every_byte_and_refuses_until_usage_falls() {
    let gov = gov();
    let db = gov.create_scope("db", None, 16 * MIB).unwrap();
    let a = gov.reserve_in(EngineId::Query, &db, 6 * MIB).unwrap();
    let b = gov.reserve_in(EngineId::Vector, &db, 6 * MIB).unwrap();
    assert_eq!(gov.scope_pressure(&db), PressureLevel::Warning); // 75 %

    gov.set_scope_limit(&db, 4 * MIB).unwrap();
    assert_eq!(
        (db.limit(), db.usage(), db.available()),
        (4 * MIB, 12 * MIB, 0)
    );
    assert_eq!(gov.scope_pressure(&db), PressureLevel::Emergency);
    gov.check_consistency().unwrap();
    let err = gov.reserve_in(EngineId::Query, &db, 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot reserve 1 B for engine query in scope db: 12 MiB already used of its 4 MiB \
         limit, 0 B available"
    );

    drop(a);
    assert_eq!(db.usage(), 6 * MIB);
    assert!(gov.reserve_in(EngineId::Query, &db, 1).is_err());
    drop(b);
    assert_eq!(db.usage(), 0);
    let c = gov.reserve_in(EngineId::Query, &db, 4 * MIB).unwrap();
    assert!(gov.reserve_in(EngineId::Query, &db, 1).is_err());
    gov.set_scope_limit(&db, 5 * MIB).unwrap();
    let d = gov.reserve_in(EngineId::Query, &db, MIB).unwrap();
    drop((c, d));
    assert_eq!(gov.scope_pressure(&db), PressureLevel::Normal);
    gov.check_consistency().unwrap();

    let changes: Vec<_> = gov
        .snapshot()
        .events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::ScopeLimit {
                scope,
                from,
                to,
                usage,
            } => Some((scope, from, to, usage)),
            _ => None,
        })
        .collect();
    assert_eq!(
        changes,
        [
            (db.id(), 16 * MIB, 4 * MIB, 12 * MIB),
            (db.id(), 4 * MIB, 5 * MIB, 4 * MIB)
        ]
    );
    let err = gov.set_scope_limit(&db, MAX_CEILING + 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration `scope limit` = 1024.0 TiB (1125899906842625 B): must be at most \
         1024 TiB"
    );
}

#[test]
fn a_scope_in_use_is_not_removed_and_a_removed_one_refuses_everything() {
    let gov = gov();
    let db = gov.create_scope("db", None, 16 * MIB).unwrap();
    let tenant = gov.create_scope("t1", Some(&db), 8 * MIB).unwrap();
    let a = gov.reserve_in(EngineId::Query, &tenant, 3 * MIB).unwrap();
    let b = gov.reserve_in(EngineId::Query, &tenant, 0).unwrap();

    let err = gov.remove_scope(&tenant).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot remove scope db/t1: 2 reservation(s) holding 3 MiB and 0 child scope(s) are \
         alive in it; drop them first (a limit of 0 refuses new reservations meanwhile)"
    );
    let err = gov.remove_scope(&db).unwrap_err();
    assert!(
        matches!(
            err,
            MemError::ScopeInUse {
                reservations: 0,
                bytes,
                children: 1,
                ..
            } if bytes == 3 * MIB
        ),
        "{err:?}"
    );
    assert!(!tenant.is_removed());
    drop((a, b));

    gov.remove_scope(&tenant).unwrap();
    assert!(tenant.is_removed());
    assert_eq!(
        gov.reserve_in(EngineId::Query, &tenant, 1)
            .unwrap_err()
            .to_string(),
        "scope db/t1 was removed"
    );
    assert!(matches!(
        gov.create_scope("t2", Some(&tenant), MIB),
        Err(MemError::ScopeRemoved { .. })
    ));
    assert!(matches!(
        gov.remove_scope(&tenant),
        Err(MemError::ScopeRemoved { .. })
    ));
    assert!(matches!(
        gov.set_scope_limit(&tenant, MIB),
        Err(MemError::ScopeRemoved { .. })
    ));
    // The name is free again, and the database can go now that its child has.
    let again = gov.create_scope("t1", Some(&db), MIB).unwrap();
    assert_ne!(again.id(), tenant.id());
    gov.remove_scope(&again).unwrap();
    gov.remove_scope(&db).unwrap();
    assert!(gov.scopes().is_empty());
    assert_eq!(gov.global_usage(), 0);
    gov.check_consistency().unwrap();
}

#[test]
fn bad_names_and_foreign_scopes_are_refused_with_the_reason() {
    let gov = gov();
    let db = gov.create_scope("db", None, MIB).unwrap();
    let text = |r: Result<nodedb_mem::Scope, MemError>| r.unwrap_err().to_string();
    assert_eq!(
        text(gov.create_scope("", None, MIB)),
        "invalid configuration `scope name` = \"\": must not be empty"
    );
    assert_eq!(
        text(gov.create_scope("a/b", None, MIB)),
        "invalid configuration `scope name` = \"a/b\": must not hold `/` (it joins the names of \
         a path) or control characters"
    );
    assert_eq!(
        text(gov.create_scope("tab\there", None, MIB)),
        "invalid configuration `scope name` = \"tab\\there\": must not hold `/` (it joins the \
         names of a path) or control characters"
    );
    let long = "x".repeat(129);
    assert!(text(gov.create_scope(&long, None, MIB)).ends_with(": must be at most 128 bytes"));
    assert!(gov.create_scope(&long[..128], None, MIB).is_ok());
    assert_eq!(
        text(gov.create_scope("db", None, MIB)),
        "invalid configuration `scope name` = \"db\": is taken by a sibling"
    );
    // The same name under another parent is another scope.
    let inner = gov.create_scope("db", Some(&db), MIB).unwrap();
    assert_eq!(inner.path(), "db/db");
    // A child's refused name is named, with its parent (it was reported as the parent's).
    assert_eq!(
        text(gov.create_scope("a/b", Some(&db), MIB)),
        "invalid configuration `scope name` = \"a/b\" under \"db\": must not hold `/` (it joins \
         the names of a path) or control characters"
    );
    assert_eq!(
        text(gov.create_scope("", Some(&inner), MIB)),
        "invalid configuration `scope name` = \"\" under \"db/db\": must not be empty"
    );
    assert_eq!(
        text(gov.create_scope("db", Some(&db), MIB)),
        "invalid configuration `scope name` = \"db\" under \"db\": is taken by a sibling"
    );
    assert!(text(gov.create_scope("huge", None, MAX_CEILING + 1)).contains("must be at most"));

    let other = common::two_big_engines();
    let theirs = other.create_scope("theirs", None, MIB).unwrap();
    let foreign = "invalid configuration `scope` = theirs: belongs to another governor";
    assert_eq!(
        gov.reserve_in(EngineId::Query, &theirs, 1)
            .unwrap_err()
            .to_string(),
        foreign
    );
    assert_eq!(
        text(gov.create_scope("child", Some(&theirs), MIB)),
        "invalid configuration `scope` = theirs: belongs to another governor"
    );
    assert_eq!(gov.remove_scope(&theirs).unwrap_err().to_string(), foreign);
    assert_eq!(other.scopes().len(), 1);
    assert_eq!(gov.scopes().len(), 3);
}

#[test]
fn the_snapshot_and_prometheus_show_every_scope() {
    let gov = gov();
    let db = gov.create_scope("sales", None, 16 * MIB).unwrap();
    let t = gov.create_scope("ac\"me", Some(&db), 4 * MIB).unwrap();
    let _r = gov.reserve_in(EngineId::Query, &t, 3 * MIB).unwrap();
    let _ = gov.reserve_in(EngineId::Query, &t, 3 * MIB);
    let snap = gov.snapshot();
    assert_eq!(snap.scopes.len(), 2);
    let s = &snap.scopes[1];
    assert_eq!(
        (
            s.id,
            s.path.as_str(),
            s.parent,
            s.limit,
            s.usage,
            s.available,
            s.peak,
            s.rejections,
            s.reservations,
            s.children,
            s.waiters,
            s.pressure
        ),
        (
            t.id(),
            "sales/ac\"me",
            Some(db.id()),
            4 * MIB,
            3 * MIB,
            MIB,
            3 * MIB,
            1,
            1,
            0,
            0,
            PressureLevel::Warning
        )
    );
    assert_eq!(snap.scopes[0].children, 1);
    let text = snap.to_prometheus();
    for line in [
        "# TYPE nodedb_mem_scope_usage_bytes gauge",
        "nodedb_mem_scope_usage_bytes{scope=\"sales\"} 3145728",
        "nodedb_mem_scope_usage_bytes{scope=\"sales/ac\\\"me\"} 3145728",
        "nodedb_mem_scope_limit_bytes{scope=\"sales/ac\\\"me\"} 4194304",
        "nodedb_mem_scope_rejections_total{scope=\"sales/ac\\\"me\"} 1",
        "nodedb_mem_scope_reservations{scope=\"sales\"} 0",
        "nodedb_mem_scope_pressure_level{scope=\"sales/ac\\\"me\"} 1",
        "nodedb_mem_scope_waiters{scope=\"sales\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    // A Prometheus parser reads the scope label back as the path (this parser does not undo
    // escapes, so the escaped path is checked by its exact line above).
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .expect("valid exposition");
    let usage = scrape
        .samples
        .iter()
        .find(|s| {
            s.metric == "nodedb_mem_scope_usage_bytes" && s.labels.get("scope") == Some("sales")
        })
        .expect("the database's usage sample");
    assert!(matches!(usage.value, prometheus_parse::Value::Gauge(v) if v == (3 * MIB) as f64));
    let refused = snap
        .events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::ScopeRejected { scope, .. } if scope == t.id()))
        .count();
    assert_eq!(refused, 1);
}

#[test]
fn many_threads_in_two_tenants_never_pass_any_level() {
    const THREADS: usize = 8;
    const ROUNDS: u64 = 2_000;
    let gov = gov();
    let db = gov.create_scope("db", None, 12 * MIB).unwrap();
    let tenants = [
        gov.create_scope("a", Some(&db), 8 * MIB).unwrap(),
        gov.create_scope("b", Some(&db), 8 * MIB).unwrap(),
    ];
    let start = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|i| {
            let (gov, t, start) = (gov.clone(), tenants[i % 2].clone(), Arc::clone(&start));
            let engine = [EngineId::Query, EngineId::Vector][i / 2 % 2];
            thread::spawn(move || {
                start.wait();
                let mut held = Vec::new();
                let mut granted = 0u64;
                for round in 0..ROUNDS {
                    let bytes = (round * 7919 + i as u64 * 104_729) % (3 * MIB) + 1;
                    if let Ok(r) = gov.reserve_in(engine, &t, bytes) {
                        granted += 1;
                        held.push(r);
                    }
                    if held.len() > 2 || round % 3 == 0 {
                        held.clear();
                    }
                }
                granted
            })
        })
        .collect();
    let granted: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    assert!(granted > 0);
    assert!(db.peak() <= 12 * MIB, "{}", db.peak());
    for t in &tenants {
        assert!(t.peak() <= 8 * MIB, "{}", t.peak());
        assert_eq!(t.usage(), 0);
    }
    assert_eq!(db.usage(), 0);
    assert_eq!(gov.global_usage(), 0);
    gov.check_consistency().unwrap();
}

#[test]
fn a_removal_racing_reservations_never_removes_a_scope_in_use() {
    let gov = gov();
    for round in 0..50 {
        let db = gov
            .create_scope(&format!("db{round}"), None, 16 * MIB)
            .unwrap();
        let start = Arc::new(Barrier::new(3));
        let reservers: Vec<_> = (0..2)
            .map(|i| {
                let (gov, db, start) = (gov.clone(), db.clone(), Arc::clone(&start));
                thread::spawn(move || {
                    start.wait();
                    loop {
                        match gov.reserve_in(EngineId::Query, &db, (i + 1) * 4096) {
                            // While it is held, the scope cannot have been removed.
                            Ok(r) => {
                                assert!(!db.is_removed(), "removed under {r:?}");
                                drop(r);
                                thread::yield_now();
                            }
                            Err(MemError::ScopeRemoved { .. }) => return,
                            Err(e) => panic!("{e}"),
                        }
                    }
                })
            })
            .collect();
        start.wait();
        loop {
            match gov.remove_scope(&db) {
                Ok(()) => break,
                Err(MemError::ScopeInUse { .. }) => thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        }
        // Every reservation that got in was made and dropped while the scope was open.
        for h in reservers {
            h.join().unwrap();
        }
        assert_eq!(db.usage(), 0);
    }
    assert!(gov.scopes().is_empty());
    assert_eq!(gov.global_usage(), 0);
    gov.check_consistency().unwrap();
}

#[test]
fn a_deep_path_counts_at_every_level() {
    let gov = gov();
    let mut path = vec![gov.create_scope("l0", None, 32 * MIB).unwrap()];
    for depth in 1..12u64 {
        let parent = path.last().cloned();
        path.push(
            gov.create_scope(&format!("l{depth}"), parent.as_ref(), 32 * MIB)
                .unwrap(),
        );
    }
    let leaf = path.last().unwrap();
    assert_eq!(leaf.path(), "l0/l1/l2/l3/l4/l5/l6/l7/l8/l9/l10/l11");
    let r = gov.reserve_in(EngineId::Query, leaf, 20 * MIB).unwrap();
    assert!(path.iter().all(|s| s.usage() == 20 * MIB));
    // Level 5, lowered to 27 MiB, refuses 8 more after the six levels below it admitted them;
    // none of them keeps anything.
    gov.set_scope_limit(&path[5], 27 * MIB).unwrap();
    let err = gov.reserve_in(EngineId::Vector, leaf, 8 * MIB).unwrap_err();
    assert!(
        matches!(&err, MemError::ScopeExceeded { scope, .. } if scope == "l0/l1/l2/l3/l4/l5"),
        "{err:?}"
    );
    assert!(path.iter().all(|s| s.usage() == 20 * MIB));
    drop(r);
    assert!(path.iter().all(|s| s.usage() == 0));
    gov.check_consistency().unwrap();
}

#[test]
fn refused_attempts_never_keep_a_drained_scope_in_use() {
    let gov = gov();
    for round in 0..20 {
        let scope = gov.create_scope("drained", None, 0).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    // Clients retrying refused reservations in a tight loop.
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        match gov.reserve_in(EngineId::Query, &scope, MIB) {
                            Err(MemError::ScopeExceeded { .. }) => {}
                            Err(MemError::ScopeRemoved { .. }) => break,
                            other => panic!("{other:?}"),
                        }
                    }
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
            // Removed at the first try, whatever the traffic.
            let removed = gov.remove_scope(&scope);
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(removed.is_ok(), "round {round}: {removed:?}");
        });
        assert_eq!(gov.usage(EngineId::Query), 0);
        gov.check_consistency().unwrap();
    }
}

#[test]
fn a_scope_is_found_by_path_and_number_and_reached_from_its_reservations() {
    let gov = gov();
    let db = gov.create_scope("sales", None, 8 * MIB).unwrap();
    let acme = gov.create_scope("acme", Some(&db), 4 * MIB).unwrap();
    let found = gov.scope("sales/acme").unwrap();
    assert_eq!((found.id(), found.path()), (acme.id(), "sales/acme"));
    assert_eq!(gov.scope_by_id(db.id()).unwrap().path(), "sales");
    assert!(gov.scope("acme").is_none());
    assert!(gov.scope("sales/").is_none());
    assert_eq!(db.children(), 1);

    // The reservation's scope is a handle on the same scope, with its figures and pressure.
    let r = gov.reserve_in(EngineId::Query, &found, 3 * MIB).unwrap();
    let s = r.scope().unwrap();
    assert_eq!(
        (s.id(), s.usage(), s.available()),
        (acme.id(), 3 * MIB, MIB)
    );
    assert_eq!(s.pressure(), PressureLevel::Warning); // 75 %
    assert_eq!(acme.pressure_transitions(), 1);
    // Recorded as the governor's own call records it.
    let recorded = gov
        .snapshot()
        .events
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::ScopePressure { scope, from: PressureLevel::Normal, to: PressureLevel::Warning }
                    if scope == acme.id()
            )
        })
        .count();
    assert_eq!(recorded, 1);
    assert_eq!(gov.scope_pressure(&acme), PressureLevel::Warning);
    drop(r);
    assert_eq!(acme.pressure(), PressureLevel::Normal);
    assert!(gov.reserve(EngineId::Query, MIB).unwrap().scope().is_none());

    // A removed scope is found no more, by either key; a new one may take its name.
    let id = acme.id();
    gov.remove_scope(&acme).unwrap();
    assert!(gov.scope("sales/acme").is_none());
    assert!(gov.scope_by_id(id).is_none());
    let again = gov.create_scope("acme", Some(&db), MIB).unwrap();
    assert_eq!(gov.scope("sales/acme").unwrap().id(), again.id());
    assert_ne!(again.id(), id);
}
