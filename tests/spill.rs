//! The spill controller's hysteresis and the reclaimers the governor calls.

use std::sync::{Arc, Mutex};

use nodedb_mem::{
    EngineId, EventKind, MemoryGovernor, RebalanceConfig, Reclaimer, Reservation, SpillAction,
    SpillConfig,
};

mod common;
use common::{MIB, two_big_engines as gov};

#[test]
fn spilling_begins_at_90_and_restores_below_75_percent() {
    let gov = gov();
    let spill = gov
        .spill_controller(EngineId::Query, SpillConfig::default())
        .unwrap();
    let mut r = gov.reserve(EngineId::Query, 35 * MIB).unwrap(); // 87.5 %
    assert_eq!(spill.poll(), SpillAction::None);
    r.try_grow(MIB).unwrap(); // 90 %: begin, free 36 - 30 = 6 MiB to reach 75 %
    assert_eq!(spill.poll(), SpillAction::BeginSpill { bytes: 6 * MIB });
    assert!(spill.is_spilling());
    r.shrink(4 * MIB).unwrap(); // 80 %: inside the band, keep spilling
    assert_eq!(spill.poll(), SpillAction::ContinueSpill { bytes: 2 * MIB });
    r.shrink(2 * MIB).unwrap(); // exactly 75 %: not below yet
    assert_eq!(spill.poll(), SpillAction::ContinueSpill { bytes: 0 });
    r.shrink(1).unwrap();
    assert_eq!(spill.poll(), SpillAction::Restore);
    assert_eq!(spill.poll(), SpillAction::None);
    assert!(!spill.is_spilling());
    r.try_grow(MIB).unwrap(); // 77.5 %: below the begin threshold, nothing
    assert_eq!(spill.poll(), SpillAction::None);
}

#[test]
fn concurrent_pollers_see_one_begin_and_one_restore() {
    let gov = gov();
    let spill = Arc::new(
        gov.spill_controller(EngineId::Query, SpillConfig::default())
            .unwrap(),
    );
    let r = gov.reserve(EngineId::Query, 38 * MIB).unwrap();
    let poll_all = |spill: &Arc<nodedb_mem::SpillController>| {
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|_| s.spawn(|| spill.poll())).collect();
            hs.into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        })
    };
    let actions = poll_all(&spill);
    let begins = actions
        .iter()
        .filter(|a| matches!(a, SpillAction::BeginSpill { .. }))
        .count();
    assert_eq!(begins, 1, "{actions:?}");
    drop(r);
    let actions = poll_all(&spill);
    let restores = actions
        .iter()
        .filter(|a| **a == SpillAction::Restore)
        .count();
    assert_eq!(restores, 1, "{actions:?}");
}

#[test]
fn bad_spill_configurations_are_refused() {
    let gov = gov();
    let err = gov
        .spill_controller(
            EngineId::Query,
            SpillConfig {
                begin: 1.5,
                restore: 0.5,
            },
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration `spill.begin` = 1.5: must be above 0 and at most 1"
    );
    let err = gov
        .spill_controller(
            EngineId::Query,
            SpillConfig {
                begin: 0.9,
                restore: 0.0,
            },
        )
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration `spill.restore` = 0: must be above 0 and below spill.begin (0.9)"
    );
}

/// A cache made of reservations that it drops on request.
struct Cache {
    entries: Mutex<Vec<Reservation>>,
    calls: Mutex<Vec<u64>>,
}

impl Reclaimer for Cache {
    fn reclaimable(&self) -> u64 {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .map(Reservation::size)
            .sum()
    }
    fn reclaim(&self, bytes: u64) -> u64 {
        self.calls.lock().unwrap().push(bytes);
        let mut entries = self.entries.lock().unwrap();
        let mut freed = 0;
        while freed < bytes {
            let Some(r) = entries.pop() else { break };
            freed += r.size();
        }
        freed
    }
}

fn cache(gov: &MemoryGovernor, engine: EngineId, entries: u64, size: u64) -> Arc<Cache> {
    Arc::new(Cache {
        entries: Mutex::new(
            (0..entries)
                .map(|_| gov.reserve(engine, size).unwrap())
                .collect(),
        ),
        calls: Mutex::new(Vec::new()),
    })
}

#[test]
fn a_borrower_shrunk_below_its_usage_is_asked_to_free() {
    // Only Vector can lend: the four small engines sit at their floors.
    let mut b = MemoryGovernor::builder()
        .global_ceiling(100 * MIB)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, 40 * MIB)
        .floor(EngineId::Query, 10 * MIB)
        .budget(EngineId::Vector, 40 * MIB)
        .floor(EngineId::Vector, 10 * MIB)
        .rebalance(RebalanceConfig {
            min_move: 1,
            ..Default::default()
        });
    for e in [
        EngineId::Sparse,
        EngineId::Crdt,
        EngineId::Timeseries,
        EngineId::Unattributed,
    ] {
        b = b.budget(e, 5 * MIB).floor(e, 5 * MIB);
    }
    let gov = b.build().unwrap();
    let (q, v) = (EngineId::Query, EngineId::Vector);
    let query_cache = cache(&gov, q, 36, MIB); // Query busy at 36 of 40 MiB
    let _h = gov.register_reclaimer(q, query_cache.clone());
    assert_eq!(gov.reclaimable(q), 36 * MIB);
    gov.rebalance(); // Query borrows Vector's idle 20 MiB: limit 60 MiB
    let more: Vec<_> = (0..14).map(|_| gov.reserve(q, MIB).unwrap()).collect(); // 50 of 60
    // Vector becomes busy and takes its 20 MiB back: Query, at 50 MiB, is left with 40.
    let _vector = gov.reserve(v, 15 * MIB).unwrap();
    let report = gov.rebalance();
    assert_eq!(gov.limit(q), 40 * MIB);
    // Asked to come down to 60 % of 40 MiB = 24 MiB, i.e. free 26 MiB.
    assert_eq!(*query_cache.calls.lock().unwrap(), vec![26 * MIB]);
    assert_eq!(report.reclaimed, vec![(q, 26 * MIB)]);
    assert_eq!(gov.usage(q), 24 * MIB);
    let snap = gov.snapshot();
    assert!(snap.events.iter().any(|e| e.kind
        == EventKind::Reclaim {
            engine: q,
            requested: 26 * MIB,
            freed: 26 * MIB
        }));
    drop(more);
}

#[test]
fn critical_global_pressure_asks_the_engine_with_most_to_give() {
    let gov = gov();
    let crdt = cache(&gov, EngineId::Crdt, 4, MIB); // 4 MiB reclaimable
    let ts = cache(&gov, EngineId::Timeseries, 2, MIB); // 2 MiB reclaimable
    let _a = gov.register_reclaimer(EngineId::Crdt, crdt.clone());
    let _b = gov.register_reclaimer(EngineId::Timeseries, ts.clone());
    // The rest of the process pushes usage to 90 of 100 MiB (critical).
    gov.charge(EngineId::Unattributed, 84 * MIB);
    let report = gov.rebalance();
    // Down to the warning threshold (70 MiB) would take 20 MiB: Crdt first (4), then
    // Timeseries (2); neither has more.
    assert_eq!(*crdt.calls.lock().unwrap(), vec![20 * MIB]);
    assert_eq!(*ts.calls.lock().unwrap(), vec![16 * MIB]);
    assert!(report.reclaimed.contains(&(EngineId::Crdt, 4 * MIB)));
    assert!(report.reclaimed.contains(&(EngineId::Timeseries, 2 * MIB)));
    assert_eq!(gov.global_usage(), 84 * MIB);
    gov.credit(EngineId::Unattributed, 84 * MIB).unwrap();
}

#[test]
fn dropping_the_handle_unregisters() {
    let gov = gov();
    let c = cache(&gov, EngineId::Sparse, 2, MIB);
    let h = gov.register_reclaimer(EngineId::Sparse, c.clone());
    assert_eq!(gov.reclaimable(EngineId::Sparse), 2 * MIB);
    drop(h);
    assert_eq!(gov.reclaimable(EngineId::Sparse), 0);
    assert_eq!(gov.reclaim(EngineId::Sparse, MIB), 0);
    assert!(c.calls.lock().unwrap().is_empty());
}

/// Counts its calls; `panics` makes every call panic.
struct Flaky {
    calls: std::sync::atomic::AtomicU64,
    panics: bool,
}

impl Flaky {
    fn new(panics: bool) -> Arc<Flaky> {
        Arc::new(Flaky {
            calls: Default::default(),
            panics,
        })
    }
    fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Reclaimer for Flaky {
    fn reclaimable(&self) -> u64 {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.panics {
            panic!("reclaimer state is broken");
        }
        MIB
    }
    fn reclaim(&self, _bytes: u64) -> u64 {
        MIB
    }
}

#[test]
fn a_panicking_reclaimer_is_reported_unregistered_and_the_others_still_asked() {
    let gov = gov();
    let bad = Flaky::new(true);
    let good = Flaky::new(false);
    let _b = gov.register_reclaimer(EngineId::Query, bad.clone());
    let _g = gov.register_reclaimer(EngineId::Query, good.clone());
    assert_eq!(gov.reclaim(EngineId::Query, 4 * MIB), MIB);
    assert_eq!((bad.calls(), good.calls()), (1, 1));
    let snap = gov.snapshot();
    assert_eq!(snap.callback_panics, 1);
    assert!(snap.events.iter().any(|e| e.kind
        == EventKind::CallbackPanicked {
            engine: Some(EngineId::Query),
            what: "reclaimable",
        }));
    assert!(
        snap.to_prometheus()
            .contains("nodedb_mem_callback_panics_total 1\n")
    );
    // Unregistered: not asked again.
    assert_eq!(gov.reclaimable(EngineId::Query), MIB);
    assert_eq!(gov.reclaim(EngineId::Query, 4 * MIB), MIB);
    assert_eq!(bad.calls(), 1);
    assert_eq!(gov.snapshot().callback_panics, 1);
}

#[test]
fn the_background_thread_goes_on_after_a_reclaimer_panics() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(100 * MIB)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, 95 * MIB)
        .build()
        .unwrap();
    // Critical global pressure: every tick asks every engine's reclaimers.
    let _held = gov.reserve(EngineId::Query, 92 * MIB).unwrap();
    let bad = Flaky::new(true);
    let good = Flaky::new(false);
    let _b = gov.register_reclaimer(EngineId::Query, bad.clone());
    let _g = gov.register_reclaimer(EngineId::Vector, good.clone());
    let bg = gov
        .spawn_rebalancer(std::time::Duration::from_millis(5))
        .unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while good.calls() < 20 && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(good.calls() >= 20, "{} calls", good.calls());
    assert_eq!(bad.calls(), 1);
    assert_eq!(gov.snapshot().callback_panics, 1);
    assert!(bg.stop() >= 10);
}
