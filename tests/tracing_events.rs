//! Breach events reach an application's `tracing` subscriber.

use std::sync::{Arc, Mutex};

use nodedb_mem::{EngineId, MemoryGovernor, RebalanceConfig};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{Layer, Registry};

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
        let gov = MemoryGovernor::builder()
            .global_ceiling(100 << 20)
            .overhead_reserve(0.0)
            .budget(EngineId::Query, 40u64 << 20)
            .rebalance(RebalanceConfig {
                min_move: 1,
                ..Default::default()
            })
            .build()
            .unwrap();
        let _held = gov.reserve(EngineId::Query, 36 << 20).unwrap();
        let _ = gov.reserve(EngineId::Query, 8 << 20).unwrap_err();
        {
            let events = collected.0.lock().unwrap();
            assert_eq!(events.len(), 1, "{events:?}");
            assert_eq!(
                events[0],
                "WARN nodedb_mem message=reservation refused by the engine's budget seq=0 engine=query requested=8388608 used=37748736 limit=41943040"
            );
        }
        // The poll records the transition without calling the subscriber...
        gov.pressure(EngineId::Query);
        assert_eq!(collected.0.lock().unwrap().len(), 1);
        // ...which sees it at the next rebalance step, together with the moves.
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
        let _ = gov.reserve_in(&t, EngineId::Query, 5 << 20).unwrap_err();
        gov.set_scope_limit(&db, 8 << 20).unwrap();
        let _held = gov.reserve_in(&t, EngineId::Query, 7 << 20).unwrap();
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
