//! The governor against the kernel's memory controller (cgroup v2), run inside an emulated
//! machine by `scripts/cgroup-vm.sh` (it needs root, a cgroup v2 hierarchy with the memory
//! controller, and no swap). Run without arguments, it is the orchestrator: for each case it
//! makes a cgroup, starts itself in it as the worker, moves the cgroup's limits as an
//! orchestrator (a kubelet resizing a pod) would, and prints one `RESULT` line per case with
//! the kernel's own counters (`memory.events`, `memory.peak`, the stall time).
//!
//! Cases (sizes for a 1 GiB machine; `DIR` holds the overflow files and the scanned file):
//! 1. `over-limit`: 1 GiB of Query data in a cgroup of `memory.max` 512 MiB, governed and not.
//! 2. 150 MiB of Query data and a 250 MiB Vector cache with a reclaimer, the limit lowered to
//!    60 % and Query growing by 128 MiB after: `memory.high` first (`high-then-max`), the
//!    process told and `memory.max` lowered once usage is under it (`max-only`, as a kubelet
//!    does), or `memory.max` lowered with no warning (`max-untold`); then the limits raised
//!    back, and the engines borrowing again.
//! 3. `scan`: a 1 GiB file read through the page cache while Query works at 80 % of its limit.
//! 4. `main-job`: the README's main job (`nodedb-mem-validation`, found at `DIR/bin`) at a
//!    reduced scale with more live data than the limit, governed (`main-job`) and on plain
//!    jemalloc (`main-job-ungoverned`); skipped when the binary is not there.
//!
//! Usage: `cgroup_limits DIR [CASE...]`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nodedb_mem::{
    EngineGuard, EngineId, GovernedAlloc, MemoryGovernor, OverflowConfig, SpillAction, SpillConfig,
};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const MIB: u64 = 1 << 20;
const ROOT: &str = "/sys/fs/cgroup";
const WORKER: &str = "NODEDB_CGROUP_WORKER";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first().map(PathBuf::from) else {
        eprintln!("usage: cgroup_limits DIR [CASE...]");
        std::process::exit(2);
    };
    if let Ok(case) = std::env::var(WORKER) {
        worker(&case, &dir);
        return;
    }
    let all = [
        "over-limit",
        "over-limit-ungoverned",
        "high-then-max",
        "max-only",
        "max-untold",
        "scan",
        "main-job",
        "main-job-ungoverned",
    ];
    let cases: Vec<&str> = if args.len() > 1 {
        args[1..].iter().map(String::as_str).collect()
    } else {
        all.to_vec()
    };
    write(Path::new(ROOT).join("cgroup.subtree_control"), "+memory");
    for case in cases {
        orchestrate(case, &dir);
    }
}

fn write(path: impl AsRef<Path>, value: &str) -> bool {
    let path = path.as_ref();
    match std::fs::write(path, value) {
        Ok(()) => true,
        Err(e) => {
            println!("=== writing {value:?} to {}: {e}", path.display());
            false
        }
    }
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The stall total (µs) of `kind` (`some`/`full`) in a `memory.pressure` text.
fn stall_us(text: &str, kind: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(kind))
        .and_then(|l| l.split_whitespace().find_map(|f| f.strip_prefix("total=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn orchestrate(case: &str, dir: &Path) {
    let cg = Path::new(ROOT).join(case);
    let _ = std::fs::remove_dir(&cg);
    std::fs::create_dir(&cg).expect("making the case's cgroup");
    write(cg.join("memory.swap.max"), "0");
    write(cg.join("memory.max"), &(512 * MIB).to_string());
    if case == "scan" {
        make_scan_file(dir);
    }
    let procs = std::ffi::CString::new(cg.join("cgroup.procs").to_str().unwrap()).unwrap();
    let mut cmd = if let Some(plain) = case.strip_prefix("main-job") {
        let bin = dir.join("bin/nodedb-mem-validation");
        if !bin.exists() {
            println!("=== {case}: skipped, no {}", bin.display());
            let _ = std::fs::remove_dir(&cg);
            return;
        }
        // The short run with the ceiling a margin under the cgroup's limit, and 600 MiB of
        // documents: more live data than the 512 MiB limit.
        let mut cmd = Command::new(bin);
        cmd.args([
            "--short",
            "--ceiling",
            "460MiB",
            "--documents",
            "600MiB",
            "--out",
        ])
        .arg(dir.join(format!("out-{case}")));
        if plain == "-ungoverned" {
            cmd.arg("--no-governor");
        }
        cmd
    } else {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.arg(dir).env(WORKER, case);
        cmd
    };
    cmd.stdout(Stdio::piped()).stdin(Stdio::piped());
    // SAFETY: between fork and exec the closure only calls open, write and close (all
    // async-signal-safe) on a path prepared before the fork; it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("starting the worker");
    let mut stdin = child.stdin.take();
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut notes = Vec::new();
    for line in out.lines().map_while(Result::ok) {
        println!("  {case}: {line}");
        match line.as_str() {
            "LOWER" => {
                let target = 512 * MIB * 6 / 10;
                let t = Instant::now();
                match case {
                    "high-then-max" => {
                        write(cg.join("memory.high"), &target.to_string());
                        std::thread::sleep(Duration::from_secs(1));
                    }
                    "max-only" => {
                        // Tell the process, then wait (as the kubelet does) until usage is
                        // under the new limit before lowering it.
                        if let Some(s) = stdin.as_mut() {
                            let _ = writeln!(s, "{target}");
                        }
                        continue;
                    }
                    _ => {}
                }
                let ok = write(cg.join("memory.max"), &target.to_string());
                notes.push(format!(
                    "memory.max lowered to 307 MiB: {} {} ms after the first signal",
                    if ok { "ok" } else { "refused" },
                    t.elapsed().as_millis()
                ));
            }
            "TOLD" => {
                let target = 512 * MIB * 6 / 10;
                let t = Instant::now();
                let current = || {
                    read(cg.join("memory.current"))
                        .trim()
                        .parse::<u64>()
                        .unwrap_or(u64::MAX)
                };
                while current() > target && t.elapsed() < Duration::from_secs(30) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let ok = write(cg.join("memory.max"), &target.to_string());
                notes.push(format!(
                    "memory.max lowered to 307 MiB once usage was under it ({} ms): {}",
                    t.elapsed().as_millis(),
                    if ok { "ok" } else { "refused" }
                ));
            }
            "RAISE" => {
                write(cg.join("memory.high"), "max");
                write(cg.join("memory.max"), &(512 * MIB).to_string());
            }
            _ => {}
        }
    }
    let status = child.wait().expect("waiting for the worker");
    let events = read(cg.join("memory.events"));
    let pressure = read(cg.join("memory.pressure"));
    println!(
        "RESULT {case}: {status} after {:.1} s; memory.events max {} high {} oom {} oom_kill {}; \
         memory.peak {} MiB; stalled some {} ms full {} ms; {}",
        started.elapsed().as_secs_f64(),
        keyed(&events, "max"),
        keyed(&events, "high"),
        keyed(&events, "oom"),
        keyed(&events, "oom_kill"),
        read(cg.join("memory.peak"))
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
            / MIB,
        stall_us(&pressure, "some") / 1000,
        stall_us(&pressure, "full") / 1000,
        notes.join("; ")
    );
    let _ = std::fs::remove_dir(&cg);
}

fn make_scan_file(dir: &Path) {
    let path = dir.join("scan");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![7u8; MIB as usize];
    for _ in 0..1024 {
        f.write_all(&block).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    write("/proc/sys/vm/drop_caches", "1");
}

/// Keeps `n` MiB more of Query data in `kept`, each block filled with its number.
fn fill(kept: &mut Vec<Vec<u8>>, n: usize) {
    for _ in 0..n {
        let i = kept.len();
        kept.push(vec![i as u8; MIB as usize]);
    }
}

fn check(kept: &[Vec<u8>]) {
    for (i, v) in kept.iter().enumerate() {
        assert!(v.iter().all(|&b| b == i as u8), "block {i} lost its bytes");
    }
}

/// The process's resident memory (`/proc/self/statm`), in MiB.
fn resident_mib() -> u64 {
    read("/proc/self/statm")
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
        / MIB
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn worker(case: &str, dir: &Path) {
    if case == "over-limit-ungoverned" {
        // No governor: the allocator only attributes.
        let mut kept = Vec::new();
        fill(&mut kept, 1024);
        check(&kept);
        say("kept 1 GiB without a governor");
        return;
    }
    let overflow = dir.join(format!("overflow-{case}"));
    std::fs::create_dir_all(&overflow).unwrap();
    let gov = MemoryGovernor::builder()
        .overflow(OverflowConfig::in_dir(&overflow))
        .install()
        .expect("install");
    say(&format!(
        "ceiling {} MiB ({}); Query limit {} MiB",
        gov.ceiling() / MIB,
        gov.ceiling_source(),
        gov.limit(EngineId::Query) / MIB
    ));
    match case {
        "over-limit" => {
            let g = EngineGuard::enter(EngineId::Query);
            let mut kept = Vec::new();
            fill(&mut kept, 1024);
            check(&kept);
            drop(g);
            say(&format!(
                "kept 1 GiB; Query overflow {} MiB",
                gov.budget(EngineId::Query).overflow_bytes() / MIB
            ));
        }
        "high-then-max" | "max-only" | "max-untold" => lowered(gov, case),
        "scan" => scan(gov, dir),
        other => panic!("unknown case {other}"),
    }
}

/// A cache of 1 MiB blocks the governor can ask to shrink (the Vector engine's documents).
struct Cache(std::sync::Mutex<Vec<Vec<u8>>>);

impl nodedb_mem::Reclaimer for Cache {
    fn reclaimable(&self) -> u64 {
        self.0.lock().unwrap().len() as u64 * MIB
    }
    fn reclaim(&self, bytes: u64) -> u64 {
        let mut blocks = self.0.lock().unwrap();
        let n = (bytes.div_ceil(MIB) as usize).min(blocks.len());
        let keep = blocks.len() - n;
        blocks.truncate(keep);
        n as u64 * MIB
    }
}

/// The cgroup's figures now, in MiB: current, anon, file, dirty.
fn composition(case: &str) -> String {
    let cg = Path::new(ROOT).join(case);
    let st = read(cg.join("memory.stat"));
    format!(
        "current {} MiB (anon {}, file {}, dirty {}), resident {} MiB",
        read(cg.join("memory.current"))
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
            / MIB,
        keyed(&st, "anon") / MIB,
        keyed(&st, "file") / MIB,
        keyed(&st, "file_dirty") / MIB,
        resident_mib()
    )
}

/// The case: 150 MiB of Query data and a 250 MiB Vector cache with a reclaimer, the
/// limit lowered to 60 % (307 MiB), then Query grows by 128 MiB inside its old budget.
/// `high-then-max`: `memory.high` first, `memory.max` a second later (a careful orchestrator).
/// `max-only`: the orchestrator tells the process the new limit (as `set_ceiling` lets a host
/// do), and lowers `memory.max` once usage is under it (as the kubelet skips a decrease while
/// usage is above it). `max-untold`: `memory.max` lowered with no warning.
fn lowered(gov: &MemoryGovernor, case: &str) {
    let cache = std::sync::Arc::new(Cache(std::sync::Mutex::new(Vec::new())));
    let _handle = gov.register_reclaimer(EngineId::Vector, cache.clone());
    {
        let _g = EngineGuard::enter(EngineId::Vector);
        let mut blocks = cache.0.lock().unwrap();
        for i in 0..250 {
            blocks.push(vec![i as u8; MIB as usize]);
        }
    }
    let g = EngineGuard::enter(EngineId::Query);
    let mut kept = Vec::new();
    fill(&mut kept, 150);
    let first = gov.ceiling();
    say(&format!("before: {}", composition(case)));
    say("LOWER");
    if case == "max-only" {
        // Told by the orchestrator (here, on standard input).
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).unwrap();
        let limit: u64 = line.trim().parse().unwrap();
        let change = gov.set_ceiling(limit - limit / 10).unwrap();
        say(&format!(
            "told {} MiB: ceiling {} MiB, {} MiB over it after the engines gave back",
            limit / MIB,
            change.to / MIB,
            change.over / MIB
        ));
        say("TOLD");
    }
    let asked = Instant::now();
    while gov.ceiling() >= first && asked.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    say(&format!(
        "ceiling {} MiB after {} ms; Vector cache {} MiB; {}",
        gov.ceiling() / MIB,
        asked.elapsed().as_millis(),
        nodedb_mem::Reclaimer::reclaimable(&*cache) / MIB,
        composition(case)
    ));
    fill(&mut kept, 128);
    say(&format!(
        "grew: Query {} MiB of limit {} MiB, overflow {} MiB; {}",
        gov.usage(EngineId::Query) / MIB,
        gov.limit(EngineId::Query) / MIB,
        gov.budget(EngineId::Query).overflow_bytes() / MIB,
        composition(case)
    ));
    say("RAISE");
    let raised = Instant::now();
    while gov.ceiling() < first && raised.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    if case == "max-only" {
        gov.set_ceiling(first).unwrap();
    }
    // Busy again: rebalancing lends Query more than its budget.
    fill(&mut kept, 64);
    std::thread::sleep(Duration::from_millis(500));
    say(&format!(
        "raised: ceiling {} MiB after {} ms; Query limit {} MiB (budget {} MiB)",
        gov.ceiling() / MIB,
        raised.elapsed().as_millis(),
        gov.limit(EngineId::Query) / MIB,
        gov.budget(EngineId::Query).base() / MIB
    ));
    check(&kept);
    drop(g);
}

fn scan(gov: &MemoryGovernor, dir: &Path) {
    let spill = gov
        .spill_controller(EngineId::Query, SpillConfig::default())
        .unwrap();
    let blocks = (gov.limit(EngineId::Query) * 8 / 10 / MIB) as usize;
    let rejections = |g: &MemoryGovernor| {
        let s = g.snapshot();
        (
            s.engine(EngineId::Query).rejections,
            s.global_rejections,
            nodedb_mem::push_out_stats(EngineId::Query).calls,
        )
    };
    let before = rejections(gov);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut spills = 0u64;
    let read = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            use std::io::Read;
            let mut f = std::fs::File::open(dir.join("scan")).unwrap();
            let mut buf = vec![0u8; MIB as usize];
            let mut total = 0u64;
            loop {
                let n = f.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            total
        });
        let _g = EngineGuard::enter(EngineId::Query);
        let mut kept: Vec<Vec<u8>> = (0..blocks).map(|i| vec![i as u8; MIB as usize]).collect();
        let mut i = 0usize;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            kept[i % blocks] = vec![i as u8; MIB as usize];
            if spill.poll() != SpillAction::None {
                spills += 1;
            }
            i += 1;
        }
        reader.join().unwrap()
    });
    let after = rejections(gov);
    say(&format!(
        "read {} MiB beside Query at 80 % of its limit; spills {spills}; refusals and push-outs \
         before {before:?}, after {after:?}",
        read / MIB
    ));
}
