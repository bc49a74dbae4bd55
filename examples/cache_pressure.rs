//! Does one engine's hot, file-backed index stay in memory while another engine flushes more
//! than the machine's memory to disk? Meant for a small machine (`scripts/page-cache-vm.sh` runs
//! it in a 1 GiB guest); on a large one nothing is under pressure and every mode looks alike.
//!
//! ```text
//! cache_pressure DIR [--index-mib N] [--flush-mib N] [--query-pages N] [--mode MODE]...
//! ```
//!
//! For each mode: the vector engine's index (a file of `--index-mib` under `DIR`, default 256)
//! is mapped and read once, a query thread reads `--query-pages` random pages of it every
//! 10 ms (default 16), and the timeseries engine flushes `--flush-mib` (default 2048) to a new
//! file under `DIR` in 1 MiB writes. The index's residency (`mincore`) is sampled every 16 MiB
//! of the flush; the query thread's major faults count the pages it had to read back. Modes:
//!
//! * `plain`: plain `File` writes, the index unprotected;
//! * `governed`: a governed writer (32 MiB page-cache budget), the index unprotected;
//! * `direct`: a direct writer (`O_DIRECT`), the index unprotected;
//! * `protected`: plain writes, the index protected (`MemoryGovernor::protect`, `mlock`);
//! * `protected-governed`: a governed writer and the index protected.
//!
//! Prints one `RESULT` line per mode; exits 1 where a protected index lost residency.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nodedb_mem::{EngineId, MappedFile, MemoryGovernor, resident_bytes};

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;
const MODES: [&str; 5] = [
    "plain",
    "governed",
    "direct",
    "protected",
    "protected-governed",
];

struct Args {
    dir: PathBuf,
    index_mib: u64,
    flush_mib: u64,
    query_pages: u64,
    modes: Vec<String>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut dir = None;
    let (mut index_mib, mut flush_mib, mut query_pages, mut modes) = (256, 2048, 16, Vec::new());
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Result<u64, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(format!("{name} {v:?}: not a positive number"))
        };
        match a.as_str() {
            "--index-mib" => index_mib = num("--index-mib")?,
            "--flush-mib" => flush_mib = num("--flush-mib")?,
            "--query-pages" => query_pages = num("--query-pages")?,
            "--mode" => {
                let m = it.next().ok_or("--mode needs a value")?;
                if !MODES.contains(&m.as_str()) {
                    return Err(format!("--mode {m:?}: one of {}", MODES.join(", ")));
                }
                modes.push(m);
            }
            _ if dir.is_none() && !a.starts_with('-') => dir = Some(PathBuf::from(a)),
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    let dir = dir.ok_or(
        "usage: cache_pressure DIR [--index-mib N] [--flush-mib N] [--query-pages N] [--mode M]",
    )?;
    if !dir.is_dir() {
        return Err(format!("{}: not a directory", dir.display()));
    }
    if modes.is_empty() {
        modes = MODES.iter().map(|m| m.to_string()).collect();
    }
    Ok(Args {
        dir,
        index_mib,
        flush_mib,
        query_pages,
        modes,
    })
}

/// The index file, written once (a pattern per page, so a wrong page would show).
fn index_file(dir: &Path, mib: u64) -> std::io::Result<File> {
    let path = dir.join("index.bin");
    if std::fs::metadata(&path).is_ok_and(|m| m.len() == mib * MIB) {
        return File::open(&path);
    }
    let mut f = File::create(&path)?;
    let mut page = vec![0u8; PAGE];
    for p in 0..(mib * MIB) / PAGE as u64 {
        page[..8].copy_from_slice(&p.to_le_bytes());
        f.write_all(&page)?;
    }
    f.sync_all()?;
    File::open(&path)
}

/// Empties the page cache (as root; elsewhere only the index's pages are dropped).
fn drop_caches(index: &File) {
    // SAFETY: no arguments; flushes dirty data.
    unsafe { libc::sync() };
    if std::fs::write("/proc/sys/vm/drop_caches", "3").is_err() {
        // SAFETY: our descriptor; advice only.
        unsafe { libc::posix_fadvise(index.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// `Cached:` of /proc/meminfo, in bytes.
fn page_cache() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Cached:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// This thread's major faults so far.
fn major_faults() -> u64 {
    // SAFETY: an all-zero rusage is valid for the kernel to fill.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage to write.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    ru.ru_majflt as u64
}

struct Outcome {
    flush_secs: f64,
    min_residency: f64,
    end_residency: f64,
    query_faults: u64,
    query_worst_ms: f64,
    max_cached: u64,
}

fn run(args: &Args, mode: &str) -> Result<Outcome, Box<dyn std::error::Error>> {
    let ts = EngineId::Timeseries;
    let vector = EngineId::Vector;
    let gov = MemoryGovernor::builder()
        .global_ceiling(768 * MIB)
        .budget(vector, (args.index_mib + 64) * MIB)
        .budget(ts, 128 * MIB)
        .page_cache_budget(ts, 32 * MIB)
        .background(None)
        .build()?;
    let index = index_file(&args.dir, args.index_mib)?;
    drop_caches(&index);
    let map = MappedFile::open(&index)?;
    let bytes = map.bytes();
    // Read once: all of it in the page cache.
    let mut sum = 0u64;
    for p in bytes.chunks(PAGE) {
        sum = sum.wrapping_add(p[0] as u64);
    }
    std::hint::black_box(sum);
    let protected = if mode.starts_with("protected") {
        Some(gov.protect(vector, bytes)?)
    } else {
        None
    };
    let len = bytes.len() as u64;
    let residency = || resident_bytes(bytes).map_or(0.0, |r| r as f64 / len as f64);
    let start_residency = residency();

    // The query thread: `query_pages` random pages every 10 ms, checked against the pattern.
    let stop = AtomicBool::new(false);
    let worst_ns = AtomicU64::new(0);
    let pages = bytes.len() / PAGE;
    let (outcome, faults) = std::thread::scope(|s| {
        let q = s.spawn(|| {
            let before = major_faults();
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                for _ in 0..args.query_pages {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let p = (x % pages as u64) as usize;
                    let mut id = [0u8; 8];
                    id.copy_from_slice(&bytes[p * PAGE..p * PAGE + 8]);
                    assert_eq!(u64::from_le_bytes(id), p as u64, "index page {p} differs");
                }
                worst_ns.fetch_max(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
            major_faults() - before
        });
        let r = flush(args, &gov, mode, &residency);
        stop.store(true, Ordering::Relaxed);
        (r, q.join().expect("the query thread"))
    });
    let (flush_secs, min_residency, max_cached) = outcome?;
    let end_residency = residency();
    drop(protected);
    if start_residency < 0.99 {
        eprintln!("{mode}: the index was only {start_residency:.3} resident before the flush");
    }
    Ok(Outcome {
        flush_secs,
        min_residency,
        end_residency,
        query_faults: faults,
        query_worst_ms: worst_ns.load(Ordering::Relaxed) as f64 / 1e6,
        max_cached,
    })
}

/// Flushes `--flush-mib` the mode's way; returns seconds, the lowest index residency seen and
/// the most page cache seen.
fn flush(
    args: &Args,
    gov: &MemoryGovernor,
    mode: &str,
    residency: &dyn Fn() -> f64,
) -> Result<(f64, f64, u64), Box<dyn std::error::Error>> {
    let path = args.dir.join("flush.bin");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let mut out: Box<dyn Write> = match mode {
        "governed" | "protected-governed" => Box::new(gov.writer(EngineId::Timeseries, file)?),
        "direct" => {
            let w = gov.direct_writer(EngineId::Timeseries, file)?;
            if !w.is_direct() {
                return Err("the flush directory's file system refuses direct I/O".into());
            }
            Box::new(w)
        }
        _ => Box::new(file),
    };
    let chunk: Vec<u8> = (0..MIB as usize).map(|i| (i % 253) as u8).collect();
    let (mut min_res, mut max_cached) = (residency(), page_cache());
    let t = Instant::now();
    for i in 1..=args.flush_mib {
        out.write_all(&chunk)?;
        if i % 16 == 0 {
            min_res = min_res.min(residency());
            max_cached = max_cached.max(page_cache());
        }
    }
    out.flush()?;
    drop(out); // governed writers write back and drop behind here
    let f = File::open(&path)?;
    f.sync_all()?;
    let secs = t.elapsed().as_secs_f64();
    min_res = min_res.min(residency());
    // Nothing lost: spot-check a MiB in the middle.
    let mut back = vec![0u8; MIB as usize];
    let mut f = f;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(args.flush_mib / 2 * MIB))?;
    f.read_exact(&mut back)?;
    if back != chunk {
        return Err("the flushed file reads back wrong".into());
    }
    std::fs::remove_file(&path)?;
    Ok((secs, min_res, max_cached))
}

fn main() {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("cache_pressure: {e}");
            std::process::exit(2);
        }
    };
    let mut failed = false;
    for mode in &args.modes {
        match run(&args, mode) {
            Ok(o) => {
                println!(
                    "RESULT mode={mode} index_mib={} flush_mib={} query_pages={} flush_s={:.2} \
                     flush_mib_per_s={:.0} index_min_residency={:.3} index_end_residency={:.3} \
                     query_major_faults={} query_worst_ms={:.2} page_cache_max_mib={}",
                    args.index_mib,
                    args.flush_mib,
                    args.query_pages,
                    o.flush_secs,
                    args.flush_mib as f64 / o.flush_secs,
                    o.min_residency,
                    o.end_residency,
                    o.query_faults,
                    o.query_worst_ms,
                    o.max_cached / MIB
                );
                if mode.starts_with("protected") && o.min_residency < 1.0 {
                    eprintln!("{mode}: the protected index fell to {:.3}", o.min_residency);
                    failed = true;
                }
            }
            Err(e) => {
                eprintln!("{mode}: {e}");
                failed = true;
            }
        }
    }
    std::process::exit(i32::from(failed));
}
