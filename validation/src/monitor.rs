//! The sampler (the timeline, and each engine's heap samples at its peak) and the live
//! progress display.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nodedb_mem::{ByteSize, EngineId, MemoryGovernor};

use crate::heap::Peaks;
use crate::stats::EngineStats;

/// The engines the workload runs, in display order.
pub(crate) const ENGINES: [EngineId; 3] = [EngineId::Vector, EngineId::Timeseries, EngineId::Query];

/// One point of the timeline.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Sample {
    /// Milliseconds since the workload started.
    pub(crate) t_ms: u64,
    /// Resident set size.
    pub(crate) rss: u64,
    /// Per engine (in [`ENGINES`] order): usage and overflow bytes (zero without a governor).
    pub(crate) usage: [u64; 3],
    pub(crate) overflow: [u64; 3],
    /// Per engine: its limit at the sample (the rebalancer moves it; zero without a governor).
    pub(crate) limit: [u64; 3],
    /// Every engine's limit summed (all of [`EngineId::ALL`], read together).
    pub(crate) limits_sum: u64,
    /// Threads of the process.
    pub(crate) threads: u64,
    /// Live heap data: every engine's charged bytes plus its overflow (zero without a
    /// governor).
    pub(crate) live: u64,
}

/// The process's thread count, from `/proc/self/status` (0 if unreadable).
pub(crate) fn threads_now() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The resident set size now, from `/proc/self/statm` (0 if unreadable).
pub(crate) fn rss_now() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = text
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}

/// `VmHWM`, the kernel's record of the process's peak resident set, in bytes.
pub(crate) fn vm_hwm() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("reading /proc/self/status: {e}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| "no VmHWM line in /proc/self/status".to_owned())
}

/// The background sampler: one [`Sample`] every interval, and the governor's resident check
/// every 100 ms.
#[derive(Debug)]
pub(crate) struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<(Vec<Sample>, Peaks)>,
    latest: Arc<Mutex<Sample>>,
}

impl Sampler {
    pub(crate) fn spawn(
        gov: Option<&'static MemoryGovernor>,
        interval: Duration,
        started: Instant,
    ) -> std::io::Result<Sampler> {
        let stop = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(Mutex::new(Sample::default()));
        let (s, l) = (Arc::clone(&stop), Arc::clone(&latest));
        let handle = std::thread::Builder::new()
            .name("sampler".into())
            .spawn(move || {
                let mut samples = Vec::with_capacity(4096);
                let mut peaks = Peaks::default();
                // Resident feedback (purging, pushing overflow out) is the governor's own
                // background work since `install`; this thread only records.
                loop {
                    let done = s.load(Ordering::Acquire);
                    let mut x = Sample {
                        t_ms: started.elapsed().as_millis() as u64,
                        rss: rss_now(),
                        threads: threads_now(),
                        ..Sample::default()
                    };
                    if let Some(g) = gov {
                        let limits = g.limits();
                        x.limits_sum = limits.iter().sum();
                        x.live = EngineId::ALL
                            .iter()
                            .map(|&e| {
                                let b = g.budget(e);
                                b.used() + b.overflow_bytes()
                            })
                            .sum();
                        for (i, e) in ENGINES.into_iter().enumerate() {
                            x.usage[i] = g.usage(e);
                            x.overflow[i] = g.budget(e).overflow_bytes();
                            x.limit[i] = limits[e.index()];
                        }
                        peaks.observe(g, &x);
                    }
                    samples.push(x);
                    *l.lock().unwrap_or_else(PoisonError::into_inner) = x;
                    if done {
                        return (samples, peaks);
                    }
                    std::thread::sleep(interval);
                }
            })?;
        Ok(Sampler {
            stop,
            handle,
            latest,
        })
    }

    pub(crate) fn latest(&self) -> Sample {
        *self.latest.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stops the sampler after one last sample and returns the timeline and each engine's
    /// heap samples at its peak.
    pub(crate) fn finish(self) -> (Vec<Sample>, Peaks) {
        self.stop.store(true, Ordering::Release);
        self.handle.join().unwrap_or_default()
    }
}

pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

/// The live display: a redrawn table on a terminal, a plain line per interval otherwise.
#[derive(Debug)]
pub(crate) struct Display {
    terminal: bool,
    drawn: usize,
    last_ops: [u64; 3],
    last_at: Instant,
    last_plain: Option<Instant>,
    units: [&'static str; 3],
}

impl Display {
    pub(crate) fn new(units: [&'static str; 3]) -> Display {
        Display {
            terminal: std::io::stdout().is_terminal(),
            drawn: 0,
            last_ops: [0; 3],
            last_at: Instant::now(),
            last_plain: None,
            units,
        }
    }

    pub(crate) fn is_terminal(&self) -> bool {
        self.terminal
    }

    /// Shows the state now (call every few hundred milliseconds).
    pub(crate) fn show(
        &mut self,
        elapsed: Duration,
        ceiling: u64,
        sample: Sample,
        gov: Option<&MemoryGovernor>,
        stats: &[Arc<EngineStats>; 3],
    ) {
        let now = Instant::now();
        let dt = now.duration_since(self.last_at).as_secs_f64().max(1e-3);
        let mut rates = [0f64; 3];
        for (i, s) in stats.iter().enumerate() {
            let ops = s.ops();
            rates[i] = (ops - self.last_ops[i]) as f64 / dt;
            self.last_ops[i] = ops;
        }
        self.last_at = now;
        let rate = |r: f64| {
            if r >= 1e6 {
                format!("{:.1}M", r / 1e6)
            } else if r >= 1e3 {
                format!("{:.1}k", r / 1e3)
            } else {
                format!("{r:.0}")
            }
        };
        if !self.terminal {
            if self
                .last_plain
                .is_some_and(|t| now.duration_since(t) < Duration::from_secs(2))
            {
                return;
            }
            self.last_plain = Some(now);
            let mut line = format!(
                "[{:>5.1}s] rss {} / {}",
                elapsed.as_secs_f64(),
                mib(sample.rss),
                mib(ceiling)
            );
            for (i, e) in ENGINES.into_iter().enumerate() {
                let usage = gov.map_or("-".to_owned(), |_| {
                    format!("{}/{}", mib(sample.usage[i]), mib(sample.limit[i]))
                });
                let state = if stats[i].is_done() {
                    "done".to_owned()
                } else {
                    format!("{} {}/s", rate(rates[i]), self.units[i])
                };
                line.push_str(&format!(" | {e} {usage} {state}"));
            }
            println!("{line}");
            return;
        }
        let mut out = String::new();
        if self.drawn > 0 {
            out.push_str(&format!("\x1b[{}A\x1b[J", self.drawn));
        }
        let lines = self.table(elapsed, ceiling, sample, gov, stats, rates, rate);
        self.drawn = lines.len();
        for l in lines {
            out.push_str(&l);
            out.push('\n');
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }

    #[expect(
        clippy::too_many_arguments,
        reason = "one call site; the figures of one frame"
    )]
    fn table(
        &self,
        elapsed: Duration,
        ceiling: u64,
        sample: Sample,
        gov: Option<&MemoryGovernor>,
        stats: &[Arc<EngineStats>; 3],
        rates: [f64; 3],
        rate: impl Fn(f64) -> String,
    ) -> Vec<String> {
        let mut lines = vec![format!(
            "  {:>5.1} s   resident {} of the {} ceiling ({:.0} %){}",
            elapsed.as_secs_f64(),
            mib(sample.rss),
            ByteSize(ceiling),
            sample.rss as f64 * 100.0 / ceiling as f64,
            gov.map_or(String::new(), |g| format!(
                ", global pressure {}",
                g.global_pressure().name()
            ))
        )];
        lines.push(format!(
            "  {:<11} {:>25} {:>11} {:>9} {:>11} {:>7} {:>10} {:>16}",
            "engine",
            "usage / limit",
            "vs budget",
            "pressure",
            "overflow",
            "spills",
            "rejected",
            "throughput"
        ));
        for (i, e) in ENGINES.into_iter().enumerate() {
            let limit = sample.limit[i];
            let (usage, moved, pressure) = match gov {
                Some(g) => (
                    format!(
                        "{} / {} ({:>3.0}%)",
                        mib(sample.usage[i]).trim_end_matches(" MiB"),
                        mib(limit),
                        sample.usage[i] as f64 * 100.0 / limit.max(1) as f64
                    ),
                    // Positive: borrowed from idle engines; negative: lent to busy ones.
                    {
                        let d = i128::from(limit) - i128::from(g.budget(e).base());
                        format!(
                            "{}{:.1}",
                            if d < 0 { "-" } else { "+" },
                            d.unsigned_abs() as f64 / f64::from(1 << 20)
                        )
                    },
                    g.pressure(e).name().to_owned(),
                ),
                None => ("(no governor)".to_owned(), "-".to_owned(), "-".to_owned()),
            };
            let state = if stats[i].is_done() {
                "done".to_owned()
            } else {
                format!("{} {}/s", rate(rates[i]), self.units[i])
            };
            lines.push(format!(
                "  {:<11} {:>25} {:>11} {:>9} {:>11} {:>7} {:>10} {:>16}",
                e.name(),
                usage,
                moved,
                pressure,
                mib(sample.overflow[i]),
                stats[i].spills(),
                stats[i].rejections(),
                state
            ));
        }
        lines
    }
}
