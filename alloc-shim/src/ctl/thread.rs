//! The calling thread as the allocator sees it (its engines, its settlements), and the routing
//! counters of the whole process.

pub use crate::route::{detached_operations, is_active, unrouted_allocations};
pub use crate::sys::mallctl::ThreadEventCallback;
#[doc(hidden)]
pub use crate::thread::events::register_thread_event_hook;
pub use crate::thread::events::thread_events_active;
pub use crate::thread::{
    HOME_SWITCH_AFTER, current_engine, explicit_caches_created, flush_thread, home_engine,
    home_switches, thread_settlements,
};
