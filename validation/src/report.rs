//! The run's results: the verdict, `report.json`, `timeline.csv` and `timeline.svg`.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::monitor::{ENGINES, Sample, mib};

/// One engine's figures.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct EngineReport {
    pub(crate) name: &'static str,
    /// The engine's budget (`null` without a governor).
    pub(crate) budget_bytes: Option<u64>,
    /// The highest usage the governor recorded (live bytes charged by the allocator, with
    /// reservations); `null` without a governor.
    pub(crate) peak_bytes: Option<u64>,
    /// The most bytes seen in the engine's overflow region (sampled).
    pub(crate) overflow_peak_bytes: Option<u64>,
    /// The most page cache the engine's governed file I/O left behind (exact for governed
    /// writers; sampled at each background tick for governed directories such as DataFusion's
    /// spill directory); `null` without a governor.
    pub(crate) page_cache_peak_bytes: Option<u64>,
    /// Limit lent to busy engines by rebalancing, in total (`null` without a governor).
    pub(crate) lent_bytes: Option<u64>,
    /// Limit borrowed from idle engines, in total.
    pub(crate) borrowed_bytes: Option<u64>,
    /// Lent limit taken back from borrowers when the engine became busy again, in total.
    pub(crate) taken_back_bytes: Option<u64>,
    /// Borrowed limit given back to lenders taking theirs back, in total.
    pub(crate) returned_bytes: Option<u64>,
    /// The lowest and highest limit sampled.
    pub(crate) limit_min_bytes: Option<u64>,
    pub(crate) limit_max_bytes: Option<u64>,
    /// Rebalancing moves that changed the engine's limit.
    pub(crate) moves: Option<u64>,
    pub(crate) spills: u64,
    pub(crate) rejections: u64,
    pub(crate) throughput: f64,
    pub(crate) throughput_unit: &'static str,
    /// Engine-specific figures.
    pub(crate) details: serde_json::Value,
}

/// One verdict line.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Check {
    pub(crate) name: String,
    pub(crate) passed: bool,
    pub(crate) detail: String,
}

impl Check {
    pub(crate) fn new(name: impl Into<String>, passed: bool, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            passed,
            detail: detail.into(),
        }
    }
}

/// `report.json`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Report {
    /// `"pass"` or `"fail"`.
    pub(crate) verdict: &'static str,
    /// Whether the governor ran (false for `--no-governor`).
    pub(crate) governor: bool,
    pub(crate) allocator: &'static str,
    pub(crate) ceiling_bytes: u64,
    /// `VmHWM` at the end of the run.
    pub(crate) peak_rss_bytes: u64,
    /// The highest sampled `VmRSS`.
    pub(crate) peak_sampled_rss_bytes: u64,
    /// The process's CPU time over the run (`getrusage`), user and system.
    pub(crate) cpu_user_seconds: f64,
    pub(crate) cpu_system_seconds: f64,
    /// With one engine alone: user + system CPU time per unit of its work (a vector query, a
    /// timeseries point, a GROUP BY row), in nanoseconds; the vector engine's build (a fixed
    /// amount of work for a given `--scale`) is included in its queries' cost.
    pub(crate) cpu_ns_per_unit: Option<f64>,
    /// The most live heap data at one sample: every engine's charged bytes plus what its
    /// overflow region holds, resident or pushed out (governor only).
    pub(crate) live_peak_bytes: Option<u64>,
    pub(crate) duration_seconds: f64,
    pub(crate) sample_interval_ms: u64,
    pub(crate) settings: serde_json::Value,
    pub(crate) engines: Vec<EngineReport>,
    pub(crate) checks: Vec<Check>,
    /// The overflow path's counters and the governor's last resident sample.
    pub(crate) governor_figures: serde_json::Value,
    /// Each engine's heap at its peak: its largest allocation sites, the sampled estimate
    /// against the exact ledger, and the files written (governor with profiling on only).
    pub(crate) heap_profiles: Vec<crate::heap::HeapReport>,
    pub(crate) note: String,
}

impl Report {
    pub(crate) fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// The verdict table printed at the end.
    pub(crate) fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "\n  {:<11} {:>12} {:>25} {:>12} {:>13} {:>7} {:>9} {:>22}",
            "engine",
            "budget",
            "limit min .. max",
            "peak",
            "overflow peak",
            "spills",
            "rejected",
            "throughput"
        );
        let opt = |v: Option<u64>| v.map_or("-".to_owned(), mib);
        for e in &self.engines {
            let range = match (e.limit_min_bytes, e.limit_max_bytes) {
                (Some(lo), Some(hi)) => format!("{} .. {}", mib(lo), mib(hi)),
                _ => "-".to_owned(),
            };
            let _ = writeln!(
                s,
                "  {:<11} {:>12} {:>25} {:>12} {:>13} {:>7} {:>9} {:>22}",
                e.name,
                opt(e.budget_bytes),
                range,
                opt(e.peak_bytes),
                opt(e.overflow_peak_bytes),
                e.spills,
                e.rejections,
                format!("{:.0} {}", e.throughput, e.throughput_unit)
            );
        }
        let live = match self.live_peak_bytes {
            Some(l) => format!("; live data at most {}", mib(l)),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "\n  peak RSS (VmHWM) {} against a ceiling of {}{live}",
            mib(self.peak_rss_bytes),
            mib(self.ceiling_bytes)
        );
        let per_unit = match self.cpu_ns_per_unit {
            Some(ns) => format!(", {ns:.1} ns per unit of work"),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "  CPU time {:.2} s user + {:.2} s system{per_unit}\n",
            self.cpu_user_seconds, self.cpu_system_seconds
        );
        if !self.heap_profiles.is_empty() {
            let _ = writeln!(
                s,
                "  heap at each engine's peak (sampled, scaled to the ledger):"
            );
        }
        for h in &self.heap_profiles {
            let error = match h.error_percent {
                // An engine whose heap is a few intervals holds no sample now and then: no
                // estimate, rather than "-100 %".
                _ if h.samples == 0 => {
                    format!(", none at a mean interval of {}", mib(h.interval_bytes))
                }
                Some(e) => format!(", estimate {e:+.1} % against the ledger"),
                None => String::new(),
            };
            let _ = writeln!(
                s,
                "    {:<11} {} of heap at {:.1} s ({} samples{error}); {}",
                h.engine,
                mib(h.exact_heap_bytes),
                h.at_seconds,
                h.samples,
                h.flamegraph
            );
            for site in h.top_sites.iter().take(3) {
                let _ = writeln!(s, "      {:>5.1} %  {}", site.share_percent, site.name);
            }
        }
        if !self.heap_profiles.is_empty() {
            s.push('\n');
        }
        for c in &self.checks {
            let _ = writeln!(
                s,
                "  [{}] {}: {}",
                if c.passed { "pass" } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        let _ = writeln!(
            s,
            "\nverdict: {}{}",
            self.verdict.to_uppercase(),
            if self.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.note)
            }
        );
        s
    }
}

/// Writes `timeline.csv`: one row per sample.
pub(crate) fn write_csv(path: &Path, samples: &[Sample]) -> std::io::Result<()> {
    let mut s = String::from("t_ms,rss_bytes,limits_sum_bytes");
    for e in ENGINES {
        let _ = write!(s, ",{e}_usage_bytes,{e}_overflow_bytes,{e}_limit_bytes");
    }
    s.push('\n');
    for x in samples {
        let _ = write!(s, "{},{},{}", x.t_ms, x.rss, x.limits_sum);
        for i in 0..ENGINES.len() {
            let _ = write!(s, ",{},{},{}", x.usage[i], x.overflow[i], x.limit[i]);
        }
        s.push('\n');
    }
    std::fs::write(path, s)
}

/// Writes `timeline.svg`: RSS and the ceiling, each engine's usage against its budget.
pub(crate) fn write_svg(
    path: &Path,
    samples: &[Sample],
    ceiling: u64,
    budgets: Option<[u64; 3]>,
    title: &str,
) -> Result<(), String> {
    let to_mib = |b: u64| b as f64 / f64::from(1 << 20);
    let t_end = samples
        .last()
        .map_or(0.1, |s| s.t_ms as f64 / 1000.0)
        .max(0.1);
    let top = samples
        .iter()
        .map(|s| s.rss)
        .chain([ceiling])
        .max()
        .unwrap_or(ceiling);
    let root = SVGBackend::new(path, (1100, 640)).into_drawing_area();
    let e = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..t_end, 0f64..to_mib(top) * 1.08)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MiB")
        .draw()
        .map_err(|x| e(&x))?;
    let line = |points: Vec<(f64, f64)>, style: ShapeStyle| LineSeries::new(points, style);
    let t = |s: &Sample| s.t_ms as f64 / 1000.0;
    chart
        .draw_series(line(
            vec![(0.0, to_mib(ceiling)), (t_end, to_mib(ceiling))],
            RED.stroke_width(2),
        ))
        .map_err(|x| e(&x))?
        .label(format!("ceiling {}", mib(ceiling)))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    chart
        .draw_series(line(
            samples.iter().map(|s| (t(s), to_mib(s.rss))).collect(),
            BLACK.stroke_width(2),
        ))
        .map_err(|x| e(&x))?
        .label("resident (VmRSS)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    if let Some(budgets) = budgets {
        let colours = [BLUE, GREEN, MAGENTA];
        for (i, engine) in ENGINES.into_iter().enumerate() {
            let c = colours[i];
            chart
                .draw_series(line(
                    samples.iter().map(|s| (t(s), to_mib(s.usage[i]))).collect(),
                    c.stroke_width(2),
                ))
                .map_err(|x| e(&x))?
                .label(format!("{engine} usage"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
            // The limit as the rebalancer moved it, drawn in steps.
            let mut steps = Vec::with_capacity(samples.len() * 2);
            for (k, s) in samples.iter().enumerate() {
                if k > 0 {
                    steps.push((t(s), to_mib(samples[k - 1].limit[i])));
                }
                steps.push((t(s), to_mib(s.limit[i])));
            }
            chart
                .draw_series(DashedLineSeries::new(steps, 6, 4, c.stroke_width(1)))
                .map_err(|x| e(&x))?
                .label(format!("{engine} limit (budget {})", mib(budgets[i])))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(1))
                });
            if samples.iter().any(|s| s.overflow[i] > 0) {
                chart
                    .draw_series(line(
                        samples
                            .iter()
                            .map(|s| (t(s), to_mib(s.overflow[i])))
                            .collect(),
                        c.mix(0.45).stroke_width(1),
                    ))
                    .map_err(|x| e(&x))?
                    .label(format!("{engine} overflow"))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 20, y)], c.mix(0.45).stroke_width(1))
                    });
            }
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Sample> {
        (0..20)
            .map(|i| Sample {
                t_ms: i * 25,
                rss: (100 + i) << 20,
                usage: [i << 20, (2 * i) << 20, (3 * i) << 20],
                overflow: [0, 0, u64::from(i > 10) << 20],
                limit: [64 << 20, (64 + u64::from(i > 5)) << 20, 64 << 20],
                limits_sum: 192 << 20,
                threads: 4,
                live: 0,
            })
            .collect()
    }

    #[test]
    fn the_csv_has_a_header_and_one_row_per_sample() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let p = dir.path().join("t.csv");
        write_csv(&p, &samples()).expect("writes");
        let text = std::fs::read_to_string(&p).expect("reads");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "t_ms,rss_bytes,limits_sum_bytes,vector_usage_bytes,vector_overflow_bytes,\
             vector_limit_bytes,timeseries_usage_bytes,timeseries_overflow_bytes,\
             timeseries_limit_bytes,query_usage_bytes,query_overflow_bytes,query_limit_bytes"
        );
        assert_eq!(lines.len(), 21);
        assert_eq!(
            lines[12],
            "275,116391936,201326592,11534336,0,67108864,23068672,0,68157440,34603008,1048576,\
             67108864"
        );
    }

    #[test]
    fn the_plot_names_every_series() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let p = dir.path().join("t.svg");
        write_svg(&p, &samples(), 1 << 30, Some([64 << 20; 3]), "test").expect("draws");
        let svg = std::fs::read_to_string(&p).expect("reads");
        for label in [
            "ceiling 1024.0 MiB",
            "resident (VmRSS)",
            "vector usage",
            "timeseries limit (budget 64.0 MiB)",
            "query overflow",
        ] {
            assert!(svg.contains(label), "{label} missing");
        }
        assert!(!svg.contains("vector overflow"));
    }
}
