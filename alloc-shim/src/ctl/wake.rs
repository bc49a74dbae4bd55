//! Waking the governor's background thread early from the allocation path (see
//! `accounting/wake.rs`).

pub use crate::accounting::wake::{nudge, sleep, stretch, wake, wake_seq};

use crate::accounting::ledger::charged_seq_cst;
use crate::accounting::wake;
use crate::id::EngineId;

/// Arms the marks for a stretched sleep (the installed governor's: the marks are the
/// process's): a charge of `engine`'s home slot reaching `home[engine]`, or of its overflow
/// slot reaching `overflow[engine]`, wakes the sleepers. Returns `false`, and wakes nobody,
/// when a slot is already at its mark (a charge came between the caller's look and now): the
/// caller should not sleep.
///
/// The marks are stored, and the charges then read, in one total order with every charge (its
/// read-modify-write and its read of the mark are sequentially consistent): a charge either
/// sees its mark or is seen here.
pub fn arm(home: &[u64; EngineId::COUNT], overflow: &[u64; EngineId::COUNT]) -> bool {
    wake::arm(home, overflow, charged_seq_cst)
}
