//! The allocator's ledger as the governor reads it, the limits it publishes, and the in-flight
//! bound (see the crate documentation for what the figures guarantee).

pub use crate::accounting::bound::{
    Bound, DEFAULT_INFLIGHT_BOUND, DIRECT_THRESHOLD, FAST_MAX, INFLIGHT_BOUND_ENV,
    MAX_INFLIGHT_BOUND, MIN_INFLIGHT_BOUND, bound_from_env, inflight_bound, parse_bound,
};
pub use crate::accounting::ledger::{
    charged, charged_peak, overflow_charged, set_overflow_limit, take_window_peak, window_peak,
};
