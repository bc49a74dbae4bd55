//! Heap-profile samples per engine: attribution by address (frees on other threads
//! included), a `realloc` keeping its sample, estimates against the exact ledger, and
//! sampling turned on and off under load. This binary installs `GovernedAlloc`.

mod common;

use std::collections::HashSet;

use nodedb_mem_alloc::ctl::arenas::owner;
use nodedb_mem_alloc::ctl::profile::{
    LiveSample, hold_sampler_locks, live_samples, sample_counts, sample_interval,
    set_sample_interval, set_thread_tag, thread_tag,
};
use nodedb_mem_alloc::{EngineGuard, EngineId, GovernedAlloc};

use common::{serial, settled};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const KIB: usize = 1 << 10;

/// Whether any frame of `stack` resolves to a symbol whose name contains `name`.
fn has_frame(stack: &[usize], name: &str) -> bool {
    stack.iter().any(|&ip| {
        let mut found = false;
        backtrace::resolve(ip as *mut std::ffi::c_void, |sym| {
            if let Some(n) = sym.name()
                && n.to_string().contains(name)
            {
                found = true;
            }
        });
        found
    })
}

fn weight(samples: &[LiveSample], site: &str) -> f64 {
    samples
        .iter()
        .filter(|s| site.is_empty() || has_frame(&s.stack, site))
        .map(|s| s.weight)
        .sum()
}

#[inline(never)]
fn query_site(n: usize) -> Vec<Vec<u8>> {
    // Not a tail call: the site keeps its own frame in optimised builds too.
    std::hint::black_box((0..n).map(|i| vec![i as u8; 4 * KIB]).collect())
}

#[inline(never)]
fn vector_site(n: usize) -> Vec<Vec<u8>> {
    // Not a tail call: the site keeps its own frame in optimised builds too.
    std::hint::black_box((0..n).map(|i| vec![i as u8; 4 * KIB]).collect())
}

/// Registers the calling thread with the allocator (its first engine allocations), so the
/// thread-event hook, which drives the sampler, fires for it.
fn warm_up() {
    let _g = EngineGuard::enter(EngineId::Query);
    let v: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; 4 * KIB]).collect();
    drop(v);
}

#[test]
fn profiles_split_by_engine_estimate_the_ledger_and_lose_blocks_freed_elsewhere() {
    let _s = serial();
    warm_up();
    let (q, v) = (EngineId::Query, EngineId::Vector);
    let (q0, v0) = (settled(q), settled(v));
    set_sample_interval(16 * KIB as u64);
    assert_eq!(sample_interval(), 16 * KIB as u64);
    let queries = {
        let _g = EngineGuard::enter(q);
        query_site(25 * 1024) // 100 MiB in 4 KiB blocks
    };
    let vectors = {
        let _g = EngineGuard::enter(v);
        vector_site(5 * 1024) // 20 MiB
    };
    set_sample_interval(0);
    let exact_q = (settled(q) - q0) as f64;
    let exact_v = (settled(v) - v0) as f64;

    let sq = live_samples(Some(q));
    let sv = live_samples(Some(v));
    assert!(
        sq.iter()
            .all(|s| s.engine == q && owner(s.address as *const u8) == q)
    );
    assert!(sv.iter().all(|s| s.engine == v));
    let (total_q, total_v) = (weight(&sq, ""), weight(&sv, ""));
    let err_q = (total_q - exact_q) / exact_q;
    println!(
        "query: {} samples, estimate {total_q:.0} B, ledger {exact_q} B, error {:.2} %",
        sq.len(),
        err_q * 100.0
    );
    assert!(err_q.abs() < 0.05, "{err_q}");
    // The site that allocated the 100 MiB holds at least 95 % of Query's profile, and none
    // of Vector's.
    let site_share = weight(&sq, "query_site") / total_q;
    assert!(site_share >= 0.95, "{site_share}");
    assert_eq!(weight(&sv, "query_site"), 0.0);
    assert!(weight(&sv, "vector_site") / total_v >= 0.95);
    let err_v = (total_v - exact_v) / exact_v;
    assert!(err_v.abs() < 0.10, "{err_v}");

    // Freed on another thread, with no guard: the blocks leave the profile.
    std::thread::spawn(move || drop(queries)).join().unwrap();
    let left = weight(&live_samples(Some(q)), "query_site");
    assert!(left < total_q * 0.01, "{left}");
    assert_eq!(settled(q), q0);
    drop(vectors);
    assert_eq!(settled(v), v0);
    assert_eq!(weight(&live_samples(Some(v)), "vector_site"), 0.0);
}

#[inline(never)]
fn grown_site() -> Vec<u8> {
    std::hint::black_box(Vec::with_capacity(64 * KIB))
}

#[test]
fn a_realloc_keeps_its_sample_and_its_stack() {
    let _s = serial();
    warm_up();
    let q = EngineId::Query;
    let q0 = settled(q);
    // Every hook crossing sampled: a block larger than the hook's interval always is.
    set_sample_interval(1);
    let mut v = {
        let _g = EngineGuard::enter(q);
        grown_site()
    };
    set_sample_interval(0);
    let first = v.as_ptr() as usize;
    let before: Vec<LiveSample> = live_samples(Some(q))
        .into_iter()
        .filter(|s| s.address == first)
        .collect();
    assert_eq!(before.len(), 1, "the 64 KiB block was not sampled");
    assert!(has_frame(&before[0].stack, "grown_site"));
    assert_eq!(owner(v.as_ptr()), q);
    v.extend(std::iter::repeat_n(7u8, 64 * KIB));
    {
        let _g = EngineGuard::enter(q);
        v.reserve_exact(192 * KIB);
    }
    let moved = v.as_ptr() as usize;
    let after = live_samples(Some(q));
    assert!(after.iter().all(|s| s.address != first || first == moved));
    let now: Vec<&LiveSample> = after.iter().filter(|s| s.address == moved).collect();
    assert_eq!(now.len(), 1, "the sample did not follow the block");
    assert_eq!(now[0].stack, before[0].stack);
    assert!(now[0].size >= 256 * KIB as u64);
    assert!(v.iter().all(|&b| b == 7));
    drop(v);
    assert!(live_samples(Some(q)).iter().all(|s| s.address != moved));
    assert_eq!(settled(q), q0);
}

#[test]
fn sampling_turns_on_and_off_under_load_and_leaves_nothing_behind() {
    let _s = serial();
    let q = EngineId::Query;
    let q0 = settled(q);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let _g = EngineGuard::enter(q);
                let mut kept: Vec<Vec<u8>> = Vec::new();
                let mut i = 0usize;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    kept.push(vec![t as u8; 64 + (i * 7919) % (96 * KIB)]);
                    if kept.len() > 512 {
                        kept.swap_remove(i % 512);
                        let mut last = kept.pop().unwrap();
                        last.reserve(4 * KIB);
                        kept.push(last);
                    }
                    i += 1;
                }
                drop(kept);
            })
        })
        .collect();
    let taken0 = sample_counts().taken;
    for round in 0..40 {
        set_sample_interval(if round % 2 == 0 { 8 * KIB as u64 } else { 0 });
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    set_sample_interval(0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    let counts = sample_counts();
    assert!(counts.taken > taken0, "{counts:?}");
    assert_eq!(counts.dropped, 0);
    // Everything the workers held is freed: no sample of theirs is left, and the ledger is
    // back where it was.
    let left: HashSet<usize> = live_samples(Some(q)).iter().map(|s| s.address).collect();
    assert!(left.is_empty(), "{} samples left", left.len());
    assert_eq!(settled(q), q0);
    // Off, nothing more is taken.
    let taken = sample_counts().taken;
    let _g = EngineGuard::enter(q);
    let v: Vec<Vec<u8>> = (0..2000).map(|_| vec![0u8; 4 * KIB]).collect();
    drop(v);
    assert_eq!(sample_counts().taken, taken);
}

#[test]
fn a_fork_child_frees_a_sampled_block_though_another_thread_held_the_sampler_at_the_fork() {
    let _s = serial();
    warm_up();
    let q = EngineId::Query;
    set_sample_interval(1);
    // A block sure to be sampled.
    let kept = {
        let _g = EngineGuard::enter(q);
        grown_site()
    };
    set_sample_interval(0);
    let at = kept.as_ptr() as usize;
    assert!(live_samples(Some(q)).iter().any(|s| s.address == at));
    // Another thread holds the sampler's locks, as one taking a sample does for a moment,
    // when this one forks: the child must not inherit them held.
    let holder = std::thread::spawn(|| hold_sampler_locks(std::time::Duration::from_millis(300)));
    std::thread::sleep(std::time::Duration::from_millis(50));
    // SAFETY: the child only frees, reads the sampler's table and exits with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let copy = std::mem::ManuallyDrop::new(unsafe {
            // SAFETY: the child's copy of `kept`'s block, freed once here.
            Vec::from_raw_parts(kept.as_ptr().cast_mut(), kept.len(), kept.capacity())
        });
        drop(std::mem::ManuallyDrop::into_inner(copy));
        let left = live_samples(None).iter().any(|s| s.address == at);
        // SAFETY: `_exit` ends the child without running the parent's destructors.
        unsafe { libc::_exit(if left { 4 } else { 0 }) };
    }
    let mut status = 0;
    let started = std::time::Instant::now();
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if started.elapsed() > std::time::Duration::from_secs(10) {
            // SAFETY: our own child, hung.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the fork child hung on a sampler lock held at the fork");
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status}"
    );
    holder.join().unwrap();
    drop(kept);
    assert!(live_samples(Some(q)).iter().all(|s| s.address != at));
}

#[inline(never)]
fn tagged_site(n: usize) -> Vec<Vec<u8>> {
    // Not a tail call: the site keeps its own frame in optimised builds too.
    std::hint::black_box((0..n).map(|i| vec![i as u8; 4 * KIB]).collect())
}

#[test]
fn samples_carry_the_allocating_threads_tag_through_a_realloc_and_a_free_elsewhere() {
    let _s = serial();
    warm_up();
    let q = EngineId::Query;
    assert_eq!(thread_tag(), 0);
    set_sample_interval(16 * KIB as u64);
    assert_eq!(set_thread_tag(7), 0);
    assert_eq!(thread_tag(), 7);
    let (tagged, mut grown) = {
        let _g = EngineGuard::enter(q);
        (tagged_site(4 * 1024), grown_site()) // 16 MiB, and one 64 KiB block
    };
    assert_eq!(set_thread_tag(0), 7);
    let untagged = {
        let _g = EngineGuard::enter(q);
        query_site(4 * 1024)
    };
    let samples = live_samples(Some(q));
    let of = |site: &str| -> Vec<u64> {
        samples
            .iter()
            .filter(|s| has_frame(&s.stack, site))
            .map(|s| s.tag)
            .collect()
    };
    let (t, u) = (of("tagged_site"), of("query_site"));
    assert!(t.len() > 100 && u.len() > 100, "{} {}", t.len(), u.len());
    assert!(t.iter().all(|&tag| tag == 7), "{t:?}");
    assert!(u.iter().all(|&tag| tag == 0), "{u:?}");
    // A sampled block keeps its tag when it moves, whatever the tag of the thread moving it.
    // (Unless the `realloc`, an allocation of its own, is chosen as a new sample: then it
    // carries the stack and the tag of that call.)
    let sample_64k = live_samples(Some(q))
        .into_iter()
        .find(|s| s.address == grown.as_ptr() as usize);
    if let Some(before) = sample_64k {
        set_thread_tag(9);
        grown.reserve_exact(192 * KIB);
        set_thread_tag(0);
        let moved = live_samples(Some(q))
            .into_iter()
            .find(|s| s.address == grown.as_ptr() as usize)
            .expect("the sample followed the block");
        let expected = if moved.stack == before.stack { 7 } else { 9 };
        assert_eq!(moved.tag, expected);
    }
    // Freed on another thread: gone, tag and all.
    std::thread::spawn(move || drop(tagged)).join().unwrap();
    assert!(of_live(q, "tagged_site").is_empty());
    drop((untagged, grown));
    set_sample_interval(0);
}

fn of_live(engine: EngineId, site: &str) -> Vec<u64> {
    live_samples(Some(engine))
        .iter()
        .filter(|s| has_frame(&s.stack, site))
        .map(|s| s.tag)
        .collect()
}

#[inline(never)]
fn grown_by_push(vecs: usize, len: usize) -> Vec<Vec<u64>> {
    let mut all: Vec<Vec<u64>> = (0..vecs).map(|_| Vec::new()).collect();
    // Round-robin, as a table of series grows: each vector doubles many times, interleaved.
    for i in 0..len {
        for v in &mut all {
            v.push(i as u64);
        }
    }
    all
}

#[test]
fn blocks_grown_by_realloc_are_estimated_without_bias() {
    let _s = serial();
    warm_up();
    let q = EngineId::Query;
    let q0 = settled(q);
    set_sample_interval(64 * KIB as u64);
    let vecs = {
        let _g = EngineGuard::enter(q);
        grown_by_push(16 * 1024, 1024) // 16,384 vectors doubled up to 8 KiB each: 128 MiB
    };
    set_sample_interval(0);
    let exact = (settled(q) - q0) as f64;
    let samples = live_samples(Some(q));
    let estimate = weight(&samples, "");
    let err = (estimate - exact) / exact;
    println!(
        "{} samples, estimate {estimate:.0} B, ledger {exact} B, error {:+.2} %",
        samples.len(),
        err * 100.0
    );
    // A sample carried through every later growth would count each vector once per doubling
    // it was sampled at: about twice its bytes.
    assert!(err.abs() < 0.10, "{err}");
    drop(vecs);
}

#[inline(never)]
fn quarter_mib_site(n: usize) -> Vec<Vec<u8>> {
    std::hint::black_box((0..n).map(|i| vec![i as u8; 256 * KIB]).collect())
}

#[inline(never)]
fn doubled_site(vecs: usize) -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = (0..vecs).map(|_| Vec::with_capacity(64 * KIB)).collect();
    // Each doubled from 64 KiB to 8 MiB by `realloc`s of its own size (all off the home path).
    for _ in 0..7 {
        for v in &mut all {
            let len = v.capacity() * 2;
            v.resize(len, 1);
        }
    }
    std::hint::black_box(all)
}

#[test]
fn large_blocks_and_large_growth_are_estimated_without_bias() {
    let _s = serial();
    warm_up();
    let q = EngineId::Query;
    let q0 = settled(q);
    set_sample_interval(256 * KIB as u64);
    let (blocks, grown) = {
        let _g = EngineGuard::enter(q);
        (quarter_mib_site(1024), doubled_site(16)) // 256 MiB, 128 MiB
    };
    set_sample_interval(0);
    let exact_blocks = 1024.0 * (256 * KIB) as f64;
    let samples = live_samples(Some(q));
    assert!(
        samples
            .iter()
            .all(|s| owner(s.address as *const u8) == q && s.engine == q)
    );
    let in_blocks = weight(&samples, "quarter_mib_site");
    let err = (in_blocks - exact_blocks) / exact_blocks;
    let in_grown = weight(&samples, "doubled_site");
    let exact_grown = (settled(q) - q0) as f64 - exact_blocks;
    let err_grown = (in_grown - exact_grown) / exact_grown;
    println!(
        "256 KiB blocks: {:.0} of {exact_blocks} B ({:+.1} %); grown to 8 MiB: {in_grown:.0} of {exact_grown} B ({:+.1} %)",
        in_blocks,
        err * 100.0,
        err_grown * 100.0
    );
    assert!(err.abs() < 0.10, "{err}");
    assert!(err_grown.abs() < 0.10, "{err_grown}");
    drop((blocks, grown));
    assert_eq!(settled(q), q0);
}
