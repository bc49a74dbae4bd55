//! The home path leaves counting to jemalloc and settles later: the bounds that leaves, at
//! every step. This binary installs `GovernedAlloc`.

mod common;

use std::alloc::{GlobalAlloc, Layout};

use nodedb_mem_alloc::{
    EngineGuard, EngineId, GovernedAlloc, ctl::arenas::is_overflow, ctl::arenas::owner,
    ctl::ledger::charged, ctl::ledger::inflight_bound, ctl::ledger::overflow_charged,
    ctl::ledger::set_overflow_limit, ctl::overflow::OverflowPolicy, ctl::overflow::enable_overflow,
    ctl::thread::HOME_SWITCH_AFTER, ctl::thread::home_engine, ctl::thread::thread_events_active,
    ctl::thread::thread_settlements,
};

use common::{serial, settled};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

/// jemalloc size classes, so a block's usable size is its request.
const CLASSES: [usize; 16] = [
    16, 48, 96, 128, 160, 256, 320, 512, 640, 1024, 1280, 2048, 2560, 3072, 4096, 8192,
];

/// Makes `engine` the calling thread's home (a run of visits moves it there).
fn make_home(engine: EngineId) -> EngineGuard {
    let g = EngineGuard::enter(engine);
    for _ in 0..HOME_SWITCH_AFTER * 2 {
        drop(std::hint::black_box(Box::new(0u64)));
    }
    assert_eq!(home_engine(), engine);
    g
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn the_ledger_stays_within_the_bound_at_every_step() {
    let _s = serial();
    const STEPS: usize = 40_000;
    let mut blocks: Vec<(*mut u8, Layout)> = Vec::with_capacity(STEPS);
    let engine = EngineId::Crdt;
    let _g = make_home(engine);
    let base = settled(engine);
    let (events_before, _) = thread_settlements();
    let mut live = 0u64;
    let mut allocated = 0u64;
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut worst = (i64::MAX, i64::MIN);
    for step in 0..STEPS {
        let r = rng.next();
        // Grow on average, with bursts of frees, so the run crosses the interval both ways.
        if blocks.is_empty() || r % 8 < 5 {
            let size = CLASSES[(r >> 8) as usize % CLASSES.len()];
            let layout = Layout::from_size_align(size, 8).expect("layout");
            // SAFETY: non-zero size; freed below with the same layout.
            let p = unsafe { ALLOC.alloc(layout) };
            assert!(!p.is_null());
            assert_eq!(owner(p), engine);
            blocks.push((p, layout));
            live += size as u64;
            allocated += size as u64;
        } else {
            let i = (r >> 16) as usize % blocks.len();
            let (p, layout) = blocks.swap_remove(i);
            // SAFETY: allocated above with this layout, freed once.
            unsafe { ALLOC.dealloc(p, layout) };
            live -= layout.size() as u64;
        }
        let off = charged(engine) as i64 - (base + live) as i64;
        worst = (worst.0.min(off), worst.1.max(off));
        assert!(
            (0..inflight_bound().batch as i64).contains(&off),
            "step {step}: ledger {} for {} live bytes: {off} off, outside [0, {})",
            charged(engine),
            base + live,
            inflight_bound().batch
        );
    }
    let (events, settlements) = thread_settlements();
    eprintln!(
        "bound {}: {STEPS} steps, {live} B live at the end: ledger off by {} to {} B; {} hook \
         calls, {settlements} settlements",
        inflight_bound().batch,
        worst.0,
        worst.1,
        events - events_before
    );
    assert!(
        thread_events_active(),
        "this jemalloc has the thread-event hook"
    );
    // About 100 MB allocated and freed: the hook came at least once per interval allocated
    // (thousands of times at the default bound).
    let interval = inflight_bound().interval;
    assert!(
        events - events_before >= allocated / interval - 1,
        "{} hook calls for {allocated} B allocated at a {interval} B interval",
        events - events_before
    );
    for (p, layout) in blocks.drain(..) {
        // SAFETY: allocated above with this layout, freed once.
        unsafe { ALLOC.dealloc(p, layout) };
    }
    assert_eq!(settled(engine), base, "exact once the thread has flushed");
}

#[test]
fn a_thread_over_its_limit_when_the_hook_fires_moves_to_overflow() {
    let _s = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    enable_overflow(dir.path(), 64 << 20, false, OverflowPolicy::FallBack).expect("overflow");
    let engine = EngineId::Sparse;
    let mut blocks = Vec::with_capacity(1024);
    let _g = make_home(engine);
    let base = settled(engine);
    let base_over = overflow_charged(engine);
    let limit = base + 256 * 1024;
    set_overflow_limit(engine, Some(limit));
    let layout = Layout::from_size_align(1024, 8).expect("layout");
    let (events_before, _) = thread_settlements();
    for step in 0..1024 {
        // SAFETY: non-zero size; freed below with the same layout.
        let p = unsafe { ALLOC.alloc(layout) };
        assert!(!p.is_null());
        blocks.push(p);
        let now = charged(engine);
        assert!(now <= limit, "step {step}: {now} B charged, limit {limit}");
    }
    let (events, _) = thread_settlements();
    let in_overflow = blocks.iter().filter(|&&p| is_overflow(p)).count() as u64;
    eprintln!(
        "1 MiB in 1 KiB blocks under a 256 KiB limit: {in_overflow} blocks in overflow, {} hook \
         calls",
        events - events_before
    );
    assert!(events - events_before >= 16, "the hook fired while over");
    // What the limit could not take went to overflow, and only that.
    assert!(
        (768..1024).contains(&in_overflow),
        "{in_overflow} of 1024 in overflow"
    );
    let in_range = 1024 - in_overflow;
    assert_eq!(settled(engine), base + in_range * 1024);
    assert_eq!(overflow_charged(engine), base_over + in_overflow * 1024);
    for p in blocks {
        // SAFETY: allocated above with this layout, freed once.
        unsafe { ALLOC.dealloc(p, layout) };
    }
    set_overflow_limit(engine, None);
    assert_eq!(settled(engine), base);
    assert_eq!(overflow_charged(engine), base_over);
}

#[test]
fn a_thread_that_never_reaches_the_interval_settles_when_it_exits() {
    let _s = serial();
    let engine = EngineId::Timeseries;
    let base = settled(engine);
    let (leaked, events) = std::thread::spawn(move || {
        let _g = make_home(engine);
        // Five blocks on the home path, 5 KiB in all: far from the 16 KiB interval.
        let leaked: [usize; 5] =
            std::array::from_fn(|i| Box::into_raw(Box::new([i as u8; 1024])) as usize);
        // Nothing has settled these: the ledger does not know them one by one.
        (leaked, thread_settlements().0)
    })
    .join()
    .expect("thread");
    assert!(
        inflight_bound().interval > 5 * 1024 + 2 * HOME_SWITCH_AFTER as u64 * 8,
        "the test's premise"
    );
    assert_eq!(events, 0, "the hook never fired on that thread");
    // Its exit settled them and gave back its headroom: exactly the five blocks remain.
    assert_eq!(settled(engine), base + 5 * 1024);
    for p in leaked {
        // SAFETY: leaked by `Box::into_raw` above, freed once.
        drop(unsafe { Box::from_raw(p as *mut [u8; 1024]) });
    }
    assert_eq!(settled(engine), base);
}

#[test]
fn threads_sharing_an_engine_never_take_its_ledger_past_the_limit() {
    let _s = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    enable_overflow(dir.path(), 64 << 20, false, OverflowPolicy::FallBack).expect("overflow");
    let engine = EngineId::Vector;
    let base = settled(engine);
    let base_over = overflow_charged(engine);
    let limit = base + (1 << 20);
    set_overflow_limit(engine, Some(limit));
    let stop = std::sync::atomic::AtomicBool::new(false);
    let homed = std::sync::Barrier::new(2);
    /// Stops the sampler however the scope ends (a panicking worker must not leave it spinning).
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let worst = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut worst = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                worst = worst.max(charged(engine));
            }
            worst
        });
        let workers: Vec<_> = (0..2u64)
            .map(|t| {
                let homed = &homed;
                s.spawn(move || {
                    let mut blocks = Vec::with_capacity(8192);
                    let _g = make_home(engine);
                    // Both homes first: an engine already at its limit sends visits to overflow,
                    // which would keep the other thread from moving home.
                    homed.wait();
                    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ t);
                    // 8,192 blocks of up to 2 KiB each, a quarter freed again along the way.
                    for _ in 0..8192 {
                        let size = CLASSES[rng.next() as usize % 12];
                        let b = vec![t as u8; size];
                        blocks.push(b);
                        if rng.next().is_multiple_of(4) {
                            let i = rng.next() as usize % blocks.len();
                            drop(blocks.swap_remove(i));
                        }
                    }
                    let bytes: usize = blocks.iter().map(Vec::len).sum();
                    let over = blocks.iter().filter(|b| is_overflow(b.as_ptr())).count();
                    drop(blocks);
                    (bytes, over)
                })
            })
            .collect();
        let stopper = StopOnDrop(&stop);
        let done: Vec<(usize, usize)> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        drop(stopper);
        eprintln!("two threads, live at the end and blocks in overflow: {done:?}");
        assert!(done.iter().all(|&(_, over)| over > 0), "both went over");
        sampler.join().unwrap()
    });
    assert!(worst <= limit, "sampled {worst} B charged, limit {limit}");
    set_overflow_limit(engine, None);
    assert_eq!(settled(engine), base, "both threads exited: exact");
    assert_eq!(overflow_charged(engine), base_over);
}

#[test]
fn a_large_block_freed_on_the_home_path_is_credited_before_the_free_returns() {
    let _s = serial();
    let engine = EngineId::Query;
    let _g = make_home(engine);
    let base = settled(engine);
    let (events_before, _) = thread_settlements();
    let big: Vec<u8> = vec![1; 2 << 20];
    let with = charged(engine);
    assert!(
        with >= base + (2 << 20) && with < base + (2 << 20) + inflight_bound().batch,
        "{with} charged for {} B live",
        base + (2 << 20)
    );
    drop(big);
    // No flush: the free crossed the interval, so jemalloc called the hook inside it.
    let after = charged(engine);
    assert!(
        after >= base && after < base + inflight_bound().batch,
        "{after} charged once the block is gone (base {base})"
    );
    assert!(thread_settlements().0 > events_before);
    assert_eq!(settled(engine), base);
}

/// The same run in a process whose in-flight bound is 1 MiB (`NODEDB_MEM_INFLIGHT_BOUND`): the
/// ledger within `[0, 1 MiB)` of the live bytes at every step, and exact once flushed.
#[test]
fn the_ledger_stays_within_a_one_mib_bound_at_every_step() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "the_ledger_stays_within_the_bound_at_every_step",
            "--exact",
            "--nocapture",
        ])
        .env(nodedb_mem_alloc::ctl::ledger::INFLIGHT_BOUND_ENV, "1MiB")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("bound 1048576: 40000 steps"), "{text}");
}
