//! The address space: one reservation with a range per ledger slot and a shared fallback range
//! ([`reservation`], sized by [`sizing`]), the one extent-hook table every arena of ours is
//! created with ([`hooks`]), the engine arenas that carve their extents from the engines'
//! ranges ([`arenas`]), and the engines' fallback arenas that carve theirs from the fallback
//! range when an engine's own is full ([`fallback`]). Above `id` and `sys`.

pub(crate) mod arenas;
pub(crate) mod chunks;
pub(crate) mod fallback;
pub(crate) mod hooks;
pub(crate) mod reservation;
pub(crate) mod sizing;
