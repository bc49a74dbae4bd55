//! Call stacks of samples, each stored once: a fixed table (no allocation, so it can be filled
//! from inside the allocator) of up to [`STACKS`] stacks of up to [`DEPTH`] return addresses.
//! Stack 0 is the empty stack, given when the table is full.

use super::lock::SpinLock;

/// Frames kept per stack (the innermost ones).
pub(crate) const DEPTH: usize = 32;
/// Distinct stacks kept.
const STACKS: usize = 1 << 14;
/// Slots of the index (twice the stacks, so probes stay short).
const INDEX: usize = STACKS * 2;

struct Table {
    frames: [[usize; DEPTH]; STACKS],
    depth: [u8; STACKS],
    /// Stack id + 1 by hash, 0 empty.
    index: [u32; INDEX],
    /// Stacks stored (id 0, the empty stack, included).
    count: usize,
}

static TABLE: SpinLock<Table> = SpinLock::new(Table {
    frames: [[0; DEPTH]; STACKS],
    depth: [0; STACKS],
    index: [0; INDEX],
    count: 1,
});

fn hash(frames: &[usize]) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &f in frames {
        h = (h ^ f as u64).wrapping_mul(0x0100_0000_01b3);
    }
    (h ^ (h >> 29)) as usize
}

/// The id of `frames` (at most [`DEPTH`] of them), storing it if new; 0 when the table is full.
pub(crate) fn intern(frames: &[usize]) -> u32 {
    let frames = &frames[..frames.len().min(DEPTH)];
    let h = hash(frames);
    TABLE.with(|t| {
        let mut i = h % INDEX;
        loop {
            let slot = t.index[i];
            if slot == 0 {
                if t.count >= STACKS {
                    return 0;
                }
                let id = t.count;
                t.frames[id][..frames.len()].copy_from_slice(frames);
                t.depth[id] = frames.len() as u8;
                t.index[i] = id as u32 + 1;
                t.count += 1;
                return id as u32;
            }
            let id = (slot - 1) as usize;
            if t.frames[id][..usize::from(t.depth[id])] == *frames {
                return id as u32;
            }
            i = (i + 1) % INDEX;
        }
    })
}

/// Copies stack `id` into `out`; its depth.
pub(crate) fn read(id: u32, out: &mut [usize; DEPTH]) -> usize {
    TABLE.with(|t| {
        let id = id as usize;
        if id >= t.count {
            return 0;
        }
        let n = usize::from(t.depth[id]);
        out[..n].copy_from_slice(&t.frames[id][..n]);
        n
    })
}

/// Stacks stored, the empty one included.
pub(crate) fn count() -> usize {
    TABLE.with(|t| t.count)
}

/// Takes the table's lock (for `fork`: see `profile::fork_handlers`).
pub(super) fn lock() {
    TABLE.acquire();
}

/// Gives back the lock taken by [`lock`].
pub(super) fn unlock() {
    TABLE.release();
}
