//! Random operation sequences against a simple sequential model of the ledger.

use nodedb_mem::{EngineId, MemError, MemoryGovernor, RebalanceConfig, Reservation};
use proptest::prelude::*;

const CEILING: u64 = 1 << 20;

#[derive(Clone, Debug)]
enum Op {
    Reserve(usize, u64),
    /// Reserve what the engine has available, plus `-1`, `0` or `+1` bytes: the boundary.
    ReserveEdge(usize, i64),
    Grow(usize, u64),
    Shrink(usize, u64),
    Split(usize, u64),
    Drop(usize),
    Charge(usize, u64),
    Credit(usize, u64),
    Rebalance,
}

fn op() -> impl Strategy<Value = Op> {
    let engine = 0..EngineId::COUNT;
    let bytes = prop_oneof![0..4096u64, 0..(CEILING / 2)];
    prop_oneof![
        (engine.clone(), bytes.clone()).prop_map(|(e, b)| Op::Reserve(e, b)),
        (engine.clone(), -1i64..=1).prop_map(|(e, d)| Op::ReserveEdge(e, d)),
        (any::<usize>(), bytes.clone()).prop_map(|(i, b)| Op::Grow(i, b)),
        (any::<usize>(), bytes.clone()).prop_map(|(i, b)| Op::Shrink(i, b)),
        (any::<usize>(), bytes.clone()).prop_map(|(i, b)| Op::Split(i, b)),
        any::<usize>().prop_map(Op::Drop),
        (engine.clone(), bytes.clone()).prop_map(|(e, b)| Op::Charge(e, b)),
        (engine, bytes).prop_map(|(e, b)| Op::Credit(e, b)),
        Just(Op::Rebalance),
    ]
}

#[derive(Default, Clone, Copy, Debug)]
struct Engine {
    used: u64,
    reserved: u64,
    limit: u64,
}

struct Model {
    engines: [Engine; EngineId::COUNT],
}

impl Model {
    fn global(&self) -> u64 {
        self.engines.iter().map(|e| e.used + e.reserved).sum()
    }
    /// What the governor must answer to a reservation of `bytes` for `e`.
    fn admits(&self, e: usize, bytes: u64) -> bool {
        let m = self.engines[e];
        bytes == 0 || (m.used + m.reserved + bytes <= m.limit && self.global() + bytes <= CEILING)
    }
}

fn check(gov: &MemoryGovernor, model: &Model) -> Result<(), TestCaseError> {
    for e in EngineId::ALL {
        let m = model.engines[e.index()];
        let b = gov.budget(e);
        prop_assert_eq!(
            (b.used(), b.reserved(), b.limit()),
            (m.used, m.reserved, m.limit),
            "{}",
            e
        );
        prop_assert_eq!(b.usage(), m.used + m.reserved);
    }
    prop_assert_eq!(gov.global_usage(), model.global());
    gov.check_consistency().map_err(TestCaseError::fail)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn the_ledger_matches_a_sequential_model(ops in prop::collection::vec(op(), 1..120)) {
        let gov = MemoryGovernor::builder()
            .global_ceiling(CEILING)
            .rebalance(RebalanceConfig { min_move: 1, ..Default::default() })
            .build()
            .unwrap();
        let mut model = Model { engines: [Engine::default(); EngineId::COUNT] };
        for e in EngineId::ALL {
            model.engines[e.index()].limit = gov.limit(e);
        }
        let mut held: Vec<Reservation> = Vec::new();
        for op in ops {
            let op = match op {
                Op::ReserveEdge(e, delta) => {
                    let m = model.engines[e];
                    let available = m.limit.saturating_sub(m.used + m.reserved)
                        .min(CEILING.saturating_sub(model.global()));
                    Op::Reserve(e, available.saturating_add_signed(delta))
                }
                op => op,
            };
            match op {
                Op::Reserve(e, bytes) => {
                    let engine = EngineId::ALL[e];
                    let expect = model.admits(e, bytes);
                    match gov.reserve(engine, bytes) {
                        Ok(r) => {
                            prop_assert!(expect, "admitted {} for {}", bytes, engine);
                            model.engines[e].reserved += bytes;
                            held.push(r);
                        }
                        Err(err) => {
                            prop_assert!(!expect, "refused {} for {}: {}", bytes, engine, err);
                            prop_assert!(err.is_over_budget());
                        }
                    }
                }
                Op::Grow(i, bytes) if !held.is_empty() => {
                    let n = held.len();
                    let r = &mut held[i % n];
                    let e = r.engine().index();
                    let expect = model.admits(e, bytes);
                    prop_assert_eq!(r.try_grow(bytes).is_ok(), expect);
                    if expect {
                        model.engines[e].reserved += bytes;
                    }
                }
                Op::Shrink(i, bytes) if !held.is_empty() => {
                    let n = held.len();
                    let r = &mut held[i % n];
                    let e = r.engine().index();
                    let fits = bytes <= r.size();
                    match r.shrink(bytes) {
                        Ok(()) => {
                            prop_assert!(fits);
                            model.engines[e].reserved -= bytes;
                        }
                        Err(err) => {
                            prop_assert!(!fits);
                            let is_too_small = matches!(err, MemError::ReservationTooSmall { .. });
                            prop_assert!(is_too_small);
                        }
                    }
                }
                Op::Split(i, bytes) if !held.is_empty() => {
                    let n = held.len();
                    let r = &mut held[i % n];
                    let fits = bytes <= r.size();
                    match r.split(bytes) {
                        Ok(part) => {
                            prop_assert!(fits);
                            held.push(part);
                        }
                        Err(_) => prop_assert!(!fits),
                    }
                }
                Op::Drop(i) if !held.is_empty() => {
                    let r = held.swap_remove(i % held.len());
                    model.engines[r.engine().index()].reserved -= r.size();
                }
                Op::Charge(e, bytes) => {
                    gov.charge(EngineId::ALL[e], bytes);
                    model.engines[e].used += bytes;
                }
                Op::Credit(e, bytes) => {
                    let ok = bytes <= model.engines[e].used;
                    prop_assert_eq!(gov.credit(EngineId::ALL[e], bytes).is_ok(), ok);
                    if ok {
                        model.engines[e].used -= bytes;
                    }
                }
                Op::Rebalance => {
                    gov.rebalance();
                    for e in EngineId::ALL {
                        let b = gov.budget(e);
                        prop_assert!(b.floor() <= b.limit() && b.limit() <= b.cap());
                        model.engines[e.index()].limit = b.limit();
                    }
                    let total: u64 = model.engines.iter().map(|m| m.limit).sum();
                    prop_assert!(total <= CEILING);
                }
                _ => {}
            }
            check(&gov, &model)?;
        }
        drop(held);
        for e in EngineId::ALL {
            prop_assert_eq!(gov.budget(e).reserved(), 0);
        }
    }
}
