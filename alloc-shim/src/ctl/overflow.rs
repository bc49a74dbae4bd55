//! Overflow as the governor drives it: enabling it, its policy, its regions and counters, and
//! the resident target the allocation path pushes overflow out to hold.

#[cfg(feature = "testing")]
pub use crate::overflow::fault;
pub use crate::overflow::pushout::{
    PushOutStats, push_out_checks, push_out_stats, resident_target, set_resident_target,
};
pub use crate::overflow::{
    OverflowBreaches, OverflowError, OverflowFigures, OverflowPolicy, OverflowRegion,
    OverflowStats, PageOutMethod, enable_overflow, is_forked_child, is_overflowing,
    overflow_breaches, overflow_figures, overflow_region, overflow_stats, page_out_overflow,
    set_overflow_policy,
};
pub use crate::sys::resident;
