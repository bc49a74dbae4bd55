//! The heap-profile sampling clock: each thread draws the byte count of jemalloc's allocated
//! counter at which its next sample falls (exponential, mean [`mean_interval`]), and the
//! thread-event hook, which fires inside the allocation that crosses its interval, opens the
//! thread's sample gate once that count is passed. The routing layer takes the allocation in
//! flight as the sample when it sees the gate open (`route`, `profile`). Off (mean 0), the hook
//! only reads the mean; nothing on the allocation paths changes.

use std::sync::atomic::{AtomicU64, Ordering};

use super::ThreadState;
use crate::accounting::bound::inflight_bound;

/// The mean sampling interval in bytes; 0: profiling off.
static MEAN: AtomicU64 = AtomicU64::new(0);

/// The gate value that makes the home path hand its allocation to the sampler: every address
/// is at most this, so the home path's `p > gate` test fails for any block.
pub(crate) const GATE_OPEN: usize = usize::MAX;

/// Sets the mean sampling interval (`0` turns sampling off). Threads pick it up at their
/// next thread-event hook.
pub(crate) fn set_mean_interval(bytes: u64) {
    MEAN.store(bytes, Ordering::Relaxed);
}

/// The mean sampling interval in bytes (0: off).
pub(crate) fn mean_interval() -> u64 {
    MEAN.load(Ordering::Relaxed)
}

/// The chance that a block of `size` usable bytes is sampled at mean interval `mean` with
/// the thread-event hook's interval `interval` (see the module `profile`'s documentation):
/// the block contains a hook with chance `min(size, interval) / interval`, and the clock
/// picks a hook it passed with chance `1 - exp(-max(size, interval) / mean)`.
pub(crate) fn probability(size: u64, mean: u64, interval: u64) -> f64 {
    if size == 0 || mean == 0 {
        return 0.0;
    }
    let interval = interval.max(1) as f64;
    let s = size as f64;
    (s.min(interval) / interval) * (1.0 - (-(s.max(interval)) / mean as f64).exp())
}

/// Makes `tag` the tag of the calling thread's samples from now on (0: none); returns the
/// tag before. During thread teardown (the thread's state unreachable) nothing is kept and
/// 0 is returned.
pub(crate) fn set_thread_tag(tag: u64) -> u64 {
    super::with(|t| t.sample_tag.replace(tag)).unwrap_or(0)
}

/// The tag of the calling thread's samples (0: none, or during teardown).
pub(crate) fn thread_tag() -> u64 {
    super::with(ThreadState::sample_tag).unwrap_or(0)
}

impl ThreadState {
    /// The thread-event hook saw this thread's allocated counter at `allocated`: stops the
    /// clock if sampling is off, starts it (the wait counted from the previous hook) if it was
    /// just turned on or its interval changed, and opens the gate when the count drawn for the next sample is passed
    /// (drawing the one after).
    pub(super) fn sample_tick(&self, allocated: u64) {
        let last = self.last_tick.replace(allocated);
        // The program's bytes since the previous hook: the sampler's own moves left out.
        let own = self.own_bytes.replace(0);
        self.gap
            .set(allocated.wrapping_sub(last).saturating_sub(own).max(1));
        let mean = mean_interval();
        if mean == 0 {
            self.sample_at.set(u64::MAX);
            return;
        }
        let mut at = self.sample_at.get();
        if at == u64::MAX || self.clock_mean.get() != mean {
            // Just turned on, or the interval changed: a wait drawn at the old mean could
            // leave megabytes unsampled, so the clock starts again (waits are memoryless).
            self.clock_mean.set(mean);
            at = last.saturating_add(self.draw(mean));
        }
        if allocated >= at {
            self.sample_gate.set(GATE_OPEN);
            at = allocated.saturating_add(self.draw(mean));
        }
        self.sample_at.set(at);
    }

    /// Whether the clock will choose an allocation of `usable` bytes about to be made on this
    /// thread: one at least the hook's interval contains a hook for certain, and the hook
    /// opens the gate when the count of the next sample falls within its bytes. Such a block
    /// can be placed where samples live at once, instead of moved there after. The mean and
    /// hook intervals it is sampled by, if due.
    pub(crate) fn sample_due(&self, usable: u64) -> Option<(u64, u64)> {
        let mean = mean_interval();
        let interval = inflight_bound().interval;
        let at = self.sample_at.get();
        if mean == 0 || at == u64::MAX || self.clock_mean.get() != mean || usable < interval {
            return None;
        }
        (self.allocated_now().saturating_add(usable) >= at).then_some((mean, interval))
    }

    /// The home path's post-allocation test: a block at `p` goes straight back to the caller
    /// when `p > sample_gate()` (0 normally: every non-null block; [`GATE_OPEN`] when the
    /// allocation in flight is to be sampled: none).
    #[inline(always)]
    pub(crate) fn sample_gate(&self) -> usize {
        self.sample_gate.get()
    }

    /// jemalloc's allocated counter for this thread now (0 before the thread registers).
    pub(crate) fn allocated_now(&self) -> u64 {
        self.counters().0
    }

    /// The sampler itself allocated on this thread since the counter stood at `before`
    /// (moving a sample): those bytes count on jemalloc's counter but are not the program's,
    /// so the clock skips them, the next hook's gap leaves out the part after the last hook,
    /// and a gate a hook opened inside them is closed.
    pub(crate) fn skip_sampling(&self, before: u64) {
        self.sample_gate.set(0);
        let now = self.allocated_now();
        let bytes = now.saturating_sub(before);
        let after_tick = now.saturating_sub(before.max(self.last_tick.get()));
        self.own_bytes
            .set(self.own_bytes.get().saturating_add(after_tick));
        let at = self.sample_at.get();
        if at != u64::MAX {
            self.sample_at.set(at.saturating_add(bytes));
        }
    }

    /// The tag this thread's samples carry now (0: none).
    pub(crate) fn sample_tag(&self) -> u64 {
        self.sample_tag.get()
    }

    /// The program's bytes between the last two thread-event hooks: the interval the sample
    /// in flight was chosen in (a block of `s < gap` bytes contained that hook with chance
    /// `s / gap`).
    pub(crate) fn sample_gap(&self) -> u64 {
        self.gap.get()
    }

    /// Closes the gate; whether it was open (the allocation in flight is to be sampled).
    #[inline]
    pub(crate) fn take_sample(&self) -> bool {
        self.sample_gate.replace(0) == GATE_OPEN
    }

    /// A sampled block, sampled at mean and hook intervals `was`, is resized to `usable`
    /// bytes: a resize is an allocation of its own, so the sample stays with the chance a new
    /// block of that size has to be chosen now, drawn here instead of by the clock (whose
    /// gate the caller closes after the resize, which may open it). Every resized block, sampled before or not,
    /// is then sampled with that one chance, and the estimate stays unbiased; carried through
    /// every growth instead, a vector doubled from small was counted about twice (+89 %
    /// seen). With sampling off the draw uses the sample's own intervals (samples stay until
    /// freed, as promised, thinned as they would have been). The intervals the sample now
    /// stands by, if it stays.
    pub(crate) fn resample(&self, usable: u64, was: (u64, u64)) -> Option<(u64, u64)> {
        let mean = mean_interval();
        let basis = if mean == 0 {
            was
        } else {
            (mean, self.gap.get())
        };
        (self.uniform() <= probability(usable, basis.0, basis.1)).then_some(basis)
    }

    /// A uniform draw in (0, 1] (xorshift64*, seeded from the state's address, so threads
    /// differ).
    fn uniform(&self) -> f64 {
        let mut x = self.rng.get();
        if x == 0 {
            x = (std::ptr::from_ref(self) as u64) | 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng.set(x);
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        // From the top 53 bits.
        ((r >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// An exponential draw of mean `mean` bytes, at least 1.
    fn draw(&self, mean: u64) -> u64 {
        let u = self.uniform();
        let d = -u.ln() * mean as f64;
        if d >= u64::MAX as f64 {
            u64::MAX
        } else {
            (d as u64).max(1)
        }
    }
}
