//! The limits the governor publishes for each engine's ledger, and the over-limit flag they
//! drive: above its limit, an engine's new allocations go to its overflow region.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::id::{ARENA_ENGINES, Slot};

/// Per-engine limit on the allocator's ledger; above it, new allocations overflow.
static LIMIT: [AtomicU64; ARENA_ENGINES] = [const { AtomicU64::new(u64::MAX) }; ARENA_ENGINES];
/// Whether an engine is over its limit (set above it, cleared below 95 % of it).
static OVER: [AtomicBool; ARENA_ENGINES] = [const { AtomicBool::new(false) }; ARENA_ENGINES];

/// Whether `engine`'s new allocations should go to its overflow arena now.
#[inline(always)]
pub(crate) fn is_over(engine: Slot) -> bool {
    match OVER.get(engine.index()) {
        Some(flag) => flag.load(Ordering::Relaxed),
        None => false,
    }
}

/// Re-evaluates `engine`'s over-limit flag after its ledger moved to `charged`: set at the
/// limit, cleared below 95 % of it (hysteresis, so the flag does not flap on one block).
#[inline]
pub(crate) fn update_over(engine: Slot, charged: u64) {
    let (Some(limit), Some(flag)) = (LIMIT.get(engine.index()), OVER.get(engine.index())) else {
        return;
    };
    let limit = limit.load(Ordering::Relaxed);
    if charged >= limit {
        if !flag.load(Ordering::Relaxed) {
            flag.store(true, Ordering::Relaxed);
        }
    } else if flag.load(Ordering::Relaxed) && charged < limit / 20 * 19 {
        flag.store(false, Ordering::Relaxed);
    }
}

/// The limit published for ledger slot `slot` (`u64::MAX`: none; overflow slots have none).
#[inline]
pub(crate) fn limit_of(slot: Slot) -> u64 {
    match LIMIT.get(slot.index()) {
        Some(limit) => limit.load(Ordering::Relaxed),
        None => u64::MAX,
    }
}

/// Publishes `limit` for `engine` (`u64::MAX`: none); the caller re-evaluates the flag.
pub(crate) fn publish(engine: Slot, limit: u64) {
    if let Some(slot) = LIMIT.get(engine.index()) {
        slot.store(limit, Ordering::Relaxed);
    }
}
