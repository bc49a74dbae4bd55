//! Heap-profile sampling as the governor drives and reads it: turned on and off at run time,
//! and the live sampled blocks, each with its engine, size, the bytes it stands for and its
//! call stack (return addresses; symbols are resolved by the caller, outside the allocator).
//!
//! Off (the default), sampling costs nothing measurable on the allocation paths: the
//! thread-event hook reads the interval, and the home path's null test is a compare against a
//! per-thread gate instead (see `docs/design.md`, "Heap profiles").

use crate::accounting::bound::inflight_bound;
use crate::id::EngineId;
use crate::profile::{self, stacks, table};
use crate::thread::sampling;

/// The mean sampling interval the governor starts profiling with, in bytes: 4 MiB, where
/// the allocation-only hot-path workloads pay 0.1–1.8 % more instructions (512 KiB,
/// jemalloc's default: 0.6–10 %; the table is in `docs/benchmarks.md`).
pub const DEFAULT_SAMPLE_INTERVAL: u64 = 4 << 20;

/// Samples allocations at a mean interval of `bytes` allocated per thread from now on (each
/// thread from its next thread-event hook); `0` stops sampling. Blocks already sampled stay
/// in the profile until freed.
pub fn set_sample_interval(bytes: u64) {
    if bytes > 0 {
        profile::fork_handlers();
    }
    sampling::set_mean_interval(bytes);
}

/// The mean sampling interval in bytes (0: not sampling).
pub fn sample_interval() -> u64 {
    sampling::mean_interval()
}

/// Makes `tag` the tag the calling thread's samples carry from now on (0: none), returning
/// the tag before: the governor tags samples with the scope a thread works for. During the
/// thread's teardown nothing is kept (0 is returned).
pub fn set_thread_tag(tag: u64) -> u64 {
    sampling::set_thread_tag(tag)
}

/// The tag the calling thread's samples carry (0: none).
pub fn thread_tag() -> u64 {
    sampling::thread_tag()
}

/// One live sampled block.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveSample {
    /// Its address.
    pub address: usize,
    /// The engine that owns it (by address).
    pub engine: EngineId,
    /// Its usable bytes.
    pub size: u64,
    /// The bytes it stands for: `size / P(size)`, `P` the chance a block of that size is
    /// sampled (see the module `profile` of this crate's sources).
    pub weight: f64,
    /// Return addresses of the allocating call, innermost first (the allocator's own frames
    /// included; at most 32).
    pub stack: Vec<usize>,
    /// The allocating thread's tag when it was sampled ([`set_thread_tag`]; 0: none).
    pub tag: u64,
}

/// How the sampler stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleCounts {
    /// Samples taken since the process started.
    pub taken: u64,
    /// Samples dropped because the table was full (262,144 live samples, less a margin).
    pub dropped: u64,
    /// Samples live now.
    pub live: usize,
    /// Distinct call stacks stored (at most 16,384; further stacks are recorded empty).
    pub stacks: usize,
}

/// The sampler's counts.
pub fn sample_counts() -> SampleCounts {
    let (taken, dropped) = profile::counts();
    SampleCounts {
        taken,
        dropped,
        live: table::len(),
        stacks: stacks::count(),
    }
}

/// The chance that a block of `size` usable bytes is sampled at mean interval `mean` with
/// the thread-event hook's interval `interval` (see `profile`'s module documentation).
pub fn sample_probability(size: u64, mean: u64, interval: u64) -> f64 {
    sampling::probability(size, mean, interval)
}

/// The live sampled blocks of `engine` (of every engine with `None`). Allocates the answer
/// (outside the sampler's locks).
pub fn live_samples(engine: Option<EngineId>) -> Vec<LiveSample> {
    let keep = |s: &table::Sample| engine.is_none_or(|e| s.owner.engine() == e);
    let mut raw = Vec::with_capacity(table::len() + 64);
    loop {
        let all = table::collect(&mut raw, keep);
        if all <= raw.len() {
            break;
        }
        raw = Vec::with_capacity(all + 64);
    }
    let mut frames = [0usize; stacks::DEPTH];
    raw.iter()
        .map(|s| {
            let n = stacks::read(s.stack, &mut frames);
            let interval = if s.interval == 0 {
                inflight_bound().interval
            } else {
                u64::from(s.interval)
            };
            let p = sample_probability(s.usable, u64::from(s.mean), interval);
            LiveSample {
                address: s.ptr,
                engine: s.owner.engine(),
                size: s.usable,
                weight: if p > 0.0 { s.usable as f64 / p } else { 0.0 },
                stack: frames[..n].to_vec(),
                tag: s.tag,
            }
        })
        .collect()
}

/// Holds every lock of the sampler for `hold` on the calling thread, as a thread taking a
/// sample holds one for a moment: for tests of what a `fork` meanwhile does.
#[cfg(feature = "testing")]
pub fn hold_sampler_locks(hold: std::time::Duration) {
    profile::hold_locks(hold);
}
