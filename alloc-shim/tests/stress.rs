//! Several threads allocating random sizes for random engines and freeing each other's
//! blocks through channels: at the end every engine's ledger is back exactly where it began.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use nodedb_mem_alloc::{
    EngineGuard, EngineId, GovernedAlloc, ctl::arenas::owner, ctl::ledger::charged,
    ctl::thread::flush_thread,
};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const THREADS: usize = 4;
/// Bounded in both time and count, whichever comes first.
const MAX_OPS: usize = 800_000;
const MAX_TIME: Duration = Duration::from_secs(3);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// 1 B to 4 MiB, most of them small: a uniform exponent, then a uniform size below it.
    fn size(&mut self) -> usize {
        let lg = self.below(23) as u32; // up to 2^22 = 4 MiB
        1 + self.below(1u64 << lg) as usize
    }
}

struct Block {
    data: Vec<u8>,
    engine: EngineId,
}

#[test]
fn random_engines_sizes_and_cross_thread_frees_return_to_baseline() {
    flush_thread();
    let baseline = EngineId::ALL.map(charged);
    let deadline = Instant::now() + MAX_TIME;

    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..THREADS).map(|_| mpsc::channel::<Block>()).unzip();
    let handles: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(t, inbox)| {
            let peers = senders.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((t as u64 + 1) * 0x1234_5678_9ABC));
                let mut held: Vec<Block> = Vec::new();
                let mut ops = 0;
                while ops < MAX_OPS / THREADS && Instant::now() < deadline {
                    ops += 1;
                    match rng.below(10) {
                        0..=4 => {
                            let engine = EngineId::ALL[rng.below(EngineId::COUNT as u64) as usize];
                            let _g = EngineGuard::enter(engine);
                            let mut data = Vec::with_capacity(rng.size());
                            data.push(t as u8);
                            held.push(Block { data, engine });
                        }
                        5..=6 if !held.is_empty() => {
                            // Send one to a random peer, who frees it (or sends it on).
                            let i = rng.below(held.len() as u64) as usize;
                            let block = held.swap_remove(i);
                            let peer = rng.below(THREADS as u64) as usize;
                            if let Err(mpsc::SendError(b)) = peers[peer].send(block) {
                                held.push(b);
                            }
                        }
                        7 if !held.is_empty() => {
                            // Grow one in place or by moving, under another engine's guard.
                            let i = rng.below(held.len() as u64) as usize;
                            let other = EngineId::ALL[rng.below(EngineId::COUNT as u64) as usize];
                            let _g = EngineGuard::enter(other);
                            let extra = rng.size().min(1 << 16);
                            held[i].data.reserve_exact(extra);
                        }
                        _ => {
                            held.extend(inbox.try_iter());
                            if held.len() > 64 {
                                let i = rng.below(held.len() as u64) as usize;
                                drop(held.swap_remove(i));
                            }
                        }
                    }
                }
                // A block's owner never changes, whatever thread grows or frees it.
                for b in &held {
                    assert_eq!(owner(b.data.as_ptr()), b.engine);
                }
                drop(peers);
                (held, inbox, ops)
            })
        })
        .collect();
    drop(senders);
    let mut total_ops = 0;
    let mut leftovers = Vec::new();
    for h in handles {
        let (held, inbox, ops) = h.join().unwrap();
        total_ops += ops;
        leftovers.push(held);
        // Every sender is gone now (all threads finished): drain what is still in flight.
        leftovers.push(inbox.into_iter().collect());
    }
    let live: usize = leftovers.iter().map(Vec::len).sum();
    eprintln!("{total_ops} operations, {live} blocks alive at the end");
    assert!(
        total_ops > 1000,
        "the stress test did too little work: {total_ops}"
    );
    drop(leftovers);
    flush_thread();
    for e in EngineId::ALL {
        if e == EngineId::Unattributed {
            // The process itself keeps a few lazily created objects from this test alive
            // (thread handles, stderr's state), allocated outside any guard: they are
            // Unattributed's, legitimately, and small.
            let drift = charged(e).abs_diff(baseline[e.index()]);
            assert!(drift <= 4096, "unattributed drifted by {drift} B");
        } else {
            assert_eq!(charged(e), baseline[e.index()], "{e}");
        }
    }
}
