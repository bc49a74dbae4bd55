//! The allocation path of `nodedb-mem`: the `#[global_allocator]` that attributes every heap
//! allocation to an engine, and the engine identities it shares with the policy crate.
//!
//! This crate holds only what runs on (or right beside) every `malloc`; budgets, rebalancing
//! and metrics live in `nodedb-mem`, which re-exports everything here.
//!
//! # How an allocation is attributed
//!
//! * The thread's current engine is set by [`EngineGuard`] (a thread-local write).
//! * Each engine but `Unattributed` has jemalloc arenas (one per CPU of a node, up to four)
//!   created with our extent hooks, which carve their extents from one reserved virtual range
//!   per engine; the owner of any pointer is then found from its address alone. `Unattributed` is served by jemalloc's automatic arenas
//!   (everything outside the ranges).
//! * Charges and credits go to the owner by address, in the jemalloc size class actually
//!   handed out: a free on any thread, and a `realloc`, credit the engine that owns the memory.
//! * A thread's allocations and frees of its *home* engine's blocks of up to [`FAST_MAX`]
//!   (8 KiB − 1) go straight to jemalloc, which counts them; jemalloc's thread-event hook
//!   settles them into the [`charged`] ledger every [`Bound::interval`] (24 KiB by default), and
//!   the thread holds headroom bought within the engine's limit, so the ledger is never below
//!   the live bytes, never past the limit, and less than the in-flight bound
//!   ([`inflight_bound`]: 64 KiB by default, up to 4 MiB through [`INFLIGHT_BOUND_ENV`]) per
//!   thread above the live bytes.
//!   Everything else updates the ledger at once. See `accounting/ledger.rs` and `docs/design.md`.
//!
//! The hot path never allocates, locks, panics or unwinds, and works before `main`, during
//! thread start-up and teardown (after its thread-local is gone it charges the ledger directly).

//!
//! # Layout
//!
//! A one-way stack, bottom to top; no module uses one above it:
//!
//! 1. `id`: engines ([`EngineId`]), ledger slots, arenas and NUMA nodes as types;
//! 2. [`sys`]: every `mallctl` key with its C type, the NUMA topology, size classes, one
//!    parser for `/proc` and `/sys` numbers, `statm` and `mincore`;
//! 3. `space`: the reservation and `owner_of`, the one extent-hook table (dispatching by slot
//!    to a registered backing), the engine arenas;
//! 4. `accounting`: the ledger, the in-flight bound, published limits, wake marks;
//! 5. `thread`: the thread's state and guards, its settlement, the thread-event callback (the
//!    only module that touches the thread-local);
//! 6. `overflow`: regions, their backing, push-out and `fork`;
//! 7. `profile`: heap-profile samples (which live blocks, whose, from which stack);
//! 8. `route`: the global allocator's paths as functions over the thread's state;
//! 9. the root ([`GovernedAlloc`], [`EngineGuard`]) and [`ctl`], what the governor drives.
//!
//! [`charged`]: ctl::ledger::charged
//! [`Bound::interval`]: ctl::ledger::Bound::interval
//! [`FAST_MAX`]: ctl::ledger::FAST_MAX
//! [`inflight_bound`]: ctl::ledger::inflight_bound
//! [`INFLIGHT_BOUND_ENV`]: ctl::ledger::INFLIGHT_BOUND_ENV

mod accounting;
pub mod ctl;
mod id;
#[cfg(nodedb_mem_loom)]
#[doc(hidden)]
pub mod model;
mod overflow;
mod profile;
mod route;
mod space;
pub mod sys;
mod thread;

pub use id::{EngineId, UnknownEngine};
pub use route::GovernedAlloc;
pub use thread::{EngineGuard, GUARD_SLOTS};
