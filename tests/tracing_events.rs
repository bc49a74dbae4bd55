//! Breach events reach an application's `tracing` subscriber.

use std::sync::{Arc, Mutex};

use nodedb_mem::{EngineId, MemoryGovernor, RebalanceConfig};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{Layer, Registry};

#[path = "common/child.rs"]
mod child;

#[derive(Clone, Default)]
struct Collected(Arc<Mutex<Vec<String>>>);

struct Fields(String);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!(" {}={:?}", field.name(), value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.push_str(&format!(" {}={}", field.name(), value));
    }
}

impl<S: tracing::Subscriber> Layer<S> for Collected {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut f = Fields(format!(
            "{} {}",
            event.metadata().level(),
            event.metadata().target()
        ));
        event.record(&mut f);
        self.0.lock().unwrap().push(f.0);
    }
}

#[test]
fn rejections_transitions_and_moves_are_traced() {
    let collected = Collected::default();
    let subscriber = Registry::default().with(collected.clone());
    tracing::subscriber::with_default(subscriber, || {
        let gov = lending_governor();
        let _held = gov.reserve(EngineId::Query, 36 << 20).unwrap();
        let _ = gov.reserve(EngineId::Query, 8 << 20).unwrap_err();
        // A budget's refusal is traced when pumped (its top sites looked up then, off the
        // refusing thread): this governor has no background thread, a snapshot pumps.
        assert!(collected.0.lock().unwrap().is_empty());
        let _ = gov.snapshot();
        let seen = {
            let events = collected.0.lock().unwrap();
            // The refusal, and the pressure change the snapshot found.
            assert!(events.len() <= 2, "{events:?}");
            assert_eq!(
                events[0],
                "WARN nodedb_mem message=reservation refused by the engine's budget seq=0 engine=query requested=8388608 used=37748736 limit=41943040 top_sites=none sampled"
            );
            events.len()
        };
        // A poll records a transition without calling the subscriber...
        gov.pressure(EngineId::Query);
        assert_eq!(collected.0.lock().unwrap().len(), seen);
        // ...and the moves reach it at the next rebalance step.
        let report = gov.rebalance();
        assert!(!report.moves.is_empty());
        let events = collected.0.lock().unwrap();
        assert!(events.iter().any(|e| e
            == "INFO nodedb_mem message=pressure level changed seq=1 engine=query from=normal to=critical"),
            "{events:?}");
        let moves = events
            .iter()
            .filter(|e| e.contains("message=rebalanced budget"))
            .count();
        assert_eq!(moves, report.moves.len());
    });
}

#[test]
fn scope_refusals_and_limit_changes_are_traced_with_the_scope() {
    let collected = Collected::default();
    let subscriber = Registry::default().with(collected.clone());
    tracing::subscriber::with_default(subscriber, || {
        let gov = MemoryGovernor::builder()
            .global_ceiling(100 << 20)
            .build()
            .unwrap();
        let db = gov.create_scope("sales", None, 4 << 20).unwrap();
        let t = gov.create_scope("acme", Some(&db), 8 << 20).unwrap();
        let _ = gov.reserve_in(EngineId::Query, &t, 5 << 20).unwrap_err();
        gov.set_scope_limit(&db, 8 << 20).unwrap();
        let _held = gov.reserve_in(EngineId::Query, &t, 7 << 20).unwrap();
        gov.scope_pressure(&t);
        let _ = gov.snapshot();
        let events = collected.0.lock().unwrap();
        assert_eq!(
            events[..2],
            [
                format!(
                    "WARN nodedb_mem message=reservation refused by a scope's limit seq=0 \
                     scope=sales scope_id={} engine=query requested=5242880 used=0 \
                     limit=4194304",
                    db.id().get()
                ),
                format!(
                    "INFO nodedb_mem message=scope limit changed seq=1 scope=sales scope_id={} \
                     from=4194304 to=8388608 usage=0",
                    db.id().get()
                ),
            ]
        );
        assert!(
            events.iter().any(|e| *e
                == format!(
                    "INFO nodedb_mem message=scope pressure level changed seq=2 scope_id={} \
                     from=normal to=critical",
                    t.id().get()
                )),
            "{events:?}"
        );
    });
}

/// A subscriber that calls back into the governor on every event (as a metrics exporter
/// might), and panics on the first rebalance move when `panic_once` is set.
struct Reentrant {
    gov: MemoryGovernor,
    calls: Arc<std::sync::atomic::AtomicU64>,
    panic_once: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl<S: tracing::Subscriber> Layer<S> for Reentrant {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let limits = self.gov.limits();
        let snap = self.gov.snapshot();
        assert!(limits.iter().sum::<u64>() <= snap.ceiling);
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut f = Fields(String::new());
        event.record(&mut f);
        if let Some(once) = &self.panic_once
            && f.0.contains("rebalanced budget")
            && !once.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            panic!("the subscriber failed");
        }
    }
}

/// Query with a 40 MiB budget under a 100 MiB ceiling; any move is made (`min_move` 1 B).
fn lending_governor() -> MemoryGovernor {
    MemoryGovernor::builder()
        .global_ceiling(100 << 20)
        .overhead_reserve(0.0)
        .budget(EngineId::Query, 40u64 << 20)
        .rebalance(RebalanceConfig {
            min_move: 1,
            ..Default::default()
        })
        .build()
        .unwrap()
}

#[test]
fn a_subscriber_calling_back_into_the_governor_does_not_deadlock_it() {
    let gov = lending_governor();
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let (theirs, their_calls) = (gov.clone(), Arc::clone(&calls));
    // On its own thread, so that a deadlock fails the test instead of hanging it.
    std::thread::spawn(move || {
        let subscriber = Registry::default().with(Reentrant {
            gov: theirs.clone(),
            calls: their_calls,
            panic_once: None,
        });
        tracing::subscriber::with_default(subscriber, || {
            let gov = theirs;
            let _held = gov.reserve(EngineId::Query, 36 << 20).unwrap();
            let _ = gov.reserve(EngineId::Query, 8 << 20).unwrap_err();
            // The refusal is traced when pumped: here, by this snapshot.
            let _ = gov.snapshot();
            gov.pressure(EngineId::Query);
            // Moves are emitted, and the pressure change pumped, while the subscriber calls
            // `limits()` and `snapshot()`.
            let report = gov.rebalance();
            let _ = gov.snapshot();
            let _ = gov.check_consistency();
            tx.send(report.moves.len()).unwrap();
        });
    });
    let moves = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the governor deadlocked under a re-entrant subscriber");
    assert!(moves > 0);
    // The refusal and each move reached the subscriber (the pressure change was pumped by
    // the subscriber's own snapshot, inside its callback, where `tracing` drops nested events).
    let calls = calls.load(std::sync::atomic::Ordering::Relaxed);
    assert!(calls > moves as u64, "{calls} calls, {moves} moves");
}

#[test]
fn a_background_thread_survives_a_panicking_subscriber() {
    let (ok, out) = child::run_child("child_background_survives_a_subscriber_panic", &[], None);
    assert!(ok && out.contains("1 passed"), "{out}");
}

#[test]
#[ignore = "run in its own process (it sets the global subscriber) by the test above"]
fn child_background_survives_a_subscriber_panic() {
    let gov = lending_governor();
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let panicked = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tracing::subscriber::set_global_default(Registry::default().with(Reentrant {
        gov: gov.clone(),
        calls: Arc::clone(&calls),
        panic_once: Some(Arc::clone(&panicked)),
    }))
    .unwrap();
    let bg = gov
        .spawn_rebalancer(std::time::Duration::from_millis(5))
        .unwrap();
    let _held = gov.reserve(EngineId::Query, 36 << 20).unwrap();
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while gov.snapshot().callback_panics == 0 && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(panicked.load(std::sync::atomic::Ordering::Relaxed));
    let snap = gov.snapshot();
    assert_eq!(snap.callback_panics, 1);
    assert!(snap.events.iter().any(|e| e.kind
        == nodedb_mem::EventKind::CallbackPanicked {
            engine: None,
            what: "background tick",
        }));
    // The thread goes on: a later borrower is served by it.
    let _other = gov.reserve(EngineId::Timeseries, 0).unwrap();
    let before = gov.limit(EngineId::Vector);
    let _vec = gov.reserve(EngineId::Vector, before * 9 / 10).unwrap();
    while gov.limit(EngineId::Vector) == before && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        gov.limit(EngineId::Vector) > before,
        "no move after the panic"
    );
    assert!(bg.stop() > 0);
}
