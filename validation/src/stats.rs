//! Counters each engine publishes while it runs, read by the display and the report.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// One engine's live counters.
#[derive(Debug, Default)]
pub(crate) struct EngineStats {
    /// Units of work done (points ingested, vectors inserted + queries, rows aggregated).
    pub(crate) ops: AtomicU64,
    /// Spills: timeseries flushes forced by pressure, DataFusion spill files.
    pub(crate) spills: AtomicU64,
    /// Requests the governor refused (admission failures, `try_grow` refusals).
    pub(crate) rejections: AtomicU64,
    /// The engine finished its work.
    pub(crate) done: AtomicBool,
}

impl EngineStats {
    pub(crate) fn add_ops(&self, n: u64) {
        self.ops.fetch_add(n, Ordering::Relaxed);
    }
    pub(crate) fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }
    pub(crate) fn spills(&self) -> u64 {
        self.spills.load(Ordering::Relaxed)
    }
    pub(crate) fn rejections(&self) -> u64 {
        self.rejections.load(Ordering::Relaxed)
    }
    pub(crate) fn is_done(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }
    pub(crate) fn finish(&self) {
        self.done.store(true, Ordering::Release);
    }
}

/// A small deterministic generator (SplitMix64): the same seed gives the same workload.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub(crate) fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}
