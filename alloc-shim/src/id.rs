//! Who owns memory, as the allocation path names it: engines ([`EngineId`]), ledger slots
//! ([`Slot`]: an engine's range or its overflow range) and jemalloc arenas ([`Arena`]).
//!
//! The reservation holds one range per slot: `0..5` the engines with arenas, `5` unused (so
//! `Unattributed`'s index is never a range's), `6..11` each engine's overflow range. The
//! ledger keeps one counter per slot, and every charge and credit names the slot by this type
//! rather than by a bare index. The bottom of the crate: it depends on nothing else in it.

use core::fmt;
use core::str::FromStr;

/// One of the engines that share the process, plus one bucket for memory outside any engine.
///
/// The set is fixed at compile time, so per-engine state lives in plain arrays indexed by
/// [`EngineId::index`], and no engine can exist without a budget.
///
/// ```
/// use nodedb_mem_alloc::EngineId;
///
/// assert_eq!(EngineId::ALL.len(), EngineId::COUNT);
/// for (i, e) in EngineId::ALL.iter().enumerate() {
///     assert_eq!(e.index(), i);
///     assert_eq!(EngineId::from_index(i), Some(*e));
/// }
/// assert_eq!(EngineId::Query.to_string(), "query");
/// assert_eq!("timeseries".parse::<EngineId>(), Ok(EngineId::Timeseries));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum EngineId {
    /// Dense vector search (HNSW indexes and their vectors).
    Vector = 0,
    /// Sparse vector / inverted-index search.
    Sparse = 1,
    /// CRDT documents and their operation logs.
    Crdt = 2,
    /// Timeseries ingest and compressed segments.
    Timeseries = 3,
    /// SQL query execution (DataFusion).
    Query = 4,
    /// Memory allocated outside any engine's guard: runtime, networking, start-up.
    Unattributed = 5,
}

impl EngineId {
    /// The number of engines, including [`EngineId::Unattributed`].
    pub const COUNT: usize = 6;

    /// Every engine, in [`index`](EngineId::index) order.
    pub const ALL: [EngineId; EngineId::COUNT] = [
        EngineId::Vector,
        EngineId::Sparse,
        EngineId::Crdt,
        EngineId::Timeseries,
        EngineId::Query,
        EngineId::Unattributed,
    ];

    /// The engine's position in [`EngineId::ALL`], suitable for indexing per-engine arrays.
    #[inline]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The engine at `index`, or `None` when `index >= EngineId::COUNT`.
    #[inline]
    pub const fn from_index(index: usize) -> Option<EngineId> {
        if index < EngineId::COUNT {
            Some(EngineId::ALL[index])
        } else {
            None
        }
    }

    /// The engine's lower-case name, as used in metrics labels and configuration keys.
    pub const fn name(self) -> &'static str {
        match self {
            EngineId::Vector => "vector",
            EngineId::Sparse => "sparse",
            EngineId::Crdt => "crdt",
            EngineId::Timeseries => "timeseries",
            EngineId::Query => "query",
            EngineId::Unattributed => "unattributed",
        }
    }
}

impl fmt::Display for EngineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The error returned when parsing a string that names no engine.
///
/// ```
/// use nodedb_mem_alloc::{EngineId, UnknownEngine};
/// assert_eq!("graph".parse::<EngineId>(), Err(UnknownEngine));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownEngine;

impl fmt::Display for UnknownEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(
            "unknown engine: expected one of vector, sparse, crdt, timeseries, query, unattributed",
        )
    }
}

impl std::error::Error for UnknownEngine {}

impl FromStr for EngineId {
    type Err = UnknownEngine;

    /// Parses an engine name, ignoring ASCII case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        EngineId::ALL
            .iter()
            .copied()
            .find(|e| e.name().eq_ignore_ascii_case(s))
            .ok_or(UnknownEngine)
    }
}

/// Engines with an arena of their own: every engine but `Unattributed`, which is served by
/// jemalloc's automatic arenas (its memory is whatever lies outside the engines' ranges).
pub(crate) const ARENA_ENGINES: usize = EngineId::COUNT - 1;

/// The index of engine `e`'s overflow slot: `OVERFLOW_SLOT + e`.
pub(crate) const OVERFLOW_SLOT: usize = EngineId::COUNT;

/// Ranges reserved, and ledger counters kept: the engines, the unused `Unattributed` slot, and
/// one overflow slot per engine with an arena.
pub(crate) const SLOTS: usize = OVERFLOW_SLOT + ARENA_ENGINES;

/// Slots the extent hooks serve: every ledger slot and [`Slot::FALLBACK`].
pub(crate) const HOOKED_SLOTS: usize = SLOTS + 1;

/// One ledger slot (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Slot(u8);

impl Slot {
    /// Memory outside every range.
    pub(crate) const UNATTRIBUTED: Slot = Slot(EngineId::Unattributed as u8);

    /// The shared fallback range's extent hooks: never an owner (the owner of a block there is
    /// its chunk's slot) and never charged, so it has no ledger counters.
    pub(crate) const FALLBACK: Slot = Slot(SLOTS as u8);

    /// `engine`'s own slot.
    #[inline(always)]
    pub(crate) const fn of(engine: EngineId) -> Slot {
        Slot(engine as u8)
    }

    /// The slot at `index`, or `Unattributed` for anything past the last one.
    #[inline(always)]
    pub(crate) const fn at(index: usize) -> Slot {
        if index < SLOTS {
            Slot(index as u8)
        } else {
            Slot::UNATTRIBUTED
        }
    }

    /// The overflow slot of the engine whose own slot this is (`None` for `Unattributed` and
    /// for overflow slots).
    #[inline(always)]
    pub(crate) const fn overflow(self) -> Option<Slot> {
        if self.has_arena() {
            Some(Slot(self.0 + OVERFLOW_SLOT as u8))
        } else {
            None
        }
    }

    /// The slot's index, for per-slot arrays.
    #[inline(always)]
    pub(crate) const fn index(self) -> usize {
        self.0 as usize
    }

    /// Whether this is an engine with arenas of its own (not `Unattributed`, not overflow).
    #[inline(always)]
    pub(crate) const fn has_arena(self) -> bool {
        (self.0 as usize) < ARENA_ENGINES
    }

    /// Whether this is an engine's overflow slot.
    #[inline(always)]
    pub(crate) const fn is_overflow(self) -> bool {
        self.0 as usize >= OVERFLOW_SLOT && (self.0 as usize) < SLOTS
    }

    /// The engine the slot belongs to (an overflow slot belongs to its engine).
    #[inline(always)]
    pub(crate) const fn engine(self) -> EngineId {
        let e = if self.is_overflow() {
            self.0 as usize - OVERFLOW_SLOT
        } else {
            self.0 as usize
        };
        match EngineId::from_index(e) {
            Some(engine) => engine,
            None => EngineId::Unattributed,
        }
    }
}

/// A jemalloc arena's index, as `arenas.create` returned it or `thread.arena` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Arena(pub(crate) std::ffi::c_uint);

impl Arena {
    /// The `mallocx` flag that names this arena.
    #[inline(always)]
    pub(crate) const fn flag(self) -> std::ffi::c_int {
        tikv_jemalloc_sys::MALLOCX_ARENA(self.0 as usize)
    }

    /// The index, for `mallctl` names and MIBs.
    #[inline(always)]
    pub(crate) const fn index(self) -> std::ffi::c_uint {
        self.0
    }
}

/// Most NUMA nodes placed: each engine's range is split into this many node sub-ranges.
pub const MAX_NODES: usize = 8;

/// A NUMA node the allocator places memory on: always below [`MAX_NODES`], so it indexes the
/// per-node tables and sub-ranges without a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Node(u8);

impl Node {
    /// Node 0, where memory goes when nothing else is known.
    pub(crate) const FIRST: Node = Node(0);

    /// Node `index`, if the allocator places memory on that many nodes.
    #[inline(always)]
    pub(crate) const fn at(index: usize) -> Option<Node> {
        if index < MAX_NODES {
            Some(Node(index as u8))
        } else {
            None
        }
    }

    /// The node's number.
    #[inline(always)]
    pub(crate) const fn index(self) -> usize {
        self.0 as usize
    }

    /// Every node a table has a row for, in order.
    pub(crate) fn all() -> impl Iterator<Item = Node> {
        (0..MAX_NODES as u8).map(Node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_stop_at_the_table_size() {
        assert_eq!(Node::at(0), Some(Node::FIRST));
        assert_eq!(
            Node::at(MAX_NODES - 1).map(Node::index),
            Some(MAX_NODES - 1)
        );
        assert_eq!(Node::at(MAX_NODES), None);
        assert_eq!(Node::all().count(), MAX_NODES);
    }

    #[test]
    fn names_are_unique_and_round_trip() {
        for (i, a) in EngineId::ALL.iter().enumerate() {
            assert_eq!(a.name().parse::<EngineId>(), Ok(*a));
            assert_eq!(a.name().to_ascii_uppercase().parse::<EngineId>(), Ok(*a));
            for b in &EngineId::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }

    #[test]
    fn from_index_rejects_out_of_range() {
        assert_eq!(EngineId::from_index(EngineId::COUNT), None);
        assert_eq!(EngineId::from_index(usize::MAX), None);
    }

    #[test]
    fn engine_id_is_one_byte() {
        assert_eq!(core::mem::size_of::<EngineId>(), 1);
        assert_eq!(core::mem::size_of::<Option<EngineId>>(), 1);
    }

    #[test]
    fn slots_name_engines_and_their_overflow() {
        for e in EngineId::ALL {
            let s = Slot::of(e);
            assert_eq!(s.engine(), e);
            assert!(!s.is_overflow());
            assert_eq!(s.has_arena(), e != EngineId::Unattributed);
            match s.overflow() {
                Some(o) => {
                    assert!(o.is_overflow() && !o.has_arena());
                    assert_eq!(o.engine(), e);
                    assert_eq!(o.index(), OVERFLOW_SLOT + e.index());
                }
                None => assert_eq!(e, EngineId::Unattributed),
            }
        }
        assert_eq!(Slot::at(SLOTS), Slot::UNATTRIBUTED);
        assert_eq!(Slot::at(usize::MAX), Slot::UNATTRIBUTED);
        assert_eq!(Slot::at(SLOTS - 1).engine(), EngineId::Query);
    }
}
