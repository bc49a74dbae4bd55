//! The mixed workload: vector search (HNSW), timeseries ingest (Gorilla segments) and a SQL
//! `GROUP BY` (DataFusion) run at once in one process under one `nodedb-mem` governor, and a
//! verdict on whether every engine stayed within its budget and the process's peak resident
//! memory within the ceiling. `--no-governor` runs the same workload on plain jemalloc.
//!
//! ```text
//! cargo run --release -p nodedb-mem-validation              # 1 GiB ceiling, 30 s
//! cargo run --release -p nodedb-mem-validation -- --help
//! ```

mod alloc;
mod gorilla;
mod heap;
mod metrics_http;
mod monitor;
mod query;
mod report;
mod stats;
mod timeseries;
mod vector;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use nodedb_mem::{ByteSize, EngineId, MemoryGovernor, OverflowConfig, Size};
use serde_json::json;

use crate::monitor::{Display, ENGINES, Sampler};
use crate::report::{Check, EngineReport, Report};
use crate::stats::EngineStats;

#[global_allocator]
static ALLOC: alloc::SwitchAlloc = alloc::SwitchAlloc::new();

/// Parses a size such as `1GiB`, `512MiB` or `1073741824`.
fn bytes(s: &str) -> Result<u64, String> {
    match Size::parse(s) {
        Ok(Size::Bytes(b)) => Ok(b),
        Ok(_) => Err("give a size in bytes (e.g. 256MiB), not a fraction".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// A size that may be zero ("0" for none).
fn bytes_or_zero(s: &str) -> Result<u64, String> {
    if s.trim() == "0" { Ok(0) } else { bytes(s) }
}

fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        Ok(_) => Err("must be a finite number above zero".into()),
        Err(e) => Err(e.to_string()),
    }
}

fn sample_ms(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(v @ 1..=50) => Ok(v),
        Ok(_) => Err("must be between 1 and 50 milliseconds".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs vector search, timeseries ingest and a SQL GROUP BY at once under one memory governor
/// and checks that every engine stays within its budget and the process within the ceiling.
#[derive(Debug, Parser)]
#[command(name = "nodedb-mem-validation", version)]
struct Args {
    /// The process's global memory ceiling [default: 1GiB; 512MiB with --short].
    #[arg(long, value_parser = bytes)]
    ceiling: Option<u64>,
    /// The Vector engine's budget [default: 160MiB; 24MiB with --short].
    #[arg(long, value_parser = bytes)]
    vector_budget: Option<u64>,
    /// The Timeseries engine's budget [default: 128MiB; 16MiB with --short].
    #[arg(long, value_parser = bytes)]
    timeseries_budget: Option<u64>,
    /// The Query engine's budget [default: 256MiB; 16MiB with --short].
    #[arg(long, value_parser = bytes)]
    query_budget: Option<u64>,
    /// Seconds the engines work for [default: 30; 6 with --short].
    #[arg(long, value_parser = positive)]
    duration: Option<f64>,
    /// Size of the data: 1.0 is up to 100,000 vectors (the build stops at half the
    /// duration, a third with --short), 16 million GROUP BY rows over 8 million groups [default: 1.0; 0.04 with
    /// --short].
    #[arg(long, value_parser = positive)]
    scale: Option<f64>,
    /// Documents the vector engine keeps beside its index from the end of its build on, split among
    /// its vectors (the rows its searches return), allocated with no reservation: past its
    /// limit they live in its overflow region. Where they and the engines' budgets together
    /// exceed the ceiling, the verdict checks that the live data passed the ceiling while
    /// resident memory stayed under it [default: three quarters of the ceiling; three
    /// quarters of the vector budget with --short; 0 for none].
    #[arg(long, value_parser = bytes_or_zero)]
    documents: Option<u64>,
    /// The timeseries table's fixed flush size, governor or not.
    #[arg(long, value_parser = bytes, default_value = "512MiB")]
    memtable: u64,
    /// Directory for report.json, timeline.csv, timeline.svg, the heap profiles at each
    /// engine's peak (heap-<engine>.pb.gz, .svg) and the engines' files.
    #[arg(long, default_value = "validation-out")]
    out: PathBuf,
    /// Serve the governor's Prometheus metrics on this loopback address while running.
    #[arg(long)]
    metrics_addr: Option<SocketAddr>,
    /// Run the same workload on plain jemalloc with no governor and no budgets.
    #[arg(long)]
    no_governor: bool,
    /// A small, quick run (what CI runs); other flags still override its settings.
    #[arg(long)]
    short: bool,
    /// Whether the verdict requires the engines to have spilled (set false for a ceiling so
    /// large that nothing needs to).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    expect_spill: bool,
    /// The engines to run (all three by default; one alone measures its throughput without
    /// the others competing for the cores).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Workload::Vector, Workload::Timeseries, Workload::Query])]
    engines: Vec<Workload>,
    /// Seed of the generated data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Milliseconds between timeline samples.
    #[arg(long, value_parser = sample_ms, default_value = "25")]
    sample_ms: u64,
    /// Mean bytes allocated per thread between heap-profile samples (0: profiling off)
    /// [default: the governor's, 4 MiB].
    #[arg(long, value_parser = bytes_or_zero)]
    heap_profile_interval: Option<u64>,
}

/// An engine of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Workload {
    Vector,
    Timeseries,
    Query,
}

/// The settings after applying `--short` and the defaults.
#[derive(Debug, Clone, serde::Serialize)]
struct Settings {
    ceiling: u64,
    budgets: [u64; 3],
    /// The most each engine may borrow up to.
    caps: [u64; 3],
    duration_s: f64,
    /// The vector build stops this many seconds in (half the run; a third with `--short`,
    /// where a loaded machine, CI's, builds a few thousand vectors in seconds and the index
    /// must have time to become busy again once its documents arrive), and the documents
    /// arrive then.
    build_s: f64,
    /// Timeseries ingests in bursts of this long with idle gaps of `ts_gap_s` between them
    /// (its table flushed at the end of each burst).
    ts_burst_s: f64,
    ts_gap_s: f64,
    /// Seconds between two GROUP BY queries (the waves of the Query engine).
    query_pause_s: f64,
    scale: f64,
    memtable_bytes: u64,
    vectors: usize,
    /// Bytes of documents the vector engine keeps beside its index.
    documents_bytes: u64,
    query_rows: u64,
    query_groups: u64,
    series: usize,
    seed: u64,
    short: bool,
    expect_spill: bool,
    /// Which of vector, timeseries, query run.
    running: [bool; 3],
}

impl Settings {
    fn from(a: &Args) -> Settings {
        let pick = |v: Option<u64>, normal: u64, short: u64| {
            v.unwrap_or(if a.short { short } else { normal })
        };
        let scale = a.scale.unwrap_or(if a.short { 0.04 } else { 1.0 });
        let rows = ((16_000_000.0 * scale) as u64).max(1000);
        let budgets = [
            pick(a.vector_budget, 160 << 20, 24 << 20),
            pick(a.timeseries_budget, 128 << 20, 16 << 20),
            pick(a.query_budget, 256 << 20, 16 << 20),
        ];
        let duration_s = a.duration.unwrap_or(if a.short { 6.0 } else { 30.0 });
        let ceiling = pick(a.ceiling, 1 << 30, 512 << 20);
        Settings {
            ceiling,
            budgets,
            // The engines whose demand comes and goes may borrow up to twice their budget;
            // the vector index, built once, lends what it does not use.
            caps: [budgets[0], 2 * budgets[1], 2 * budgets[2]],
            duration_s,
            // Three or four bursts and waves over the run.
            build_s: duration_s / if a.short { 3.0 } else { 2.0 },
            ts_burst_s: duration_s / 8.0,
            ts_gap_s: duration_s / 12.0,
            query_pause_s: duration_s / 15.0,
            scale,
            memtable_bytes: a.memtable,
            vectors: ((100_000.0 * scale) as usize).max(500),
            // The short run's documents only make the index, which lent its spare limit once
            // built, busy again (so it takes that limit back): three quarters of its budget
            // are past the warning threshold (70 %) of any limit it can have, however much it
            // lent. The full run's take the live data past the ceiling.
            documents_bytes: a.documents.unwrap_or(if a.short {
                budgets[0] / 4 * 3
            } else {
                ceiling / 4 * 3
            }),
            query_rows: rows,
            query_groups: rows / 2,
            series: 1000,
            seed: a.seed,
            short: a.short,
            expect_spill: a.expect_spill,
            running: [Workload::Vector, Workload::Timeseries, Workload::Query]
                .map(|w| a.engines.contains(&w)),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.no_governor != alloc::is_plain() {
        if alloc::is_plain() {
            eprintln!(
                "error: {} is set in the environment but --no-governor is not given; unset it",
                alloc::PLAIN_ENV.to_string_lossy()
            );
            return ExitCode::from(2);
        }
        // Plain jemalloc must serve the process from its first allocation: run again with it.
        return reexec_plain();
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn reexec_plain() -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: finding this program to run it on plain jemalloc: {e}");
            return ExitCode::from(2);
        }
    };
    let status = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .env(alloc::PLAIN_ENV.to_string_lossy().as_ref(), "1")
        .status();
    match status {
        Ok(s) => match s.code() {
            Some(0) => ExitCode::SUCCESS,
            Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
            None => {
                eprintln!("error: the plain-jemalloc run ended by a signal: {s}");
                ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("error: running {}: {e}", exe.display());
            ExitCode::from(2)
        }
    }
}

/// The outcome of an engine's thread (the default for an engine that did not run).
fn joined<T: Default>(
    h: Option<std::thread::JoinHandle<Result<T, String>>>,
    name: &str,
) -> Result<T, String> {
    let Some(h) = h else {
        return Ok(T::default());
    };
    h.join()
        .map_err(|_| format!("the {name} engine panicked"))
        .and_then(|r| r.map_err(|e| format!("the {name} engine failed: {e}")))
}

fn fresh_dir(p: &Path) -> Result<(), String> {
    if p.exists() {
        std::fs::remove_dir_all(p).map_err(|e| format!("clearing {}: {e}", p.display()))?;
    }
    std::fs::create_dir_all(p).map_err(|e| format!("creating {}: {e}", p.display()))
}

fn run(args: &Args) -> Result<bool, String> {
    let s = Settings::from(args);
    std::fs::create_dir_all(&args.out)
        .map_err(|e| format!("creating {}: {e}", args.out.display()))?;
    let (spill_dir, overflow_dir) = (args.out.join("spill"), args.out.join("overflow"));
    fresh_dir(&spill_dir)?;
    fresh_dir(&overflow_dir)?;

    let gov: Option<&'static MemoryGovernor> = if args.no_governor {
        if args.metrics_addr.is_some() {
            return Err("--metrics-addr needs the governor (it serves the governor's metrics); drop --no-governor or --metrics-addr".into());
        }
        None
    } else {
        let g = MemoryGovernor::builder()
            .global_ceiling(s.ceiling)
            .budget(EngineId::Vector, s.budgets[0])
            .budget(EngineId::Timeseries, s.budgets[1])
            .budget(EngineId::Query, s.budgets[2])
            // Engines this workload does not run get a token budget, and what no engine owns
            // (`Unattributed`: the runtime, the sampler) an eighth of the ceiling it never
            // lends, so the busy engines live on each other's idle time and the vector index's
            // spare room, and the limits they can reach together stay well under the ceiling.
            .budget(EngineId::Sparse, 1u64 << 20)
            .budget(EngineId::Crdt, 1u64 << 20)
            .budget(EngineId::Unattributed, s.ceiling / 8)
            .floor(EngineId::Unattributed, s.ceiling / 8)
            // The background thread that `install` starts rebalances: idle engines lend,
            // busy ones borrow up to their cap (the index its budget, the others twice theirs,
            // so the process keeps room under the ceiling for what no engine owns) and lenders
            // take theirs back.
            .cap(EngineId::Vector, s.caps[0])
            .cap(EngineId::Timeseries, s.caps[1])
            .cap(EngineId::Query, s.caps[2])
            .overflow(OverflowConfig::in_dir(&overflow_dir))
            .heap_profile_interval(
                args.heap_profile_interval
                    .unwrap_or(nodedb_mem::DEFAULT_HEAP_PROFILE_INTERVAL),
            )
            .install()
            .map_err(|e| format!("configuring the governor: {e}"))?;
        Some(g)
    };

    println!(
        "nodedb-mem mixed workload: vector search + timeseries ingest + SQL GROUP BY for {} s",
        s.duration_s
    );
    match gov {
        Some(g) => println!(
            "  governor on: ceiling {}; budgets vector {}, timeseries {}, query {}",
            ByteSize(g.ceiling()),
            ByteSize(s.budgets[0]),
            ByteSize(s.budgets[1]),
            ByteSize(s.budgets[2])
        ),
        None => println!(
            "  governor OFF (--no-governor): plain jemalloc, no budgets; the ceiling of {} is only measured against",
            ByteSize(s.ceiling)
        ),
    }
    println!(
        "  {} vectors of {} dimensions with {} of documents; {} rows in {} groups; {} series, table flushed at {}",
        s.vectors,
        vector::DIM,
        ByteSize(s.documents_bytes),
        s.query_rows,
        s.query_groups,
        s.series,
        ByteSize(s.memtable_bytes)
    );
    if let (Some(g), Some(addr)) = (gov, args.metrics_addr) {
        let bound = metrics_http::serve(addr, g)?;
        println!("  metrics: curl http://{bound}/metrics");
    }
    println!("  output: {}\n", args.out.display());

    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(s.duration_s);
    let stats: [Arc<EngineStats>; 3] = Default::default();
    let sampler = Sampler::spawn(gov, Duration::from_millis(args.sample_ms), started)
        .map_err(|e| format!("starting the sampler: {e}"))?;

    let vcfg = vector::VecConfig {
        vectors: s.vectors,
        recall_queries: if s.short { 20 } else { 100 },
        seed: s.seed,
        build_deadline: started + Duration::from_secs_f64(s.build_s),
        // The documents arrive when the build stops at the latest, when the index, built and
        // idle, has lent its spare limit: it becomes busy and takes that limit back.
        documents_at: started + Duration::from_secs_f64(s.build_s),
        deadline,
        max_queries: u64::MAX,
        vectors_file: args.out.join("vectors.f32"),
        documents: s.documents_bytes,
    };
    let tcfg = timeseries::TsConfig {
        series: s.series,
        points: u64::MAX,
        memtable_bytes: s.memtable_bytes,
        segments: args.out.join("segments.gorilla"),
        seed: s.seed,
        deadline,
        burst: Duration::from_secs_f64(s.ts_burst_s),
        gap: Duration::from_secs_f64(s.ts_gap_s),
    };
    let qcfg = query::QueryConfig {
        rows: s.query_rows,
        groups: s.query_groups,
        partitions: 2,
        spill_dir: spill_dir.clone(),
        deadline,
        max_queries: u64::MAX,
        pause: Duration::from_secs_f64(s.query_pause_s),
    };
    let spawn = |name: &str| std::thread::Builder::new().name(name.to_owned());
    let err = |e: std::io::Error| format!("starting an engine thread: {e}");
    for (i, st) in stats.iter().enumerate() {
        if !s.running[i] {
            st.finish();
        }
    }
    let st = stats.clone();
    let v = s.running[0]
        .then(|| spawn("vector").spawn(move || vector::run(&vcfg, gov, &st[0])))
        .transpose()
        .map_err(err)?;
    let st = stats.clone();
    let t = s.running[1]
        .then(|| spawn("timeseries").spawn(move || timeseries::run(&tcfg, gov, &st[1])))
        .transpose()
        .map_err(err)?;
    let st = stats.clone();
    let q = s.running[2]
        .then(|| spawn("query").spawn(move || query::run(&qcfg, gov, &st[2])))
        .transpose()
        .map_err(err)?;

    let mut display = Display::new(["ops", "points", "rows"]);
    // An engine that never finishes (a library deadlock) fails the run instead of hanging it:
    // the engines stop at the deadline, and their last steps (a query, a flush, the recall
    // check) take seconds.
    let give_up = Duration::from_secs_f64(s.duration_s * 3.0 + 120.0);
    while !stats.iter().all(|s| s.is_done()) {
        if started.elapsed() > give_up {
            let stuck: Vec<&str> = ENGINES
                .iter()
                .zip(&stats)
                .filter(|(_, st)| !st.is_done())
                .map(|(e, _)| e.name())
                .collect();
            return Err(format!(
                "the {} engine{} did not finish {} s after the start (the run lasts {} s)",
                stuck.join(" and "),
                if stuck.len() > 1 { "s" } else { "" },
                give_up.as_secs(),
                s.duration_s
            ));
        }
        std::thread::sleep(Duration::from_millis(if display.is_terminal() {
            250
        } else {
            500
        }));
        display.show(started.elapsed(), s.ceiling, sampler.latest(), gov, &stats);
    }
    let (vo, to, qo) = (
        joined(v, "vector"),
        joined(t, "timeseries"),
        joined(q, "query"),
    );
    let elapsed = started.elapsed();
    let (samples, peaks) = sampler.finish();
    let (vo, to, qo) = (vo?, to?, qo?);
    let _ = std::fs::remove_file(args.out.join("segments.gorilla"));
    let hwm = monitor::vm_hwm()?;

    let mut rep = build_report(&s, gov, &samples, hwm, elapsed, &vo, &to, &qo, &stats, args);
    // Resolved now that the run is measured: reading the binary's symbols takes memory.
    rep.heap_profiles = heap::write(&args.out, peaks)?;
    let json = serde_json::to_string_pretty(&rep).map_err(|e| e.to_string())?;
    let write = |name: &str, r: std::io::Result<()>| r.map_err(|e| format!("writing {name}: {e}"));
    write(
        "report.json",
        std::fs::write(args.out.join("report.json"), json),
    )?;
    write(
        "timeline.csv",
        report::write_csv(&args.out.join("timeline.csv"), &samples),
    )?;
    report::write_svg(
        &args.out.join("timeline.svg"),
        &samples,
        s.ceiling,
        gov.map(|_| s.budgets),
        &format!(
            "nodedb-mem mixed workload, governor {}: resident memory and engine usage",
            if gov.is_some() { "on" } else { "off" }
        ),
    )?;
    print!("{}", rep.table());
    println!(
        "  report: {}, timeline: {} and {}",
        args.out.join("report.json").display(),
        args.out.join("timeline.csv").display(),
        args.out.join("timeline.svg").display()
    );
    Ok(rep.passed())
}

/// The process's user and system CPU seconds so far (zeros if `getrusage` fails).
fn cpu_times() -> (f64, f64) {
    // SAFETY: `getrusage` writes one `rusage` into the zeroed value it is given and reads
    // nothing else; RUSAGE_SELF is a valid selector.
    let (rc, ru) = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        (libc::getrusage(libc::RUSAGE_SELF, &mut ru), ru)
    };
    if rc != 0 {
        return (0.0, 0.0);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
    (secs(ru.ru_utime), secs(ru.ru_stime))
}

/// Samples where an engine's usage was above its limit.
#[derive(Debug, Default, PartialEq, Eq)]
struct Overruns {
    /// Above the limit by more than the allocator's bound.
    above: usize,
    /// Of those, samples where usage also grew by more than the bound since the previous one:
    /// the only way past a limit is a lender taking it back, which lowers the limit under
    /// usage the engine already had; growing past it would be a breach.
    grew: usize,
}

fn limit_overruns(samples: &[monitor::Sample], i: usize, bound: u64) -> Overruns {
    let mut o = Overruns::default();
    let (mut prev_usage, mut prev_limit) = (0u64, 0u64);
    for x in samples {
        if x.usage[i] > x.limit[i] + bound {
            o.above += 1;
            // Between two samples the usage may have grown under the earlier limit before a
            // take-back lowered it: growth counts only past the higher of the two.
            if x.usage[i] > prev_usage + bound && x.usage[i] > prev_limit.max(x.limit[i]) + bound {
                o.grew += 1;
            }
        }
        (prev_usage, prev_limit) = (x.usage[i], x.limit[i]);
    }
    o
}

#[expect(
    clippy::too_many_arguments,
    reason = "one call site: every figure of the run"
)]
fn build_report(
    s: &Settings,
    gov: Option<&MemoryGovernor>,
    samples: &[monitor::Sample],
    hwm: u64,
    elapsed: Duration,
    vo: &vector::VecOutcome,
    to: &timeseries::TsOutcome,
    qo: &query::QueryOutcome,
    stats: &[Arc<EngineStats>; 3],
    args: &Args,
) -> Report {
    let secs = |d: Duration| d.as_secs_f64().max(1e-9);
    let overflow_peak = |i: usize| samples.iter().map(|x| x.overflow[i]).max().unwrap_or(0);
    let peak_sampled = samples.iter().map(|x| x.rss).max().unwrap_or(0);
    let limits = |i: usize| samples.iter().map(move |x| x.limit[i]);
    let engine = |i: usize, throughput: f64, unit: &'static str, details: serde_json::Value| {
        let e = ENGINES[i];
        let b = gov.map(|g| g.budget(e));
        EngineReport {
            name: e.name(),
            budget_bytes: gov.map(|_| s.budgets[i]),
            lent_bytes: b.map(|b| b.lent_total()),
            borrowed_bytes: b.map(|b| b.borrowed_total()),
            taken_back_bytes: b.map(|b| b.taken_back_total()),
            returned_bytes: b.map(|b| b.returned_total()),
            limit_min_bytes: gov.and(limits(i).min()),
            limit_max_bytes: gov.and(limits(i).max()),
            moves: b.map(|b| b.moves()),
            peak_bytes: gov.map(|g| g.budget(e).peak()),
            overflow_peak_bytes: gov.map(|_| overflow_peak(i)),
            page_cache_peak_bytes: gov.map(|g| {
                let pc = g.page_cache(e);
                pc.peak.max(pc.dirs_peak)
            }),
            spills: stats[i].spills(),
            rejections: stats[i].rejections(),
            throughput,
            throughput_unit: unit,
            details,
        }
    };
    let all = [
        engine(
            0,
            vo.queries as f64 / secs(vo.query_time),
            "queries/s",
            json!({
                "vectors_inserted": vo.inserted,
                "vectors_requested": s.vectors,
                "inserts_per_second": vo.inserted as f64 / secs(vo.build_time),
                "build_seconds": secs(vo.build_time),
                "queries": vo.queries,
                "recall_at_10": vo.recall,
                "stopped_by_budget": vo.stopped_by_budget,
                "protected_bytes": vo.protected_bytes,
                "protected_min_residency": vo.min_residency,
                "protect_refused": vo.protect_refused,
                "admission_bytes_per_vector": vo.bytes_per_vector,
                "documents": vo.documents,
                "document_bytes": vo.document_bytes,
                "documents_read": vo.documents_read,
                "documents_corrupt": vo.documents_corrupt,
            }),
        ),
        engine(
            1,
            to.points as f64 / secs(to.elapsed),
            "points/s",
            json!({
                "points": to.points,
                "pressure_flushes": to.pressure_flushes,
                "size_flushes": to.size_flushes,
                "burst_flushes": to.burst_flushes,
                "flush_seconds": secs(to.flush_time),
                "raw_bytes": to.raw_bytes,
                "compressed_bytes": to.compressed_bytes,
                "bytes_per_point": to.compressed_bytes as f64 / to.points.max(1) as f64,
                "segments_checked": to.segments_checked,
                "segments_corrupt": to.segments_corrupt,
            }),
        ),
        engine(
            2,
            qo.rows as f64 / secs(qo.elapsed),
            "rows/s",
            json!({
                "queries": qo.queries,
                "rows": qo.rows,
                "groups": s.query_groups,
                "spill_files": qo.spills,
                "spilled_bytes": qo.spilled_bytes,
                "pool_refusals": qo.refusals,
                "wrong_results": qo.wrong_results,
                "first_error": qo.first_error,
                "sql": query::SQL,
            }),
        ),
    ];
    let engines: Vec<EngineReport> = all
        .into_iter()
        .zip(s.running)
        .filter_map(|(e, on)| on.then_some(e))
        .collect();
    let [vector_ran, ts_ran, query_ran] = s.running;

    let mut checks = Vec::new();
    if let Some(g) = gov {
        // The allocator's ledger never passes a limit; what it has not settled yet is less
        // than `BATCH` per thread.
        let threads = samples.iter().map(|x| x.threads).max().unwrap_or(1).max(1);
        let bound = nodedb_mem::inflight_bound().batch * threads;
        for (i, e) in engines.iter().enumerate() {
            let k = ENGINES.iter().position(|x| x.name() == e.name).unwrap_or(i);
            let over = limit_overruns(samples, k, bound);
            let (lo, hi) = (
                e.limit_min_bytes.unwrap_or(0),
                e.limit_max_bytes.unwrap_or(0),
            );
            checks.push(Check::new(
                format!("{} within its moving limit", e.name),
                over.grew == 0,
                format!(
                    "peak {} under limits {} .. {} (budget {}); {} samples above a limit taken back \
                     under it, {} of them grown past it by more than {} ({} threads x {})",
                    ByteSize(e.peak_bytes.unwrap_or(0)),
                    ByteSize(lo),
                    ByteSize(hi),
                    ByteSize(e.budget_bytes.unwrap_or(0)),
                    over.above,
                    over.grew,
                    ByteSize(bound),
                    threads,
                    ByteSize(nodedb_mem::inflight_bound().batch),
                ),
            ));
        }
        let most = samples.iter().map(|x| x.limits_sum).max().unwrap_or(0);
        checks.push(Check::new(
            "limits summed within the ceiling at every sample",
            most <= g.ceiling(),
            format!(
                "at most {} of {} over {} samples",
                ByteSize(most),
                ByteSize(g.ceiling()),
                samples.len()
            ),
        ));
    }
    // Borrowing and taking back need engines whose demand comes and goes beside each other:
    // the mixed workload, all three engines at once.
    if gov.is_some() && vector_ran && ts_ran && query_ran {
        // Passes if some engine shows the figure; the detail names each with its words.
        let some_engine =
            |name: &str, none: &str, says: &dyn Fn(&EngineReport) -> Option<String>| {
                let lines: Vec<String> = engines.iter().filter_map(says).collect();
                Check::new(
                    name,
                    !lines.is_empty(),
                    if lines.is_empty() {
                        none.to_owned()
                    } else {
                        lines.join(", ")
                    },
                )
            };
        checks.push(some_engine(
            "a busy engine borrowed from idle ones",
            "no engine borrowed",
            &|e| {
                let b = e.borrowed_bytes.unwrap_or(0);
                (b > 0).then(|| {
                    format!(
                        "{} borrowed {} (limit up to {})",
                        e.name,
                        ByteSize(b),
                        ByteSize(e.limit_max_bytes.unwrap_or(0))
                    )
                })
            },
        ));
        checks.push(some_engine(
            "a lender took its limit back when it became busy",
            "no engine took limit back",
            &|e| {
                let t = e.taken_back_bytes.unwrap_or(0);
                (t > 0).then(|| {
                    format!(
                        "{} lent {} and took {} back",
                        e.name,
                        ByteSize(e.lent_bytes.unwrap_or(0)),
                        ByteSize(t)
                    )
                })
            },
        ));
    }
    if gov.is_some() {
        if s.expect_spill && query_ran {
            checks.push(Check::new(
                "DataFusion spilled when the governor said no",
                qo.spills > 0 && qo.refusals > 0,
                format!(
                    "{} spill files, {} written, {} refusals",
                    qo.spills,
                    ByteSize(qo.spilled_bytes),
                    qo.refusals
                ),
            ));
        }
        if s.expect_spill && ts_ran {
            checks.push(Check::new(
                "timeseries flushed on the spill controller's word",
                to.pressure_flushes > 0,
                format!("{} pressure flushes", to.pressure_flushes),
            ));
        }
    }
    checks.push(Check::new(
        "peak RSS (VmHWM) under the ceiling",
        hwm <= s.ceiling,
        format!(
            "{} of {} ({:.1} %)",
            ByteSize(hwm),
            ByteSize(s.ceiling),
            hwm as f64 * 100.0 / s.ceiling as f64
        ),
    ));
    if query_ran {
        checks.push(Check::new(
            "GROUP BY answers exact",
            qo.wrong_results == 0,
            match &qo.first_error {
                None => format!("{} of {} queries checked", qo.queries, qo.queries),
                Some(e) => e.clone(),
            },
        ));
    }
    if ts_ran {
        checks.push(Check::new(
            "timeseries segments decode to their points",
            to.segments_corrupt == 0 && to.segments_checked > 0,
            format!(
                "{} segments checked, {} corrupt",
                to.segments_checked, to.segments_corrupt
            ),
        ));
    }
    let live_peak = samples.iter().map(|x| x.live).max().unwrap_or(0);
    let budgets_sum: u64 = s.budgets.iter().sum();
    if gov.is_some()
        && vector_ran
        && s.documents_bytes > 0
        && s.documents_bytes + budgets_sum > s.ceiling
    {
        // Documents sized to pass the ceiling with the engines' budgets take the process's
        // live data past it while resident memory stays under it: the overflow regions hold
        // the rest.
        checks.push(Check::new(
            "live data beyond the ceiling",
            live_peak > s.ceiling,
            format!(
                "at most {} live (charged to engines plus held in overflow) at one sample, \
                 {:.0} % of the {} ceiling",
                ByteSize(live_peak),
                live_peak as f64 * 100.0 / s.ceiling as f64,
                ByteSize(s.ceiling)
            ),
        ));
        checks.push(Check::new(
            "resident memory reached three quarters of the ceiling",
            hwm >= s.ceiling / 4 * 3,
            format!(
                "VmHWM {} ({:.1} % of {})",
                ByteSize(hwm),
                hwm as f64 * 100.0 / s.ceiling as f64,
                ByteSize(s.ceiling)
            ),
        ));
    }
    if vector_ran && vo.documents > 0 {
        checks.push(Check::new(
            "vector documents read back intact",
            vo.documents_read > 0 && vo.documents_corrupt == 0,
            format!(
                "{} of {} documents ({}) read back by searches, {} corrupt",
                vo.documents_read,
                vo.documents,
                ByteSize(vo.document_bytes),
                vo.documents_corrupt
            ),
        ));
    }
    if vector_ran {
        checks.push(Check::new(
            "vector recall@10 at least 0.70 (the index answers queries)",
            vo.recall >= 0.70,
            format!("{:.3} over {} vectors", vo.recall, vo.inserted),
        ));
        if gov.is_some() {
            // A system that does not let this user lock memory (`RLIMIT_MEMLOCK`) is reported,
            // not failed: the budget's refusal or a locked region that lost pages would be.
            checks.push(Check::new(
                "vector data protected and fully resident while queried",
                (vo.protected_bytes > 0 && vo.min_residency >= 1.0) || vo.protect_refused_by_system,
                match &vo.protect_refused {
                    Some(why) => format!("not protected: {why}"),
                    None => format!(
                        "{} locked, lowest residency {:.1} %",
                        ByteSize(vo.protected_bytes),
                        vo.min_residency * 100.0
                    ),
                },
            ));
        }
    }

    let passed = checks.iter().all(|c| c.passed);
    let cpu = cpu_times();
    let governor_figures = match gov {
        Some(g) => {
            let snap = g.snapshot();
            json!({
                "global_peak_bytes": snap.global_peak,
                "overflow_breaches": snap.overflow.breaches,
                "overflow_refused": snap.overflow.refused,
                "overflow_extent_failures": snap.overflow.extent_failures,
                "last_resident_bytes": snap.resident.resident,
                "allocator_resident_bytes": snap.resident.allocator_resident,
                "resident_unaccounted_bytes": snap.resident_unaccounted,
                "events_recorded": snap.events_recorded,
                "heap_samples_taken": g.heap_profile_counts().taken,
                "heap_samples_dropped": g.heap_profile_counts().dropped,
            })
        }
        None => serde_json::Value::Null,
    };
    let note = match (gov.is_some(), hwm > s.ceiling) {
        (false, true) => format!(
            "without the governor the process peaked {} over the ceiling",
            ByteSize(hwm - s.ceiling)
        ),
        (false, false) => "without the governor the process still stayed under the ceiling: raise --scale or lower --ceiling to show what the governor prevents".to_owned(),
        (true, _) => String::new(),
    };
    Report {
        verdict: if passed { "pass" } else { "fail" },
        governor: gov.is_some(),
        allocator: if gov.is_some() {
            "GovernedAlloc (per-engine jemalloc arenas)"
        } else {
            "jemalloc (tikv-jemallocator), no governor"
        },
        ceiling_bytes: s.ceiling,
        peak_rss_bytes: hwm,
        peak_sampled_rss_bytes: peak_sampled,
        cpu_user_seconds: cpu.0,
        cpu_system_seconds: cpu.1,
        cpu_ns_per_unit: match s.running {
            [true, false, false] => Some(vo.queries),
            [false, true, false] => Some(to.points),
            [false, false, true] => Some(qo.rows),
            _ => None,
        }
        .map(|units| (cpu.0 + cpu.1) * 1e9 / units.max(1) as f64),
        live_peak_bytes: gov.map(|_| live_peak),
        duration_seconds: elapsed.as_secs_f64(),
        sample_interval_ms: args.sample_ms,
        settings: serde_json::to_value(s).unwrap_or_default(),
        engines,
        checks,
        governor_figures,
        heap_profiles: Vec::new(),
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(usage: u64, limit: u64) -> monitor::Sample {
        monitor::Sample {
            usage: [0, 0, usage],
            limit: [0, 0, limit],
            ..monitor::Sample::default()
        }
    }

    #[test]
    fn usage_over_a_limit_taken_back_passes_but_growing_past_it_does_not() {
        const M: u64 = 1 << 20;
        // Within the limit, then the limit taken back under usage, which then falls.
        let fine = [
            at(10 * M, 16 * M),
            at(14 * M, 16 * M),
            at(14 * M, 8 * M),
            at(9 * M, 8 * M),
        ];
        assert_eq!(
            limit_overruns(&fine, 2, 64 << 10),
            Overruns { above: 2, grew: 0 }
        );
        // Growth under the limit of the sample before, lowered by a take-back since: allowed.
        let taken = [at(10 * M, 16 * M), at(14 * M, 16 * M), at(15 * M, 8 * M)];
        assert_eq!(
            limit_overruns(&taken, 2, 64 << 10),
            Overruns { above: 1, grew: 0 }
        );
        // Past both limits it is a breach.
        let past = [at(10 * M, 16 * M), at(17 * M, 8 * M)];
        assert_eq!(
            limit_overruns(&past, 2, 64 << 10),
            Overruns { above: 1, grew: 1 }
        );
        // Growing while above the limit is a breach; within the bound it is not.
        let grew = [
            at(10 * M, 8 * M),
            at(12 * M, 8 * M),
            at(12 * M + 1000, 8 * M),
        ];
        assert_eq!(
            limit_overruns(&grew, 2, 64 << 10),
            Overruns { above: 3, grew: 2 }
        );
        assert_eq!(
            limit_overruns(&[at(8 * M + 1000, 8 * M)], 2, 64 << 10),
            Overruns::default()
        );
    }
}
