//! One rebalancing step: busy engines take back what they lent, idle engines lend spare limit
//! to busy ones, and engines left above their limit are asked to reclaim.

use crate::EngineId;
#[cfg(not(nodedb_mem_loom))]
use crate::error::Result;
use crate::events::EventKind;
use crate::governor::MemoryGovernor;
use crate::ledger::Ledger;
use crate::pressure::{PressureLevel, ratio_ppm};
use crate::sync::lock;

impl MemoryGovernor {
    /// One rebalancing step: busy engines below their budget take back what they lent, then
    /// idle engines lend spare limit to busy ones (see
    /// [`RebalanceConfig`](crate::RebalanceConfig)). An engine with requests waiting for
    /// memory is busy, and what they wait for counts as its demand; a step that moved limits
    /// serves the waiting requests. The sum of all limits never exceeds the ceiling: every
    /// move lowers one limit before raising another by the same amount.
    pub fn rebalance(&self) -> RebalanceReport {
        let inner = &*self.inner;
        let _serial = lock(&inner.rebalance_lock);
        let cfg = inner.rebalance;
        let target_ppm = (cfg.target_utilisation * 1e6).round() as u64;
        let idle_ppm = (cfg.idle_utilisation * 1e6).round() as u64;

        #[derive(Clone, Copy)]
        struct Seen {
            usage: u64,
            window_peak: u64,
            busy: bool,
            idle: bool,
        }
        let seen = EngineId::ALL.map(|e| {
            let b = self.budget(e);
            let window_peak = b.take_window_peak();
            let waiting = inner.ledger.waiters.figures(e).waiting_bytes;
            let busy = self.pressure(e) >= PressureLevel::Warning || waiting > 0;
            Seen {
                // Demand includes what overflowed, and what waits for memory: a borrower asks
                // for enough to hold both.
                usage: b.usage() + b.overflow_bytes() + waiting,
                window_peak,
                busy,
                idle: !busy && ratio_ppm(window_peak, b.limit()) < idle_ppm,
            }
        });
        // Moves are reported once the lock is released: a `tracing` subscriber may call back
        // into the governor (`limits()`, a snapshot), which takes this lock.
        let mut moves = Vec::new();
        let mut record = |from: EngineId, to: EngineId, bytes: u64| {
            moves.push(RebalanceMove { from, to, bytes });
        };

        // 1. Busy lenders take back what they lent, from engines above their own budget.
        for e in EngineId::ALL.into_iter().filter(|e| seen[e.index()].busy) {
            let b = self.budget(e);
            let mut need = b.base().saturating_sub(b.limit());
            while need > 0 {
                let donor = EngineId::ALL
                    .into_iter()
                    .filter(|&d| d != e)
                    .max_by_key(|&d| self.budget(d).limit().saturating_sub(self.budget(d).base()));
                let Some(d) = donor else { break };
                let surplus = self.budget(d).limit().saturating_sub(self.budget(d).base());
                if surplus == 0 {
                    break;
                }
                let x = need.min(surplus);
                self.budget(d).give_back(x);
                b.take_back(x);
                record(d, e, x);
                need -= x;
            }
        }

        // 2. Idle engines lend to busy ones, fullest borrower first.
        let mut borrowers: Vec<EngineId> = EngineId::ALL
            .into_iter()
            .filter(|e| seen[e.index()].busy)
            .collect();
        borrowers
            .sort_by_key(|&e| std::cmp::Reverse(ratio_ppm(seen[e.index()].usage, self.limit(e))));
        for e in borrowers {
            let b = self.budget(e);
            let wanted = div_ceil_ppm(seen[e.index()].usage, target_ppm);
            let mut want = wanted.min(b.cap()).saturating_sub(b.limit());
            for l in EngineId::ALL {
                if want < cfg.min_move {
                    break;
                }
                let s = seen[l.index()];
                if l == e || !s.idle {
                    continue;
                }
                let lender = self.budget(l);
                let keep = lender.floor().max(div_ceil_ppm(s.window_peak, target_ppm));
                let spare = lender.limit().saturating_sub(keep).min(lender.available());
                let x = want.min(spare);
                if x < cfg.min_move {
                    continue;
                }
                if lender.lend(x) {
                    b.borrow(x);
                    record(l, e, x);
                    want -= x;
                }
            }
        }
        drop(_serial);
        if !moves.is_empty() {
            self.publish_limits();
            Ledger::wake_waiters(&inner.ledger);
        }
        for m in &moves {
            inner.ledger.events.record(EventKind::Rebalance {
                from: m.from,
                to: m.to,
                bytes: m.bytes,
            });
        }
        // Engines left above their limit (a lender took its headroom back) are asked to free
        // down to the target utilisation; at critical global pressure, everyone is.
        let mut reclaimed = Vec::new();
        for e in EngineId::ALL {
            let b = self.budget(e);
            let want = b.usage().saturating_sub(b.limit());
            if want > 0 {
                let keep =
                    u64::try_from(u128::from(b.limit()) * u128::from(target_ppm) / 1_000_000)
                        .unwrap_or(u64::MAX);
                let freed = self.reclaim(e, b.usage().saturating_sub(keep));
                reclaimed.push((e, freed));
            }
        }
        if self.global_pressure() >= PressureLevel::Critical {
            let warning = crate::size::fraction_of(self.ceiling(), inner.thresholds.warning);
            let mut need = self.global_usage().saturating_sub(warning);
            let mut order: Vec<EngineId> = EngineId::ALL.to_vec();
            order.sort_by_key(|&e| std::cmp::Reverse(self.reclaimable(e)));
            for e in order {
                if need == 0 {
                    break;
                }
                let freed = self.reclaim(e, need);
                reclaimed.push((e, freed));
                need = need.saturating_sub(freed);
            }
        }
        for e in EngineId::ALL {
            self.pressure(e);
        }
        self.global_pressure();
        self.note_under_ceiling();
        inner.ledger.events.pump();
        RebalanceReport { moves, reclaimed }
    }

    #[cfg(not(nodedb_mem_loom))]
    /// Starts a background thread that calls [`rebalance`](Self::rebalance) every `interval`
    /// (which also refreshes pressure levels and emits pending breach events). The thread
    /// stops when the returned handle is dropped or
    /// [`Rebalancer::stop`](crate::Rebalancer::stop) is called.
    pub fn spawn_rebalancer(&self, interval: std::time::Duration) -> Result<crate::Rebalancer> {
        crate::rebalancer::Rebalancer::spawn(self.clone(), interval)
    }
}

/// `ceil(bytes / (ppm / 1e6))`: the limit at which `bytes` is `ppm` parts per million.
fn div_ceil_ppm(bytes: u64, ppm: u64) -> u64 {
    let q = (u128::from(bytes) * 1_000_000).div_ceil(u128::from(ppm.max(1)));
    u64::try_from(q).unwrap_or(u64::MAX)
}

/// One move of limit between engines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RebalanceMove {
    /// The engine whose limit shrank.
    pub from: EngineId,
    /// The engine whose limit grew.
    pub to: EngineId,
    /// Bytes moved.
    pub bytes: u64,
}

/// What one [`MemoryGovernor::rebalance`] step did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RebalanceReport {
    /// The moves, in the order they were made.
    pub moves: Vec<RebalanceMove>,
    /// Engines whose reclaimers were asked for memory, with the bytes they freed.
    pub reclaimed: Vec<(EngineId, u64)>,
}
