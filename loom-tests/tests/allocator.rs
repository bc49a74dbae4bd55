//! Loom models of the allocator's shared ledger: the limit check and the settling of threads'
//! home deltas, on the functions the allocator itself runs (see `nodedb_mem_alloc::model`).
//!
//! Run (see docs/testing.md):
//! `RUSTFLAGS="--cfg nodedb_mem_loom" LOOM_MAX_PREEMPTIONS=2 cargo test -p nodedb-mem-loom-tests --release --test allocator`
#![cfg(nodedb_mem_loom)]

use loom::sync::Arc;
use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::thread;
use nodedb_mem_alloc::ctl::ledger::Bound;
use nodedb_mem_alloc::model::{Home, Ledger};

/// The models run at the default in-flight bound (the environment variable unset).
const HEADROOM: u64 = Bound::DEFAULT.headroom;
const HEADROOM_MAX: u64 = Bound::DEFAULT.headroom_max;
const INTERVAL: u64 = Bound::DEFAULT.interval;
use nodedb_mem_loom_tests::model;

const KIB: u64 = 1024;

/// Allocates `bytes` as the allocator would: on the home path while the thread holds
/// headroom, else charged directly against the limit. Returns the bytes now live for the
/// ledger (0 when the limit refused them: the allocator would put them in overflow).
fn allocate(home: &mut Home<'_>, ledger: &Ledger, bytes: u64) -> u64 {
    if home.open() {
        home.alloc(bytes);
        bytes
    } else if ledger.try_charge(bytes) {
        bytes
    } else {
        0
    }
}

#[test]
fn settling_threads_never_pass_the_limit_and_end_exact() {
    model(|| {
        // Room for both threads' headroom plus a little: direct charges compete for the rest.
        let limit = 2 * HEADROOM + 4 * KIB;
        let ledger = Arc::new(Ledger::new(limit));
        let worker = |ledger: Arc<Ledger>, block: u64| {
            thread::spawn(move || {
                let mut home = Home::new(&ledger);
                home.settle(true);
                // Crosses the interval: the hook settles inside this allocation.
                let mut live = allocate(&mut home, &ledger, block);
                live += allocate(&mut home, &ledger, 4 * KIB);
                home.free(4 * KIB.min(live));
                live -= 4 * KIB.min(live);
                home.flush();
                live
            })
        };
        let a = worker(ledger.clone(), INTERVAL + 2 * KIB);
        let b = worker(ledger.clone(), INTERVAL);
        let direct = ledger.try_charge(6 * KIB);
        let live = a.join().unwrap() + b.join().unwrap() + if direct { 6 * KIB } else { 0 };
        assert!(
            ledger.peak() <= limit,
            "peak {} over {limit}",
            ledger.peak()
        );
        // Both threads flushed: the ledger holds exactly what is live.
        assert_eq!(ledger.charged(), live);
    });
}

#[test]
fn a_block_freed_on_another_thread_never_takes_the_ledger_below_zero() {
    model(|| {
        let ledger = Arc::new(Ledger::new(u64::MAX));
        let mut main = Home::new(&ledger);
        main.settle(true);
        // Unsettled: only the headroom covers it in the ledger.
        main.alloc(8 * KIB);
        let other = {
            let ledger = ledger.clone();
            thread::spawn(move || {
                let mut home = Home::new(&ledger);
                home.free(8 * KIB); // the same engine's block, freed here
                home.flush();
            })
        };
        main.flush();
        other.join().unwrap();
        // A wrapped counter would show as a huge peak.
        assert!(
            ledger.peak() <= HEADROOM + 8 * KIB,
            "peak {}",
            ledger.peak()
        );
        assert_eq!(ledger.charged(), 0);
    });
}

#[test]
fn at_the_limit_one_thread_gets_headroom_and_the_other_charges_directly() {
    model(|| {
        let limit = HEADROOM + 2 * KIB;
        let ledger = Arc::new(Ledger::new(limit));
        let arrived = Arc::new(AtomicUsize::new(0));
        let worker = |ledger: Arc<Ledger>, arrived: Arc<AtomicUsize>| {
            thread::spawn(move || {
                let mut home = Home::new(&ledger);
                home.settle(true);
                let had = home.headroom();
                // Hold it until the other thread has tried too.
                arrived.fetch_add(1, Ordering::AcqRel);
                while arrived.load(Ordering::Acquire) < 2 {
                    thread::yield_now();
                }
                let live = allocate(&mut home, &ledger, KIB);
                home.flush();
                (had, live)
            })
        };
        let a = worker(ledger.clone(), arrived.clone());
        let b = worker(ledger.clone(), arrived.clone());
        let ((ha, la), (hb, lb)) = (a.join().unwrap(), b.join().unwrap());
        assert!(
            ha == 0 || hb == 0,
            "both held headroom at once: {ha} + {hb} > {limit}"
        );
        assert!(ha + hb > 0, "one of them got it");
        assert!(ha <= HEADROOM_MAX && hb <= HEADROOM_MAX);
        assert!(ledger.peak() <= limit);
        assert_eq!(ledger.charged(), la + lb);
        assert_eq!(la + lb, 2 * KIB, "a kibibyte each fits either way");
    });
}
