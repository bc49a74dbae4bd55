//! The live samples: a fixed open-addressing table keyed by the block's address, in stripes
//! with a lock each (no allocation: it is filled and emptied from inside the allocator).

use super::lock::SpinLock;
use crate::id::Slot;

/// One live sampled block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sample {
    /// Its address (0: an empty entry).
    pub(crate) ptr: usize,
    /// Its usable bytes.
    pub(crate) usable: u64,
    /// The mean sampling interval and the hook interval it was sampled at (bytes, saturated).
    pub(crate) mean: u32,
    pub(crate) interval: u32,
    /// Its call stack's id (see `stacks.rs`).
    pub(crate) stack: u32,
    /// Its owner, by address when it was sampled.
    pub(crate) owner: Slot,
    /// The allocating thread's tag (0: none).
    pub(crate) tag: u64,
}

const EMPTY: Sample = Sample {
    ptr: 0,
    usable: 0,
    mean: 0,
    interval: 0,
    stack: 0,
    owner: Slot::UNATTRIBUTED,
    tag: 0,
};

const STRIPES: usize = 16;
const PER_STRIPE: usize = 1 << 14;
/// Samples a stripe holds before new ones are dropped (7/8 full keeps probes short).
const FULL: usize = PER_STRIPE / 8 * 7;

struct Stripe {
    entries: [Sample; PER_STRIPE],
    len: usize,
}

static TABLE: [SpinLock<Stripe>; STRIPES] = [const {
    SpinLock::new(Stripe {
        entries: [EMPTY; PER_STRIPE],
        len: 0,
    })
}; STRIPES];

/// The stripe and the first slot of `ptr`.
fn place(ptr: usize) -> (usize, usize) {
    let h = ((ptr >> 4) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let h = (h >> 20) as usize;
    (h % STRIPES, (h / STRIPES) % PER_STRIPE)
}

/// Adds `sample` (its `ptr` not in the table); false when its stripe is full (dropped).
pub(crate) fn insert(sample: Sample) -> bool {
    let (stripe, first) = place(sample.ptr);
    TABLE[stripe].with(|s| {
        if s.len >= FULL {
            return false;
        }
        let mut i = first;
        while s.entries[i].ptr != 0 && s.entries[i].ptr != sample.ptr {
            i = (i + 1) % PER_STRIPE;
        }
        if s.entries[i].ptr == 0 {
            s.len += 1;
        }
        s.entries[i] = sample;
        true
    })
}

/// Removes and returns the sample of the block at `ptr`, if it is one.
pub(crate) fn remove(ptr: usize) -> Option<Sample> {
    let (stripe, first) = place(ptr);
    TABLE[stripe].with(|s| {
        let mut i = first;
        loop {
            let e = s.entries[i];
            if e.ptr == 0 {
                return None;
            }
            if e.ptr == ptr {
                break;
            }
            i = (i + 1) % PER_STRIPE;
        }
        let found = s.entries[i];
        // Backward-shift deletion: later entries of the probe run that could sit in the hole
        // move into it, so no tombstones are needed.
        let mut hole = i;
        let mut j = (i + 1) % PER_STRIPE;
        while s.entries[j].ptr != 0 {
            let home = place(s.entries[j].ptr).1;
            // `j`'s entry may fill the hole if its home is not cyclically in (hole, j].
            let between = if hole <= j {
                hole < home && home <= j
            } else {
                hole < home || home <= j
            };
            if !between {
                s.entries[hole] = s.entries[j];
                hole = j;
            }
            j = (j + 1) % PER_STRIPE;
        }
        s.entries[hole] = EMPTY;
        s.len -= 1;
        Some(found)
    })
}

/// Copies the live samples `keep` accepts into `out`, up to its spare capacity (it is not
/// grown: nothing here allocates); how many there were in all, so a caller whose buffer was
/// short can grow it and ask again.
pub(crate) fn collect(out: &mut Vec<Sample>, keep: impl Fn(&Sample) -> bool) -> usize {
    let mut all = 0;
    for stripe in &TABLE {
        stripe.with(|s| {
            for e in s.entries.iter().filter(|e| e.ptr != 0 && keep(e)) {
                all += 1;
                if out.len() < out.capacity() {
                    out.push(*e);
                }
            }
        });
    }
    all
}

/// Live samples in the table.
pub(crate) fn len() -> usize {
    TABLE.iter().map(|s| s.with(|s| s.len)).sum()
}

/// Takes every stripe's lock, in order (for `fork`: see `profile::fork_handlers`).
pub(super) fn lock_all() {
    for stripe in &TABLE {
        stripe.acquire();
    }
}

/// Gives back every stripe's lock taken by [`lock_all`].
pub(super) fn unlock_all() {
    for stripe in &TABLE {
        stripe.release();
    }
}
