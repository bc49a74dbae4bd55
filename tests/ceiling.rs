//! The ceiling holds by itself: `install()` with its defaults (no monitor started by hand), one
//! engine with a budget of an eighth of the ceiling holding twice the ceiling of live data and
//! more. Each test runs in its own process (nextest), so `VmHWM` is this test's peak.

use std::time::{Duration, Instant};

use nodedb_mem::{
    EngineGuard, EngineId, GovernedAlloc, MemoryGovernor, OverflowConfig, flush_thread,
};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const MIB: usize = 1 << 20;
const CEILING: u64 = 512 << 20;
const Q: EngineId = EngineId::Query;

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

/// The governor as a new user gets it, but for an overflow directory made sure to be on disk
/// (CI's temp directory may be tmpfs).
fn install() -> (&'static MemoryGovernor, tempfile::TempDir) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let gov = MemoryGovernor::builder()
        .global_ceiling(CEILING)
        .budget(Q, CEILING / 8)
        .overflow(OverflowConfig::in_dir(dir.path()))
        .install()
        .unwrap();
    (gov, dir)
}

/// A 16 MiB Query budget and no background thread, so the limit stays put.
fn install_without_background() -> (&'static MemoryGovernor, tempfile::TempDir) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let gov = MemoryGovernor::builder()
        .global_ceiling(CEILING)
        .budget(Q, 16 * MIB as u64)
        .overflow(OverflowConfig::in_dir(dir.path()))
        .background(None)
        .install()
        .unwrap();
    (gov, dir)
}

/// Engine usage may pass the limit by at most one thread's batch (per allocating thread).
fn assert_within_limit(gov: &MemoryGovernor, threads: u64, at: &str) {
    let usage = gov.usage(Q);
    let limit = gov.limit(Q);
    assert!(
        usage <= limit + threads * nodedb_mem::inflight_bound().batch,
        "{at}: usage {usage} above limit {limit} + {threads} × {}",
        nodedb_mem::inflight_bound().batch
    );
}

/// Fills `total` bytes in blocks of `block` bytes under the Query guard, checking the ledger
/// after every block, then checks the peak, the data, read-back and the release.
fn fill(block: usize, total: usize, zeroed: bool) {
    let (gov, _dir) = install();
    flush_thread();
    let base_usage = gov.usage(Q);
    let n = total / block;
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(n);
    for i in 0..n {
        {
            let _g = EngineGuard::enter(Q);
            if zeroed {
                // Zeroed, then one byte written in every page (so every page is touched).
                let mut v = vec![0u8; block];
                for page in v.chunks_mut(4096) {
                    page[0] = i as u8;
                }
                blocks.push(v);
            } else {
                // Allocated first, filled after (as `resize` does), a page at a time.
                let mut v = Vec::with_capacity(block);
                let page = [i as u8; 4096];
                while v.len() < block {
                    v.extend_from_slice(&page[..(block - v.len()).min(4096)]);
                }
                blocks.push(v);
            }
        }
        assert_within_limit(gov, 1, &format!("block {i}"));
    }
    flush_thread();
    assert_within_limit(gov, 1, "end of fill");
    let peak = status_kib("VmHWM:");
    let push = nodedb_mem::push_out_stats(Q);
    eprintln!(
        "{n} blocks of {block} B: VmHWM {} MiB, overflow {} MiB, {} push-outs over {} MiB in {} ms",
        peak >> 20,
        gov.budget(Q).overflow_bytes() >> 20,
        push.calls,
        push.bytes >> 20,
        push.nanos / 1_000_000
    );
    assert!(
        peak <= CEILING,
        "VmHWM {} MiB above the ceiling",
        peak >> 20
    );
    // The figures show it: overflow pushed out by the allocating thread, most of it on disk.
    let snap = gov.snapshot();
    let figures = snap.engine(Q).overflow;
    assert!(push.calls > 0 && push.bytes > 0 && push.nanos > 0);
    assert_eq!(snap.engine(Q).push_out.calls, push.calls);
    assert!(figures.paged_out() > figures.resident, "{figures:?}");
    assert!(
        figures.disk >= gov.budget(Q).overflow_bytes() / 2,
        "{figures:?}"
    );
    // Every byte reads back as written (faulting overflow back in).
    // (Compared a page at a time with `==`, a `memcmp`, so the check is quick in debug builds.)
    let zeros = [0u8; 4096];
    for (i, v) in blocks.iter().enumerate() {
        if zeroed {
            for page in v.chunks(4096) {
                assert!(
                    page[0] == i as u8 && page[1..] == zeros[1..page.len()],
                    "block {i}"
                );
            }
        } else {
            let page = [i as u8; 4096];
            assert!(v.chunks(4096).all(|c| c == &page[..c.len()]), "block {i}");
        }
    }
    // Within a second of the reads the governor has resident memory back under the ceiling.
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let rss = status_kib("VmRSS:");
        if rss <= CEILING {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "VmRSS {} MiB a second after the reads",
            rss >> 20
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(blocks);
    flush_thread();
    assert_eq!(gov.usage(Q), base_usage);
    assert_eq!(gov.budget(Q).overflow_bytes(), 0);
}

#[test]
fn one_mib_zeroed_vecs_twice_the_ceiling() {
    fill(MIB, 2 * CEILING as usize, true);
}

#[test]
fn four_kib_vecs_twice_the_ceiling() {
    fill(4096, 2 * CEILING as usize, false);
}

#[test]
fn sixty_four_kib_blocks_four_times_the_ceiling() {
    fill(64 * 1024, 4 * CEILING as usize, false);
}

#[test]
fn two_threads_of_four_kib_vecs_twice_the_ceiling() {
    let (gov, _dir) = install();
    flush_thread();
    let base_usage = gov.usage(Q);
    let per_thread = CEILING as usize / 4096; // 2 × 512 MiB over two threads
    let filled: Vec<Vec<Vec<u8>>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2u8)
            .map(|t| {
                s.spawn(move || {
                    let mut mine = Vec::with_capacity(per_thread);
                    for i in 0..per_thread {
                        let _g = EngineGuard::enter(Q);
                        mine.push(vec![t.wrapping_mul(31).wrapping_add(i as u8); 4096]);
                        if i % 256 == 0 {
                            assert_within_limit(gov, 2, &format!("thread {t} block {i}"));
                        }
                    }
                    mine
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    flush_thread();
    assert_within_limit(gov, 2, "end of fill");
    let peak = status_kib("VmHWM:");
    eprintln!("two threads: VmHWM {} MiB", peak >> 20);
    assert!(
        peak <= CEILING,
        "VmHWM {} MiB above the ceiling",
        peak >> 20
    );
    for (t, mine) in filled.iter().enumerate() {
        for (i, v) in mine.iter().enumerate() {
            let page = [(t as u8).wrapping_mul(31).wrapping_add(i as u8); 4096];
            assert!(v[..] == page[..], "thread {t} block {i}");
        }
    }
    drop(filled);
    flush_thread();
    assert_eq!(gov.usage(Q), base_usage);
    assert_eq!(gov.budget(Q).overflow_bytes(), 0);
}

/// Without the background thread (so the limit stays put): the engine fills its budget to
/// within a batch before rerouting starts, every block after that goes to overflow (no
/// flapping), and `flush_thread` does not end the rerouting.
#[test]
fn rerouting_starts_at_the_limit_and_does_not_flap() {
    let (gov, _dir) = install_without_background();
    let limit = gov.limit(Q);
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(16384);
    let mut first_overflow = None;
    for i in 0..16384 {
        {
            let _g = EngineGuard::enter(Q);
            blocks.push(vec![1u8; 4096]);
        }
        let over = nodedb_mem::is_overflow(blocks[i].as_ptr());
        assert_within_limit(gov, 1, &format!("block {i}"));
        match first_overflow {
            None if over => {
                first_overflow = Some(i);
                let usage = gov.usage(Q);
                assert!(
                    usage + 2 * nodedb_mem::inflight_bound().batch >= limit,
                    "rerouting began at {usage} B of a {limit} B limit"
                );
            }
            Some(f) => assert!(
                over,
                "block {i} back in the arena after rerouting began at {f}"
            ),
            None => {}
        }
        if i % 1024 == 0 {
            flush_thread(); // publishing the batch does not end the rerouting
        }
    }
    assert!(first_overflow.is_some());
    flush_thread();
    let one_more = {
        let _g = EngineGuard::enter(Q);
        vec![2u8; 4096]
    };
    assert!(nodedb_mem::is_overflow(one_more.as_ptr()));
    drop((blocks, one_more));
}

#[test]
fn protected_data_lowers_the_point_where_the_heap_reroutes() {
    use std::io::Write;
    let (gov, dir) = install_without_background();
    let limit = gov.limit(Q);
    let path = dir.path().join("hot.bin");
    let mut file = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    file.write_all(&vec![7u8; 4 * MIB]).unwrap();
    let mapped = nodedb_mem::MappedFile::open(&file).unwrap();
    let protected = match gov.protect(Q, mapped.bytes()) {
        Ok(p) => p,
        // A system that lets this user lock nothing refuses with the reason; nothing to test.
        Err(e @ nodedb_mem::MemError::Io { .. }) => {
            eprintln!("skipped: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    assert_eq!(gov.budget(Q).reserved(), 4 * MIB as u64);
    // The heap has the limit less the 4 MiB locked beside it: it reroutes there, and the
    // engine's usage (heap and protected data) stays within the limit.
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(8192);
    let mut rerouted_at = None;
    for i in 0..8192 {
        {
            let _g = EngineGuard::enter(Q);
            blocks.push(vec![1u8; 4096]);
        }
        assert_within_limit(gov, 1, &format!("block {i}"));
        if rerouted_at.is_none() && nodedb_mem::is_overflow(blocks[i].as_ptr()) {
            rerouted_at = Some(gov.usage(Q));
        }
    }
    let at = rerouted_at.expect("the heap rerouted to overflow");
    assert!(
        at + 2 * nodedb_mem::inflight_bound().batch >= limit
            && at <= limit + nodedb_mem::inflight_bound().batch,
        "rerouting began at {at} B of usage (heap and 4 MiB protected), limit {limit} B"
    );
    // Unprotected, the heap has the whole limit again: after the blocks in overflow are freed,
    // new ones go to the engine's arena.
    drop(protected);
    drop(blocks);
    flush_thread();
    let back = {
        let _g = EngineGuard::enter(Q);
        vec![3u8; 4096]
    };
    assert!(!nodedb_mem::is_overflow(back.as_ptr()));
    drop(back);
}
