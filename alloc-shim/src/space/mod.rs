//! The address space: one reservation with a range per ledger slot ([`reservation`]), the one
//! extent-hook table every arena of ours is created with ([`hooks`]), and the engine arenas
//! that carve their extents from the engines' ranges ([`arenas`]). Above `id` and `sys`.

pub(crate) mod arenas;
pub(crate) mod hooks;
pub(crate) mod reservation;
