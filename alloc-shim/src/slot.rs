//! Ledger slots: what the owner of a pointer is, read from its address.
//!
//! The reservation holds one range per slot: `0..5` the engines with arenas, `5` unused (so
//! `Unattributed`'s index is never a range's), `6..11` each engine's overflow range. The
//! ledger keeps one counter per slot, and every charge and credit names the slot by this type
//! rather than by a bare index.

use crate::EngineId;

/// Engines with an arena of their own: every engine but `Unattributed`, which is served by
/// jemalloc's automatic arenas (its memory is whatever lies outside the engines' ranges).
pub(crate) const ARENA_ENGINES: usize = EngineId::COUNT - 1;

/// The index of engine `e`'s overflow slot: `OVERFLOW_SLOT + e`.
pub(crate) const OVERFLOW_SLOT: usize = EngineId::COUNT;

/// Ranges reserved, and ledger counters kept: the engines, the unused `Unattributed` slot, and
/// one overflow slot per engine with an arena.
pub(crate) const SLOTS: usize = OVERFLOW_SLOT + ARENA_ENGINES;

/// One ledger slot (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Slot(u8);

impl Slot {
    /// Memory outside every range.
    pub(crate) const UNATTRIBUTED: Slot = Slot(EngineId::Unattributed as u8);

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

    /// A slot byte as a thread keeps it: an engine's slot, or a marker above every slot (a
    /// detached thread's home) that equals no owner and whose ledger is `Unattributed`'s.
    #[inline(always)]
    pub(crate) const fn from_byte(byte: u8) -> Slot {
        Slot(byte)
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

    /// The raw byte, for a thread's state.
    #[inline(always)]
    pub(crate) const fn byte(self) -> u8 {
        self.0
    }

    /// Whether this is an engine with arenas of its own (not `Unattributed`, not overflow).
    #[inline(always)]
    pub(crate) const fn has_arena(self) -> bool {
        (self.0 as usize) < ARENA_ENGINES
    }

    /// Whether this is an engine's overflow slot.
    #[inline(always)]
    pub(crate) const fn is_overflow(self) -> bool {
        self.0 as usize >= OVERFLOW_SLOT
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

#[cfg(test)]
mod tests {
    use super::*;

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
