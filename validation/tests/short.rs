//! The validation binary end to end: its short mode (what CI runs) passes with the governor,
//! writes its files and serves metrics while it runs; without the governor it reports what
//! happened; bad settings are refused before any work.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_nodedb-mem-validation");

fn out_dir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a temp dir")
}

fn report(dir: &std::path::Path) -> Value {
    let text = std::fs::read_to_string(dir.join("report.json")).expect("report.json");
    serde_json::from_str(&text).expect("valid JSON")
}

/// Runs the binary with `args` and its output in a fresh directory, to its end.
fn run_in_fresh_dir(args: &[&str]) -> (tempfile::TempDir, std::process::Output) {
    let dir = out_dir();
    let out = Command::new(BIN)
        .args(args)
        .arg("--out")
        .arg(dir.path())
        .output()
        .expect("runs");
    (dir, out)
}

/// Runs the binary with `args` in a fresh directory; asserts it passed and returns the
/// directory with its `report.json`.
fn run_passing(args: &[&str]) -> (tempfile::TempDir, Value) {
    let (dir, out) = run_in_fresh_dir(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let r = report(dir.path());
    (dir, r)
}

fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connects to the metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("writes");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("reads");
    text
}

#[test]
fn the_short_run_passes_under_the_governor_and_writes_its_files() {
    let dir = out_dir();
    let mut child = Command::new(BIN)
        // Heap samples every 1 MiB rather than the default 4 MiB: the query engine's peak of
        // about 24 MiB holds 24 samples on average instead of 6, none about one run in 400 at
        // the default (seen once in CI-like runs), never in practice at 1 MiB.
        .args([
            "--short",
            "--metrics-addr",
            "127.0.0.1:0",
            "--heap-profile-interval",
            "1MiB",
            "--out",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut lines = Vec::new();
    let mut scraped = None;
    for line in stdout.lines() {
        let line = line.expect("a line");
        if let Some(rest) = line.trim().strip_prefix("metrics: curl http://") {
            let addr = rest.strip_suffix("/metrics").expect("an address");
            scraped = Some(scrape(addr));
        }
        lines.push(line);
    }
    let status = child.wait().expect("ends");
    let all = lines.join("\n");
    assert!(status.success(), "exit {status}:\n{all}");
    assert!(all.contains("verdict: PASS"), "{all}");

    let metrics = scraped.expect("the metrics address was printed");
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(
        metrics.contains("nodedb_mem_ceiling_bytes 536870912"),
        "{metrics}"
    );
    assert!(
        metrics.contains("nodedb_mem_engine_limit_bytes{engine=\"query\"}"),
        "{metrics}"
    );

    let r = report(dir.path());
    assert_eq!(r["verdict"], "pass");
    assert_eq!(r["governor"], true);
    let ceiling = r["ceiling_bytes"].as_u64().expect("ceiling");
    assert_eq!(ceiling, 512 << 20);
    let hwm = r["peak_rss_bytes"].as_u64().expect("peak RSS");
    assert!(hwm > 0 && hwm <= ceiling, "VmHWM {hwm}");
    let engines = r["engines"].as_array().expect("engines");
    let names: Vec<&str> = engines
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["vector", "timeseries", "query"]);
    // Limits move: every engine's peak is within the most its limit reached (plus what the
    // allocator has not settled, under 64 KiB a thread), idle engines lent, busy ones
    // borrowed, and the limits never summed past the ceiling.
    let threads = 64;
    for e in engines {
        let peak = e["peak_bytes"].as_u64().unwrap();
        let (lo, hi) = (
            e["limit_min_bytes"].as_u64().unwrap(),
            e["limit_max_bytes"].as_u64().unwrap(),
        );
        let budget = e["budget_bytes"].as_u64().unwrap();
        assert!(peak > 0 && peak <= hi + threads * (64 << 10), "{e}");
        assert!(lo <= budget && budget <= hi, "{e}");
        for k in [
            "lent_bytes",
            "borrowed_bytes",
            "taken_back_bytes",
            "returned_bytes",
            "moves",
        ] {
            assert!(e[k].is_u64(), "{k}: {e}");
        }
        assert!(e["throughput"].as_f64().unwrap() > 0.0, "{e}");
    }
    assert!(
        engines[0]["lent_bytes"].as_u64().unwrap() > 0,
        "the idle index lent"
    );
    assert!(
        engines
            .iter()
            .any(|e| e["borrowed_bytes"].as_u64().unwrap() > 0)
    );
    // The index lent its spare limit once built and idle; its documents, arriving at half
    // the run, make it busy, and it takes the limit back from the engines that borrowed it
    // (which, the limits summing to a constant, are above their budgets then).
    assert!(
        engines[0]["taken_back_bytes"].as_u64().unwrap() > 0,
        "the index did not take its limit back: {}",
        engines[0]
    );
    assert!(
        engines
            .iter()
            .any(|e| e["limit_max_bytes"].as_u64() > e["budget_bytes"].as_u64())
    );
    let names = check_names(&r);
    for check in [
        "query within its moving limit",
        "limits summed within the ceiling at every sample",
        "a busy engine borrowed from idle ones",
        "a lender took its limit back when it became busy",
    ] {
        assert!(names.contains(&check), "{check}: {names:?}");
    }
    // The short run's documents are three quarters of the vector budget, split among the
    // vectors: they make the index busy, not the live data pass the ceiling, so that check is
    // left out.
    let vd = &engines[0]["details"];
    let (docs, doc_bytes) = (
        vd["documents"].as_u64().unwrap(),
        vd["document_bytes"].as_u64().unwrap(),
    );
    assert!(
        docs > 0 && doc_bytes <= 18 << 20 && doc_bytes + 8 * docs > 18 << 20,
        "{vd}"
    );
    assert_eq!(vd["documents_corrupt"], 0, "{vd}");
    assert!(
        names.contains(&"vector documents read back intact"),
        "{names:?}"
    );
    assert!(
        !names.contains(&"live data beyond the ceiling"),
        "{names:?}"
    );
    assert!(
        engines[2]["spills"].as_u64().unwrap() > 0,
        "DataFusion did not spill"
    );
    assert!(engines[1]["details"]["pressure_flushes"].as_u64().unwrap() > 0);
    // The vector data is mapped from a file and locked resident (or, where this user may not
    // lock memory, the refusal says so).
    if vd["protect_refused"].is_null() {
        assert!(vd["protected_bytes"].as_u64().unwrap() > 0, "{vd}");
        assert_eq!(vd["protected_min_residency"].as_f64(), Some(1.0), "{vd}");
    } else {
        assert!(
            vd["protect_refused"]
                .as_str()
                .unwrap()
                .contains("RLIMIT_MEMLOCK"),
            "{vd}"
        );
    }
    // Timeseries flushes go through a governed writer: they left page cache behind, within the
    // engine's page-cache budget (the 4 MiB minimum here) plus one write.
    let cache_peak = engines[1]["page_cache_peak_bytes"].as_u64().unwrap();
    assert!(
        cache_peak > 0 && cache_peak <= (4 << 20) + (1 << 20),
        "{cache_peak}"
    );
    assert_eq!(engines[2]["details"]["wrong_results"], 0);
    assert!(
        r["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["passed"] == true)
    );

    // Each engine's heap at its peak: a pprof profile and a flame graph written, its top
    // sites named by the code that allocated (never the allocator or the binary's wrapper of
    // it), their shares within the engine's exact heap.
    let heaps = r["heap_profiles"].as_array().expect("heap_profiles");
    let heap_engines: Vec<&str> = heaps
        .iter()
        .map(|h| h["engine"].as_str().unwrap())
        .collect();
    assert_eq!(heap_engines, ["vector", "timeseries", "query"]);
    for h in heaps {
        let pprof = std::fs::read(dir.path().join(h["pprof"].as_str().unwrap())).expect("pprof");
        assert_eq!(&pprof[..2], &[0x1f, 0x8b], "{h}");
        let svg = std::fs::read_to_string(dir.path().join(h["flamegraph"].as_str().unwrap()))
            .expect("flame graph");
        assert!(svg.starts_with("<?xml"), "{h}");
        assert!(h["exact_heap_bytes"].as_u64().unwrap() > 0, "{h}");
        assert!(h["at_seconds"].as_f64().unwrap() >= 0.0, "{h}");
        let sites = h["top_sites"].as_array().unwrap();
        let shares: f64 = sites
            .iter()
            .map(|s| s["share_percent"].as_f64().unwrap())
            .sum();
        assert!(shares <= 100.5, "{h}");
        for site in sites {
            let name = site["name"].as_str().unwrap();
            assert!(
                !name.contains("__rust") && !name.contains("alloc::SwitchAlloc"),
                "{h}"
            );
        }
    }
    assert!(
        !heaps[2]["top_sites"].as_array().unwrap().is_empty(),
        "the query engine's heap had no sampled site: {}",
        heaps[2]
    );

    let csv = std::fs::read_to_string(dir.path().join("timeline.csv")).expect("timeline.csv");
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    let secs = r["duration_seconds"].as_f64().unwrap();
    // One sample every 25 ms, give or take scheduling.
    assert!(
        rows.len() as f64 >= secs * 1000.0 / 50.0,
        "{} samples in {secs} s",
        rows.len()
    );
    let t: Vec<u64> = rows
        .iter()
        .map(|l| l.split(',').next().unwrap().parse().unwrap())
        .collect();
    assert!(t.windows(2).all(|w| w[0] <= w[1]));
    // The limits as sampled: they move, and their sum never passes the ceiling.
    let col = |name: &str| {
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let i = header.iter().position(|h| *h == name).expect(name);
        rows.iter()
            .map(|l| l.split(',').nth(i).unwrap().parse::<u64>().unwrap())
            .collect::<Vec<u64>>()
    };
    assert!(
        col("limits_sum_bytes")
            .iter()
            .all(|&x| x > 0 && x <= ceiling)
    );
    let query_limits = col("query_limit_bytes");
    assert!(
        query_limits.windows(2).any(|w| w[0] != w[1]),
        "the query limit never moved"
    );
    let svg = std::fs::read_to_string(dir.path().join("timeline.svg")).expect("timeline.svg");
    assert!(
        svg.starts_with("<svg") && svg.contains("query limit (budget"),
        "not a plot"
    );
}

#[test]
fn without_the_governor_the_report_says_the_ceiling_was_exceeded() {
    let dir = out_dir();
    let out = Command::new(BIN)
        .args([
            "--short",
            "--no-governor",
            "--duration",
            "2",
            "--ceiling",
            "64MiB",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("governor OFF"), "{stdout}");
    let r = report(dir.path());
    assert_eq!(
        (&r["verdict"], &r["governor"]),
        (&Value::from("fail"), &Value::from(false))
    );
    assert!(r["peak_rss_bytes"].as_u64().unwrap() > 64 << 20);
    assert!(
        r["note"]
            .as_str()
            .unwrap()
            .starts_with("without the governor the process peaked")
    );
    assert!(r["engines"][0]["budget_bytes"].is_null());
    assert_eq!(r["allocator"], "jemalloc (tikv-jemallocator), no governor");
}

#[test]
fn one_engine_can_run_alone() {
    // Alone, timeseries borrows the idle engines' limits up to twice its budget, and must fill
    // 90 % of that within a burst of a quarter second for the spill controller to say flush:
    // at the short run's 16 MiB budget, 4-6 pressure flushes beside a cargo build on two
    // cores, and none once beside a build and two more runs of this binary; at 2 MiB, 26-34
    // beside the build.
    let (_dir, r) = run_passing(&[
        "--short",
        "--engines",
        "timeseries",
        "--duration",
        "2",
        "--timeseries-budget",
        "2MiB",
    ]);
    let engines = r["engines"].as_array().expect("engines");
    assert_eq!(engines.len(), 1);
    assert_eq!(engines[0]["name"], "timeseries");
    assert!(engines[0]["details"]["pressure_flushes"].as_u64().unwrap() > 0);
    let checks = check_names(&r);
    assert_eq!(
        checks,
        [
            "timeseries within its moving limit",
            "limits summed within the ceiling at every sample",
            "timeseries flushed on the spill controller's word",
            "peak RSS (VmHWM) under the ceiling",
            "timeseries segments decode to their points"
        ]
    );
}

#[test]
fn documents_take_the_live_data_past_the_ceiling_while_resident_memory_stays_under_it() {
    let (_dir, r) = run_passing(&[
        "--short",
        "--engines",
        "vector",
        "--documents",
        "640MiB",
        "--duration",
        "3",
    ]);
    let ceiling = r["ceiling_bytes"].as_u64().unwrap();
    assert_eq!(ceiling, 512 << 20);
    assert!(r["live_peak_bytes"].as_u64().unwrap() > ceiling, "{r}");
    assert!(r["peak_rss_bytes"].as_u64().unwrap() <= ceiling, "{r}");
    let v = &r["engines"][0];
    assert!(
        v["overflow_peak_bytes"].as_u64().unwrap() > 512 << 20,
        "{v}"
    );
    // Split evenly among the vectors, each a multiple of 8 bytes: at most 8 B each short.
    let docs = v["details"]["documents"].as_u64().unwrap();
    let bytes = v["details"]["document_bytes"].as_u64().unwrap();
    assert!(bytes <= 640 << 20 && bytes + 8 * docs > 640 << 20, "{v}");
    assert_eq!(v["details"]["documents_corrupt"], 0);
    let checks = check_names(&r);
    for name in [
        "live data beyond the ceiling",
        "resident memory reached three quarters of the ceiling",
        "vector documents read back intact",
    ] {
        assert!(checks.contains(&name), "{checks:?}");
    }
}

#[test]
fn bad_settings_are_refused_before_any_work() {
    let cases: [(&[&str], &str); 7] = [
        (
            &["--sample-ms", "80"],
            "must be between 1 and 50 milliseconds",
        ),
        (&["--ceiling", "0"], "the size is zero"),
        (&["--scale", "0"], "must be a finite number above zero"),
        (&["--vector-budget", "50%"], "not a fraction"),
        (&["--engines", "vector,graph"], "invalid value 'graph'"),
        (
            &["--metrics-addr", "0.0.0.0:9100"],
            "only loopback addresses",
        ),
        (
            &["--no-governor", "--metrics-addr", "127.0.0.1:0"],
            "--metrics-addr needs the governor",
        ),
    ];
    for (args, message) in cases {
        let (_dir, out) = run_in_fresh_dir(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
    let out = Command::new(BIN)
        .env("NODEDB_VALIDATION_PLAIN_JEMALLOC", "1")
        .arg("--help")
        .output()
        .expect("runs");
    assert!(out.status.success(), "--help is answered in any mode");
    let out = Command::new(BIN)
        .env("NODEDB_VALIDATION_PLAIN_JEMALLOC", "1")
        .args(["--duration", "1"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("but --no-governor is not given"));
}

#[test]
fn the_version_is_printed() {
    let mut c = Command::new(BIN)
        .arg("--version")
        .stdout(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut s = String::new();
    c.stdout.take().unwrap().read_to_string(&mut s).unwrap();
    assert!(c.wait().unwrap().success());
    assert!(s.starts_with("nodedb-mem-validation 0.1.0"), "{s}");
}

/// The names of the verdict's checks in `report.json`, in order.
fn check_names(r: &serde_json::Value) -> Vec<&str> {
    r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}
