//! The hot path, governed against plain tikv-jemallocator, in alternated processes.
//!
//! Each measurement runs in a fresh child process (this binary, `--child WORKLOAD MODE`), and
//! the two modes alternate round after round, so a drift of the machine hits both alike. The
//! global allocator is the same in both children: a switch read once per call (a static that
//! is written before the first allocation and never again) that forwards either to
//! [`GovernedAlloc`] or to plain [`Jemalloc`]. Every measured thread stays in one engine
//! (`Query`) for the governed mode; the plain mode enters the same guard, which does nothing
//! there, so both pay the same wrapper. The governed child runs what users run: a governor
//! installed with the defaults (`MemoryGovernor::builder().install()`), its background thread
//! included; with `--no-background` it is installed with `background(None)` instead.
//!
//! Workloads:
//! * `churn`: one thread, 64 live blocks of 16–256 B, allocate all then free all (ns per
//!   allocate+free pair);
//! * `larson-1`, `larson-2`, `mstress-1`, `mstress-2`: the malloc-bench-rs crate's larson
//!   (working set with cross-thread handoff) and mstress (alloc-then-free batches, some freed
//!   on another thread) at one and two threads (ns per op, from its ops per second);
//! * `hashmap`: a `HashMap<String, Vec<u8>>` of 4,096 keys, replacing values of 8–512 B and
//!   removing and re-inserting keys (ns per operation);
//! * `hop` (governed only): enter another engine's guard, allocate and free a 64-byte block,
//!   leave (ns per hop).
//!
//! Single-thread workloads run pinned to the last CPU (both modes alike; `HOTPATH_NO_PIN=1`
//! leaves them to the scheduler too); the two-thread ones are left to the scheduler.
//!
//! Reported: the medians of each mode, their ratio, and the median of the per-round ratios
//! ("paired": the two runs of a round are adjacent in time).
//!
//! With `--floor`, each round also runs a third mode, `plain-hook`: plain jemalloc with a
//! thread-event hook that does nothing registered at the governed allocator's interval
//! (the in-flight bound's interval). It measures what jemalloc's own event machinery costs at that interval,
//! before any work of ours: the part of the governed figure no change on our side of the hook
//! can remove.
//!
//! With `--instructions`, each child runs under valgrind's cachegrind (`valgrind` on the
//! `PATH`) instead of the clock: once at a given amount of work and once at twice that, and the
//! difference of the two instruction counts, divided by the extra work, is reported per
//! operation (start-up cancels; the background thread's ticks during the extra time stay in).
//! Instruction counts do not swing with the machine as this VM's wall clock does (±30 %
//! within an hour). Both governed variants are measured there, beside plain jemalloc.
//!
//! Run: `cargo bench -p nodedb-mem-benches --bench hotpath` (five rounds), or with
//! `-- --rounds N` / `-- --only churn,hashmap` / `-- --floor` / `-- --no-background` /
//! `-- --against-no-background` (the installed governor with its thread against the same
//! without it) / `-- --instructions` / `-- --inflight 1MiB` (the children's in-flight bound,
//! through `NODEDB_MEM_INFLIGHT_BOUND`) / `-- --sample-interval 524288` (heap-profile sampling
//! on in the governed children).

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::collections::HashMap;
use std::hint::black_box;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use malloc_bench_rs::{Config, Workload};
use nodedb_mem::{EngineGuard, EngineId, GovernedAlloc, MemoryGovernor};
use tikv_jemallocator::Jemalloc;

/// The process's allocator: governed unless the child was started in plain mode.
struct Switch;

static PLAIN: AtomicBool = AtomicBool::new(false);
static GOVERNED: GovernedAlloc = GovernedAlloc::new();

// SAFETY: forwards every call, with its arguments, to one of two allocators chosen before the
// first allocation of the process and never changed after, so a block is always freed by the
// allocator that made it.
unsafe impl GlobalAlloc for Switch {
    #[inline]
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if PLAIN.load(Ordering::Relaxed) {
            // SAFETY: forwarded from the caller.
            unsafe { Jemalloc.alloc(l) }
        } else {
            // SAFETY: forwarded from the caller.
            unsafe { GOVERNED.alloc(l) }
        }
    }
    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if PLAIN.load(Ordering::Relaxed) {
            // SAFETY: forwarded from the caller.
            unsafe { Jemalloc.dealloc(p, l) }
        } else {
            // SAFETY: forwarded from the caller.
            unsafe { GOVERNED.dealloc(p, l) }
        }
    }
    #[inline]
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        if PLAIN.load(Ordering::Relaxed) {
            // SAFETY: forwarded from the caller.
            unsafe { Jemalloc.alloc_zeroed(l) }
        } else {
            // SAFETY: forwarded from the caller.
            unsafe { GOVERNED.alloc_zeroed(l) }
        }
    }
    #[inline]
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if PLAIN.load(Ordering::Relaxed) {
            // SAFETY: forwarded from the caller.
            unsafe { Jemalloc.realloc(p, l, n) }
        } else {
            // SAFETY: forwarded from the caller.
            unsafe { GOVERNED.realloc(p, l, n) }
        }
    }
}

#[global_allocator]
static GLOBAL: Switch = Switch;

/// Picks the mode before the first allocation of the process (the runtime allocates before
/// `main`): glibc passes `argc`/`argv` to the functions of `.init_array`. A plain child so never
/// touches the governed allocator, whose thread-event hook would otherwise fire in it too.
extern "C" fn pick_mode(argc: i32, argv: *const *const std::ffi::c_char, _env: *const u8) {
    for i in 0..usize::try_from(argc).unwrap_or(0) {
        // SAFETY: glibc passes `argc` valid, NUL-terminated argument strings.
        let arg = unsafe { std::ffi::CStr::from_ptr(*argv.add(i)) };
        if matches!(arg.to_bytes(), b"plain" | b"plain-hook") {
            PLAIN.store(true, Ordering::Relaxed);
        }
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static PICK_MODE: extern "C" fn(i32, *const *const std::ffi::c_char, *const u8) = pick_mode;

thread_local! {
    static IN_ENGINE: Cell<bool> = const { Cell::new(false) };
}

/// Puts the calling thread in `Query` for the rest of its life (once).
#[inline(always)]
fn stay_in_engine() {
    if !IN_ENGINE.get() {
        IN_ENGINE.set(true);
        std::mem::forget(EngineGuard::enter(EngineId::Query));
    }
}

/// What malloc-bench-rs allocates through: the global allocator, from inside the engine.
struct InEngine;

// SAFETY: forwards to the global allocator with the caller's arguments.
unsafe impl GlobalAlloc for InEngine {
    #[inline]
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        stay_in_engine();
        // SAFETY: forwarded from the caller.
        unsafe { GLOBAL.alloc(l) }
    }
    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        stay_in_engine();
        // SAFETY: forwarded from the caller.
        unsafe { GLOBAL.dealloc(p, l) }
    }
}

const WORKLOADS: [&str; 7] = [
    "churn",
    "larson-1",
    "larson-2",
    "mstress-1",
    "mstress-2",
    "hashmap",
    "hop",
];

#[inline(never)]
fn churn_rounds(layouts: &[Layout], ptrs: &mut [*mut u8], rounds: usize) {
    for _ in 0..rounds {
        for (p, &l) in ptrs.iter_mut().zip(layouts) {
            // SAFETY: non-zero sizes; freed below with the same layout.
            *p = unsafe { GLOBAL.alloc(l) };
        }
        for (&p, &l) in ptrs.iter().zip(layouts) {
            // SAFETY: allocated above with this layout.
            unsafe { GLOBAL.dealloc(black_box(p), l) };
        }
    }
}

/// How much work a child does: the timed default, or a fixed amount for instruction counts.
#[derive(Clone, Copy)]
enum Work {
    /// Wall clock: the full amount (best of seven for churn).
    Timed,
    /// Instruction counts: this many tenths of the full amount, once.
    Tenths(usize),
}

impl Work {
    fn of(self, full: usize) -> usize {
        match self {
            Work::Timed => full,
            Work::Tenths(t) => full / 10 * t,
        }
    }
}

/// ns per allocate+free pair, and the pairs made: timed, the best of seven in-process
/// repetitions (the process is the unit of alternation; within it, take the run least
/// disturbed).
fn churn(work: Work) -> (f64, usize) {
    let rounds = work.of(40_000);
    let layouts: Vec<Layout> = (0..64)
        .map(|i| Layout::from_size_align(16 + (i * 37) % 240, 8).expect("valid layout"))
        .collect();
    let mut ptrs = vec![std::ptr::null_mut(); layouts.len()];
    let pairs = rounds * layouts.len();
    if let Work::Tenths(_) = work {
        let start = Instant::now();
        churn_rounds(&layouts, &mut ptrs, rounds);
        return (start.elapsed().as_nanos() as f64 / pairs as f64, pairs);
    }
    churn_rounds(&layouts, &mut ptrs, rounds / 10);
    let best = (0..7)
        .map(|_| {
            let start = Instant::now();
            churn_rounds(&layouts, &mut ptrs, rounds);
            start.elapsed().as_nanos() as f64 / pairs as f64
        })
        .fold(f64::INFINITY, f64::min);
    (best, pairs * 7)
}

fn bench(workload: Workload, threads: usize, work: Work) -> (f64, usize) {
    let cfg = Config {
        threads,
        steps_per_thread: work.of(2_000_000),
        working_set: 512,
        mstress_blocks: 256,
    };
    let ops = malloc_bench_rs::run(workload, &cfg, || InEngine);
    // ops/s over all threads, to ns per op per thread.
    (1e9 * threads as f64 / ops, threads * cfg.steps_per_thread)
}

fn hashmap(work: Work) -> (f64, usize) {
    const KEYS: usize = 4096;
    let ops = work.of(4_000_000);
    let mut map: HashMap<String, Vec<u8>> = HashMap::with_capacity(KEYS);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for k in 0..KEYS {
        map.insert(format!("key-{k:08}"), vec![0u8; 64]);
    }
    let start = Instant::now();
    for _ in 0..ops {
        let r = next();
        let k = (r as usize) % KEYS;
        let key = format!("key-{k:08}");
        if r & 0x300 == 0 {
            map.remove(&key);
            map.insert(key, Vec::new());
        } else {
            let len = 8 + (r >> 20) as usize % 505;
            map.insert(key, vec![(r & 0xff) as u8; len]);
        }
    }
    black_box(&map);
    (start.elapsed().as_nanos() as f64 / ops as f64, ops)
}

fn hop(work: Work) -> (f64, usize) {
    let hops = work.of(2_000_000);
    let start = Instant::now();
    for i in 0..hops {
        let _g = EngineGuard::enter(EngineId::Vector);
        black_box(Box::new([i as u8; 64]));
    }
    (start.elapsed().as_nanos() as f64 / hops as f64, hops)
}

unsafe extern "C" fn ignore_event(_is_alloc: bool, _allocated: u64, _deallocated: u64) {}

/// Registers a thread-event hook that does nothing, at the governed allocator's interval.
fn register_ignoring_hook() {
    let interval = nodedb_mem_alloc::ctl::ledger::inflight_bound().interval;
    // SAFETY: the callback does nothing, so it neither allocates, locks nor unwinds.
    let rc = unsafe {
        nodedb_mem_alloc::ctl::thread::register_thread_event_hook(ignore_event, interval)
    };
    assert_eq!(rc, Ok(()), "registering the thread-event hook");
}

fn child(workload: &str, mode: &str, work: Work) {
    assert_eq!(
        PLAIN.load(Ordering::Relaxed),
        mode.starts_with("plain"),
        "mode picked before main"
    );
    if mode == "plain-hook" {
        register_ignoring_hook();
    }
    if mode == "outside" {
        IN_ENGINE.set(true); // governed, but outside every engine (home `Unattributed`)
    }
    if mode.starts_with("governed") {
        // What users run: a governor installed with the defaults.
        let mut b = MemoryGovernor::builder();
        if mode == "governed-nobg" {
            b = b.background(None);
        }
        let gov = b.install().expect("install the governor");
        if let Some(i) = std::env::var(SAMPLING_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
        {
            gov.set_heap_profiling(i);
        }
        // The thread's first ticks (100 and 300 ms after start) read jemalloc's statistics and
        // judge the process; let them pass before measuring, so each run (and each of the two
        // instruction-count runs) sees only the ticks of a running process. A sleep, not a
        // poll: a snapshot refreshes jemalloc's statistics, which would count.
        if mode == "governed" {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
    stay_in_engine();
    if !workload.ends_with("-2") && std::env::var_os("HOTPATH_NO_PIN").is_none() {
        // One thread: pin it (and malloc-bench-rs's worker, which inherits the affinity) to the
        // last CPU, in both modes. Unpinned, single-thread runs here scatter between two
        // modes about 1.8x apart as the scheduler moves them; pinned they repeat within 5 %.
        let last = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
        nodedb_mem::pin_thread_arena(last).expect("pin to the last CPU");
    }
    // Make Query the main thread's home before measuring.
    for _ in 0..1024 {
        drop(black_box(Box::new(0u64)));
    }
    let (ns, ops) = match workload {
        "churn" => churn(work),
        "larson-1" => bench(Workload::Larson, 1, work),
        "larson-2" => bench(Workload::Larson, 2, work),
        "mstress-1" => bench(Workload::Mstress, 1, work),
        "mstress-2" => bench(Workload::Mstress, 2, work),
        "hashmap" => hashmap(work),
        "hop" => hop(work),
        other => {
            eprintln!("unknown workload {other}: expected one of {WORKLOADS:?}");
            std::process::exit(2);
        }
    };
    println!("{ns} {ops}");
}

/// The heap-profile sampling interval of the governed children (`--sample-interval BYTES`),
/// passed in this variable; off without it.
static SAMPLING: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
const SAMPLING_ENV: &str = "HOTPATH_SAMPLE_INTERVAL";

/// The in-flight bound the children run under (`--inflight SIZE`, passed as
/// `NODEDB_MEM_INFLIGHT_BOUND`), if not the default.
static INFLIGHT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// `cmd` with the chosen in-flight bound in its environment.
fn with_bound(mut cmd: Command) -> Command {
    if let Some(b) = INFLIGHT.get() {
        cmd.env(nodedb_mem::INFLIGHT_BOUND_ENV, b);
    }
    if let Some(i) = SAMPLING.get() {
        cmd.env(SAMPLING_ENV, i.to_string());
    }
    cmd
}

fn run_child(workload: &str, mode: &str) -> f64 {
    let exe = std::env::current_exe().expect("own executable");
    let mut cmd = with_bound(Command::new(exe));
    let out = cmd
        .args(["--child", workload, mode])
        .output()
        .expect("start child");
    assert!(
        out.status.success(),
        "{workload} {mode}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let ns = text.split_whitespace().next().unwrap_or("");
    ns.parse().expect("child prints ns")
}

/// Instructions of one child run under cachegrind at `tenths` of the full work, and the
/// operations it made.
fn instructions(workload: &str, mode: &str, tenths: usize) -> (f64, f64) {
    let exe = std::env::current_exe().expect("own executable");
    let mut cmd = with_bound(Command::new("valgrind"));
    let out = cmd
        .args([
            "--tool=cachegrind",
            "--cache-sim=no",
            "--cachegrind-out-file=/dev/null",
        ])
        .arg(exe)
        .args(["--child", workload, mode, "--tenths", &tenths.to_string()])
        .output()
        .expect("start valgrind (is it installed?)");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{workload} {mode}: {stderr}");
    let refs = stderr
        .lines()
        .find_map(|l| {
            l.split_once("I   refs:")
                .or_else(|| l.split_once("I refs:"))
        })
        .map(|(_, n)| n.trim().replace(',', ""))
        .and_then(|n| n.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no instruction count in cachegrind's output: {stderr}"));
    let ops = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse::<f64>().ok())
        .expect("child prints its operations");
    (refs, ops)
}

/// Instructions per operation of `mode` on `workload`: two runs, at one and two tenths of the
/// full work, differenced.
fn instructions_per_op(workload: &str, mode: &str) -> f64 {
    let (i1, o1) = instructions(workload, mode, 1);
    let (i2, o2) = instructions(workload, mode, 2);
    (i2 - i1) / (o2 - o1)
}

fn instruction_table(only: &[&str]) {
    println!(
        "hot path by instruction count (cachegrind; runs at 1/10 and 2/10 of the timed work, differenced)"
    );
    println!(
        "{:<10} {:>12} {:>12} {:>12} {:>8} {:>8}",
        "workload", "plain", "governed", "no thread", "ratio", "no thr."
    );
    for &w in only {
        if w == "hop" {
            let g = instructions_per_op(w, "governed");
            println!(
                "{w:<10} {:>12} {g:>12.1} {:>12} {:>8} {:>8}",
                "-", "-", "-", "-"
            );
            continue;
        }
        let p = instructions_per_op(w, "plain");
        let g = instructions_per_op(w, "governed");
        let n = instructions_per_op(w, "governed-nobg");
        println!(
            "{w:<10} {p:>12.1} {g:>12.1} {n:>12.1} {:>8.3} {:>8.3}",
            g / p,
            n / p
        );
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return; // `cargo test --benches` asks benches to list their tests
    }
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let work = match args.iter().position(|a| a == "--tenths") {
            Some(t) => Work::Tenths(args[t + 1].parse().expect("--tenths N")),
            None => Work::Timed,
        };
        child(&args[i + 1], &args[i + 2], work);
        return;
    }
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    let rounds: usize = value("--rounds").map_or(5, |r| r.parse().expect("--rounds N"));
    let only: Vec<&str> = value("--only").map_or(WORKLOADS.to_vec(), |s| s.split(',').collect());
    let floor = args.iter().any(|a| a == "--floor");
    if let Some(b) = value("--inflight") {
        nodedb_mem_alloc::ctl::ledger::parse_bound(b.as_bytes())
            .expect("--inflight: a power of two, 64KiB to 4MiB");
        INFLIGHT.set(b.clone()).expect("set once");
        println!("in-flight bound of the children: {b}");
    }
    if let Some(i) = value("--sample-interval") {
        let i: u64 = i.parse().expect("--sample-interval BYTES");
        SAMPLING.set(i).expect("set once");
        println!("heap-profile sampling in the governed children: every {i} bytes on average");
    }
    if args.iter().any(|a| a == "--instructions") {
        instruction_table(&only);
        return;
    }
    let governed = if args.iter().any(|a| a == "--no-background") {
        "governed-nobg"
    } else {
        "governed"
    };
    // What the governed runs are compared with: plain jemalloc, or (`--against-no-background`)
    // the governor without its background thread, to see what the thread costs.
    let base = if args.iter().any(|a| a == "--against-no-background") {
        "governed-nobg"
    } else {
        "plain"
    };
    println!(
        "hot path: {governed} (installed{}) vs {base}, {rounds} alternated process runs each, medians",
        if governed == "governed" {
            ", defaults"
        } else {
            ", no background thread"
        }
    );
    println!(
        "{:<10} {:>12} {:>12} {:>8} {:>8}   runs (governed / base)",
        "workload", "governed ns", "base ns", "ratio", "paired"
    );
    let mut floors = Vec::new();
    for w in only {
        let (mut g, mut p, mut h) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            if w == "hop" {
                g.push(run_child(w, governed));
                continue;
            }
            if r % 2 == 0 {
                g.push(run_child(w, governed));
                p.push(run_child(w, base));
            } else {
                p.push(run_child(w, base));
                g.push(run_child(w, governed));
            }
            if floor {
                h.push(run_child(w, "plain-hook"));
            }
        }
        let runs = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (gs, ps) = (runs(&g), runs(&p));
        // The two runs of a round are adjacent in time: their ratio cancels the machine's
        // slower phases better than the ratio of the two medians does.
        let mut paired: Vec<f64> = g.iter().zip(&p).map(|(g, p)| g / p).collect();
        let gm = median(&mut g);
        if p.is_empty() {
            println!(
                "{w:<10} {gm:>12.2} {:>12} {:>8} {:>8}   {gs}",
                "-", "-", "-"
            );
        } else {
            let pm = median(&mut p);
            println!(
                "{w:<10} {gm:>12.2} {pm:>12.2} {:>8.3} {:>8.3}   {gs} / {ps}",
                gm / pm,
                median(&mut paired)
            );
            if !h.is_empty() {
                floors.push((w, median(&mut h), pm, gm));
            }
        }
    }
    if !floors.is_empty() {
        println!(
            "\njemalloc's event machinery alone: plain with an ignoring hook every {} bytes",
            nodedb_mem_alloc::ctl::ledger::inflight_bound().interval
        );
        println!(
            "{:<10} {:>14} {:>8} {:>18}",
            "workload", "plain-hook ns", "ratio", "share of the gap"
        );
        for (w, hm, pm, gm) in floors {
            println!(
                "{w:<10} {hm:>14.2} {:>8.3} {:>17.0}%",
                hm / pm,
                100.0 * (hm - pm) / (gm - pm)
            );
        }
    }
}
