//! The kernel's figures for the process's memory cgroup in the snapshot and the metrics, read
//! from a fake cgroup tree (a directory standing in for `/`).

use std::time::Duration;

use nodedb_mem::{
    CeilingCause, CeilingSource, CgroupVersion, EngineId, EventKind, MemError, MemoryGovernor,
    PressureLevel, Size,
};

const MIB: u64 = 1 << 20;

/// The ceiling for a cgroup limit of `limit` with the default margin.
fn less_margin(limit: u64) -> u64 {
    limit - Size::Fraction(nodedb_mem::DEFAULT_CGROUP_MARGIN).resolve(limit)
}

fn file(root: &std::path::Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

#[test]
fn the_snapshot_and_prometheus_carry_the_cgroups_figures() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    file(r, "proc/self/cgroup", "0::/db\n");
    file(r, "sys/fs/cgroup/db/memory.current", "104857600\n");
    file(r, "sys/fs/cgroup/db/memory.max", "268435456\n");
    file(r, "sys/fs/cgroup/db/memory.high", "max\n");
    file(
        r,
        "sys/fs/cgroup/db/memory.events",
        "low 0\nhigh 0\nmax 7\noom 0\noom_kill 0\n",
    );
    file(
        r,
        "sys/fs/cgroup/db/memory.stat",
        "anon 52428800\nfile 41943040\n",
    );
    file(
        r,
        "sys/fs/cgroup/db/memory.pressure",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=1500000\n\
         full avg10=0.00 avg60=0.00 avg300=0.00 total=500000\n",
    );
    let gov = MemoryGovernor::builder()
        .ceiling_environment(None, r)
        .build()
        .unwrap();
    // The ceiling is the cgroup's limit less the margin; the figures come from the same
    // cgroup.
    assert_eq!(gov.ceiling(), less_margin(256 << 20));
    let c = gov.snapshot().cgroup.unwrap();
    assert_eq!(c.version, CgroupVersion::V2);
    assert_eq!(
        (c.current, c.max, c.high),
        (Some(100 << 20), Some(256 << 20), None)
    );
    assert_eq!((c.events.max, c.stat.file), (Some(7), Some(40 << 20)));
    assert_eq!(c.pressure.unwrap().full.total_us, 500_000);
    // The limit moves: the next reading sees it.
    file(r, "sys/fs/cgroup/db/memory.max", "134217728\n");
    assert_eq!(gov.cgroup().unwrap().max, Some(128 << 20));
    let text = gov.prometheus();
    assert!(
        text.contains("\nnodedb_mem_cgroup_max_bytes 134217728\n"),
        "{text}"
    );
    assert!(
        text.contains("\nnodedb_mem_cgroup_pressure_stall_seconds_total{kind=\"some\"} 1.5\n"),
        "{text}"
    );
    // The cgroup removed under the process: every figure unknown, each file named, no panic.
    std::fs::remove_dir_all(r.join("sys/fs/cgroup/db")).unwrap();
    let c = gov.cgroup().unwrap();
    assert_eq!((c.current, c.max), (None, None));
    assert_eq!(c.problems.len(), 4, "{:?}", c.problems);
    assert!(
        gov.prometheus()
            .contains("\nnodedb_mem_cgroup_read_problems 4\n")
    );
}

#[test]
fn outside_a_memory_cgroup_there_are_no_figures() {
    let root = tempfile::tempdir().unwrap();
    file(root.path(), "proc/meminfo", "MemTotal:       2097152 kB\n");
    let gov = MemoryGovernor::builder()
        .ceiling_environment(None, root.path())
        .build()
        .unwrap();
    assert_eq!(gov.cgroup(), None);
    assert!(!gov.prometheus().contains("nodedb_mem_cgroup_"));
}

/// A v2 cgroup `db` with `memory.max` = `max`, 1 GiB of physical memory.
fn v2_root(max: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    file(r, "proc/self/cgroup", "0::/db\n");
    file(r, "proc/meminfo", "MemTotal:       1048576 kB\n");
    file(r, "sys/fs/cgroup/db/memory.current", "0\n");
    file(r, "sys/fs/cgroup/db/memory.max", max);
    file(r, "sys/fs/cgroup/db/memory.high", "max\n");
    root
}

fn ceiling_events(gov: &MemoryGovernor) -> Vec<(u64, u64, CeilingCause, bool)> {
    gov.snapshot()
        .events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::CeilingChanged {
                from,
                to,
                cause,
                floors_squeezed,
                ..
            } => Some((from, to, cause, floors_squeezed)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_ceiling_from_the_cgroup_follows_its_limit_down_and_up() {
    let root = v2_root("268435456\n");
    let r = root.path();
    let max = r.join("sys/fs/cgroup/db/memory.max");
    let gov = MemoryGovernor::builder()
        .ceiling_environment(None, r)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, Size::Fraction(0.5))
        .build()
        .unwrap();
    let c0 = less_margin(256 * MIB);
    assert_eq!(gov.ceiling(), c0);
    assert_eq!(gov.limit(EngineId::Query), c0 / 2);
    let held = gov.reserve(EngineId::Query, 100 * MIB).unwrap();
    assert_eq!(gov.follow_cgroup(), None, "nothing moved");

    // memory.max halved (as a kubelet resizing the pod would): the ceiling and every budget
    // follow; Query is above its new limit, keeps its bytes, and is refused more.
    std::fs::write(&max, "134217728\n").unwrap();
    let change = gov.follow_cgroup().unwrap();
    let c1 = less_margin(128 * MIB);
    assert_eq!((change.from, change.to), (c0, c1));
    assert_eq!(gov.ceiling(), c1);
    assert_eq!(gov.limit(EngineId::Query), (c0 / 2) * c1 / c0);
    assert_eq!(gov.usage(EngineId::Query), 100 * MIB);
    assert_eq!(gov.pressure(EngineId::Query), PressureLevel::Emergency);
    assert!(matches!(
        gov.reserve(EngineId::Query, MIB),
        Err(MemError::BudgetExceeded { .. })
    ));
    assert_eq!(change.over, 0, "100 MiB is under the new ceiling");
    assert_eq!(
        gov.ceiling_source(),
        CeilingSource::Cgroup {
            path: max.clone(),
            limit: 128 * MIB
        }
    );
    gov.check_consistency().unwrap();

    // memory.high below memory.max: the ceiling follows the lower one.
    std::fs::write(r.join("sys/fs/cgroup/db/memory.high"), "100663296\n").unwrap();
    let change = gov.follow_cgroup().unwrap();
    assert_eq!(change.to, less_margin(96 * MIB));
    // Usage (100 MiB) is above it now: the time until it is under is recorded, with the
    // refusals and spills meanwhile.
    assert_eq!(change.over, 100 * MIB - less_margin(96 * MIB));
    let spill = gov
        .spill_controller(EngineId::Query, nodedb_mem::SpillConfig::default())
        .unwrap();
    assert!(matches!(
        spill.poll(),
        nodedb_mem::SpillAction::BeginSpill { .. }
    ));
    assert!(gov.reserve(EngineId::Query, MIB).is_err());
    assert!(gov.reserve(EngineId::Query, 2 * MIB).is_err());
    drop(held);
    gov.rebalance();
    let under: Vec<_> = gov
        .snapshot()
        .events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::UnderCeiling {
                ceiling,
                after,
                refusals,
                spills,
            } => Some((ceiling, after, refusals, spills)),
            _ => None,
        })
        .collect();
    assert_eq!(under.len(), 2, "{under:?}"); // one at once (c1), one after the release
    assert_eq!(under[0].0, c1);
    assert_eq!(under[1].0, less_margin(96 * MIB));
    assert!(under[1].1 < Duration::from_secs(30));
    assert_eq!((under[1].2, under[1].3), (2, 1), "{under:?}");
    assert_eq!(gov.snapshot().spills_begun, 1);

    // Garbage, then the whole cgroup gone: the last good ceiling stands.
    std::fs::write(&max, "a lot\n").unwrap();
    assert_eq!(gov.follow_cgroup(), None);
    std::fs::rename(r.join("sys/fs/cgroup/db"), r.join("sys/fs/cgroup/gone")).unwrap();
    assert_eq!(gov.follow_cgroup(), None);
    assert_eq!(gov.ceiling(), less_margin(96 * MIB));
    std::fs::rename(r.join("sys/fs/cgroup/gone"), r.join("sys/fs/cgroup/db")).unwrap();

    // Raised (and memory.high lifted): the room comes back, budgets grow in proportion.
    std::fs::write(&max, "536870912\n").unwrap();
    std::fs::write(r.join("sys/fs/cgroup/db/memory.high"), "max\n").unwrap();
    let change = gov.follow_cgroup().unwrap();
    let c2 = less_margin(512 * MIB);
    assert_eq!(change.to, c2);
    assert_eq!(gov.limit(EngineId::Query), (c0 / 2) * c2 / c0);
    let big = gov.reserve(EngineId::Query, 200 * MIB).unwrap();

    // Lifted altogether: 80 % of physical memory (1 GiB).
    std::fs::write(&max, "max\n").unwrap();
    let change = gov.follow_cgroup().unwrap();
    assert_eq!(change.to, 858_993_459);
    assert_eq!(
        gov.ceiling_source(),
        CeilingSource::PhysicalMemory { total: 1 << 30 }
    );
    drop(big);
    assert_eq!(gov.snapshot().ceiling_changes, 4);
    assert!(
        gov.prometheus()
            .contains("\nnodedb_mem_cgroup_limit_below_ceiling 0\n")
    );
    assert!(
        gov.prometheus()
            .contains("\nnodedb_mem_ceiling_changes_total 4\n")
    );
    let causes: Vec<CeilingCause> = ceiling_events(&gov).iter().map(|e| e.2).collect();
    assert_eq!(
        causes,
        [
            CeilingCause::CgroupMax,
            CeilingCause::CgroupHigh,
            CeilingCause::CgroupMax,
            CeilingCause::CgroupMax
        ]
    );
    gov.check_consistency().unwrap();
}

#[test]
fn an_explicit_ceiling_never_follows_but_a_lower_cgroup_limit_is_reported() {
    let root = v2_root("268435456\n");
    let r = root.path();
    let gov = MemoryGovernor::builder()
        .ceiling_environment(Some("200MiB"), r)
        .build()
        .unwrap();
    assert_eq!(gov.ceiling(), 200 * MIB);
    assert_eq!(gov.follow_cgroup(), None);
    std::fs::write(r.join("sys/fs/cgroup/db/memory.max"), "134217728\n").unwrap();
    assert_eq!(gov.follow_cgroup(), None);
    assert_eq!(gov.follow_cgroup(), None); // reported once per value
    assert_eq!(gov.ceiling(), 200 * MIB);
    let reports: Vec<_> = gov
        .snapshot()
        .events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::CgroupBelowCeiling { limit, ceiling } => Some((limit, ceiling)),
            _ => None,
        })
        .collect();
    assert_eq!(reports, [(128 * MIB, 200 * MIB)]);
    assert!(ceiling_events(&gov).is_empty());
    assert!(
        gov.prometheus()
            .contains("\nnodedb_mem_cgroup_limit_below_ceiling 1\n")
    );
}

#[test]
fn a_ceiling_below_the_floors_leaves_the_engines_at_their_floors_and_loses_nothing() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(100 * MIB)
        .overhead_reserve(0.0)
        .budget(EngineId::Vector, 40 * MIB)
        .floor(EngineId::Vector, 30 * MIB)
        .budget(EngineId::Query, 40 * MIB)
        .floor(EngineId::Query, 10 * MIB)
        .build()
        .unwrap();
    let vectors = gov.reserve(EngineId::Vector, 25 * MIB).unwrap();
    // A quarter: Vector's budget 10 MiB, below its 30 MiB floor; Query's 10 MiB, at its floor.
    let change = gov.set_ceiling(25 * MIB).unwrap();
    assert!(change.floors_squeezed);
    assert_eq!(
        (
            change.limits[EngineId::Vector.index()],
            change.limits[EngineId::Query.index()]
        ),
        (10 * MIB, 10 * MIB)
    );
    assert_eq!(
        (
            gov.budget(EngineId::Vector).floor(),
            gov.budget(EngineId::Query).floor()
        ),
        (10 * MIB, 10 * MIB)
    );
    assert_eq!(change.over, 0);
    assert_eq!(gov.usage(EngineId::Vector), 25 * MIB);
    assert_eq!(gov.pressure(EngineId::Vector), PressureLevel::Emergency);
    assert_eq!(
        ceiling_events(&gov),
        [(100 * MIB, 25 * MIB, CeilingCause::Set, true)]
    );
    gov.check_consistency().unwrap();
    // Back up: the configured floors return.
    drop(vectors);
    let change = gov.set_ceiling(100 * MIB).unwrap();
    assert!(!change.floors_squeezed);
    assert_eq!(gov.budget(EngineId::Vector).floor(), 30 * MIB);
    assert_eq!(gov.limits()[EngineId::Vector.index()], 40 * MIB);
}

#[test]
fn a_moved_ceiling_refuses_waiters_it_cannot_hold_and_grants_those_it_can() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(64 * MIB)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, 32 * MIB)
        .cap(EngineId::Query, 32 * MIB)
        .build()
        .unwrap();
    let held = gov.reserve(EngineId::Query, 30 * MIB).unwrap();
    let g = gov.clone();
    let small = std::thread::spawn(move || {
        g.reserve_blocking(EngineId::Query, None, 20 * MIB, Duration::from_secs(30))
    });
    while gov.snapshot().engine(EngineId::Query).waiters == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Halved: Query's cap is 16 MiB, below the 20 MiB waiting: refused, naming the cap.
    gov.set_ceiling(32 * MIB).unwrap();
    match small.join().unwrap() {
        Err(MemError::NeverFits { limit, max, .. }) => {
            assert_eq!(
                (limit, max),
                (nodedb_mem::Limit::Cap(EngineId::Query), 16 * MIB)
            );
        }
        other => panic!("{other:?}"),
    }
    drop(held);
    // Doubled again: a waiting request that fits only the raised limit is granted by the move.
    let held = gov.reserve(EngineId::Query, 10 * MIB).unwrap();
    let g = gov.clone();
    let waiter = std::thread::spawn(move || {
        g.reserve_blocking(EngineId::Query, None, 12 * MIB, Duration::from_secs(30))
    });
    while gov.snapshot().engine(EngineId::Query).waiters == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    gov.set_ceiling(64 * MIB).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap().size(), 12 * MIB);
    drop(held);
}

#[test]
fn a_ceiling_out_of_bounds_is_refused_and_changes_nothing() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(64 * MIB)
        .build()
        .unwrap();
    let limits = gov.limits();
    for bad in [0, MIB - 1, nodedb_mem::MAX_CEILING + 1] {
        let e = gov.set_ceiling(bad).unwrap_err();
        assert!(
            e.to_string()
                .ends_with(": must be between 1 MiB and 1024 TiB"),
            "{e}"
        );
    }
    assert_eq!(
        gov.set_ceiling(0).unwrap_err().to_string(),
        "invalid configuration `ceiling` = 0 B: must be between 1 MiB and 1024 TiB"
    );
    assert_eq!((gov.ceiling(), gov.limits()), (64 * MIB, limits));
    assert!(ceiling_events(&gov).is_empty());
}

#[test]
fn limits_never_sum_above_a_ceiling_that_moves_under_load() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(256 * MIB)
        .build()
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let (gov, stop) = (&gov, &stop);
            s.spawn(move || {
                let e = EngineId::ALL[t as usize];
                let mut held = Vec::new();
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    if let Ok(r) = gov.reserve(e, (1 + (i * 7 + t) % 8) * MIB) {
                        held.push(r);
                    }
                    if held.len() > 6 {
                        held.remove(0);
                    }
                }
            });
        }
        for round in 0..200u64 {
            let c = [256, 96, 160, 32, 200][(round % 5) as usize] * MIB;
            gov.set_ceiling(c).unwrap();
            let limits: u64 = gov.limits().iter().sum();
            assert!(limits <= gov.ceiling(), "{limits} > {}", gov.ceiling());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    assert_eq!(gov.global_usage(), 0);
    gov.check_consistency().unwrap();
}

#[test]
fn the_cgroups_stall_time_sets_the_floor_of_the_global_pressure() {
    let root = v2_root("268435456\n");
    let r = root.path();
    let psi = r.join("sys/fs/cgroup/db/memory.pressure");
    let write = |some: f64, full: f64| {
        std::fs::write(
            &psi,
            format!(
                "some avg10={some:.2} avg60=0.00 avg300=0.00 total=1\n\
                 full avg10={full:.2} avg60=0.00 avg300=0.00 total=1\n"
            ),
        )
        .unwrap();
    };
    let gov = MemoryGovernor::builder()
        .ceiling_environment(None, r)
        .build()
        .unwrap();
    // No usage at all: only the kernel's stall time moves the level.
    let cases = [
        (0.0, 0.0, PressureLevel::Normal),
        (9.99, 0.0, PressureLevel::Normal),
        (10.0, 0.0, PressureLevel::Warning),
        (30.0, 0.0, PressureLevel::Critical),
        (12.0, 10.0, PressureLevel::Critical),
        (50.0, 30.0, PressureLevel::Emergency),
        (1.0, 0.0, PressureLevel::Normal),
    ];
    for (some, full, level) in cases {
        write(some, full);
        assert_eq!(gov.sample_cgroup_pressure(), Some(level), "{some} {full}");
        assert_eq!(gov.global_pressure(), level, "{some} {full}");
        assert_eq!(gov.snapshot().kernel_pressure, level);
    }
    write(50.0, 30.0);
    gov.sample_cgroup_pressure();
    assert!(
        gov.prometheus()
            .contains("\nnodedb_mem_kernel_pressure_level 3\n")
    );
    // Unreadable: no floor.
    std::fs::remove_file(&psi).unwrap();
    assert_eq!(gov.sample_cgroup_pressure(), None);
    assert_eq!(gov.global_pressure(), PressureLevel::Normal);
    let transitions = gov
        .snapshot()
        .events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Pressure { engine: None, .. }))
        .count();
    assert_eq!(transitions, 6);
}

#[test]
fn a_limit_set_on_a_cgroup_that_had_none_is_followed() {
    // No limit at the start: the ceiling is 80 % of the 1 GiB of physical memory.
    let root = v2_root("max\n");
    let r = root.path();
    let gov = MemoryGovernor::builder()
        .ceiling_environment(None, r)
        .build()
        .unwrap();
    assert_eq!(
        (gov.ceiling(), gov.ceiling_source()),
        (
            858_993_459,
            CeilingSource::PhysicalMemory { total: 1 << 30 }
        )
    );
    assert_eq!(gov.follow_cgroup(), None, "still no limit: nothing moves");
    std::fs::write(r.join("sys/fs/cgroup/db/memory.max"), "268435456\n").unwrap();
    let change = gov.follow_cgroup().unwrap();
    assert_eq!(change.to, less_margin(256 * MIB));
    assert!(matches!(
        gov.ceiling_source(),
        CeilingSource::Cgroup { limit, .. } if limit == 256 * MIB
    ));
}
