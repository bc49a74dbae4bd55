//! The timeseries engine: bulk ingest of generated points into an in-memory table, flushed as
//! Gorilla-compressed segments to a file when the spill controller says so (or, as without a
//! governor, when the table reaches its fixed size).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nodedb_mem::{EngineGuard, EngineId, MemoryGovernor, SpillAction, SpillConfig};

use crate::gorilla;
use crate::stats::{EngineStats, Rng};

/// What the engine is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct TsConfig {
    /// Number of series points are spread over.
    pub(crate) series: usize,
    /// Points to ingest (the engine also stops at the deadline).
    pub(crate) points: u64,
    /// Flush when the table's points take this many bytes (16 per point), governor or not.
    pub(crate) memtable_bytes: u64,
    /// The segment file.
    pub(crate) segments: PathBuf,
    pub(crate) seed: u64,
    pub(crate) deadline: Instant,
    /// Ingest in bursts this long, each ended by a flush of the table ...
    pub(crate) burst: Duration,
    /// ... and followed by this long idle (zero: ingest without pause).
    pub(crate) gap: Duration,
}

/// What the engine did.
#[derive(Debug, Clone, Default)]
pub(crate) struct TsOutcome {
    pub(crate) points: u64,
    pub(crate) elapsed: Duration,
    /// Flushes the spill controller asked for.
    pub(crate) pressure_flushes: u64,
    /// Flushes at the table's fixed size.
    pub(crate) size_flushes: u64,
    /// Flushes at the end of a burst, before an idle gap.
    pub(crate) burst_flushes: u64,
    /// Time spent flushing (ingest stalls).
    pub(crate) flush_time: Duration,
    pub(crate) raw_bytes: u64,
    pub(crate) compressed_bytes: u64,
    /// Segments decoded back and compared with the points they came from.
    pub(crate) segments_checked: u64,
    /// Segments that did not decode to their points (must be zero).
    pub(crate) segments_corrupt: u64,
}

#[derive(Debug, Default)]
struct Series {
    ts: Vec<i64>,
    vs: Vec<f64>,
}

/// Why a flush happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    Pressure,
    Size,
    Burst,
    End,
}

/// Runs the engine on the calling thread, under the Timeseries guard.
pub(crate) fn run(
    cfg: &TsConfig,
    gov: Option<&MemoryGovernor>,
    stats: &EngineStats,
) -> Result<TsOutcome, String> {
    let _guard = EngineGuard::enter(EngineId::Timeseries);
    let spill = gov
        .map(|g| g.spill_controller(EngineId::Timeseries, SpillConfig::default()))
        .transpose()
        .map_err(|e| e.to_string())?;
    let file = File::create(&cfg.segments)
        .map_err(|e| format!("creating {}: {e}", cfg.segments.display()))?;
    // With a governor, segments are written through a governed writer: what the flushes leave
    // in the page cache is charged to Timeseries and dropped behind past its page-cache budget,
    // so a flush streams through the cache instead of evicting other engines' pages.
    let sink = match gov {
        Some(g) => Sink::Governed(
            g.writer(EngineId::Timeseries, file)
                .map_err(|e| format!("governed writer: {e}"))?,
        ),
        None => Sink::Plain(file),
    };
    let mut out = BufWriter::new(sink);
    let series_n = cfg.series.max(1);
    let mut table: Vec<Series> = (0..series_n).map(|_| Series::default()).collect();
    let mut rng = Rng::new(cfg.seed);
    let mut last: Vec<f64> = (0..series_n).map(|i| 20.0 + i as f64 % 50.0).collect();
    let start_ms = 1_767_225_600_000i64; // 2026-01-01
    let mut o = TsOutcome::default();
    let mut in_table = 0u64;
    let started = Instant::now();
    const BATCH: u64 = 8192;

    let mut flush = |table: &mut Vec<Series>, reason: Reason, o: &mut TsOutcome| {
        let t0 = Instant::now();
        for (i, s) in table.iter_mut().enumerate() {
            if s.ts.is_empty() {
                continue;
            }
            let seg = gorilla::encode(&s.ts, &s.vs);
            // Check one series per flush end to end: the segment must decode to its points.
            if i == 0 {
                o.segments_checked += 1;
                let same = gorilla::decode(&seg).is_some_and(|(t, v)| {
                    t == s.ts && v.iter().zip(&s.vs).all(|(a, b)| a.to_bits() == b.to_bits())
                });
                o.segments_corrupt += u64::from(!same);
            }
            o.raw_bytes += s.ts.len() as u64 * 16;
            o.compressed_bytes += seg.len() as u64;
            out.write_all(&(i as u32).to_le_bytes())?;
            out.write_all(&(seg.len() as u32).to_le_bytes())?;
            out.write_all(&seg)?;
            // Give the memory back series by series, so a flush never needs more than one
            // segment's worth on top of the table.
            *s = Series::default();
        }
        out.flush()?;
        match reason {
            Reason::Pressure => o.pressure_flushes += 1,
            Reason::Size => o.size_flushes += 1,
            Reason::Burst => o.burst_flushes += 1,
            Reason::End => {}
        }
        o.flush_time += t0.elapsed();
        Ok::<(), std::io::Error>(())
    };

    let mut n = 0u64;
    let mut burst_started = Instant::now();
    while n < cfg.points && Instant::now() < cfg.deadline {
        if !cfg.gap.is_zero() && burst_started.elapsed() >= cfg.burst {
            // The burst is over: flush the table and stay idle for the gap (the governor
            // sees an idle engine and lends its limit to busy ones meanwhile).
            flush(&mut table, Reason::Burst, &mut o)
                .map_err(|e| format!("writing segments: {e}"))?;
            in_table = 0;
            let wake = (Instant::now() + cfg.gap).min(cfg.deadline);
            std::thread::sleep(wake.saturating_duration_since(Instant::now()));
            burst_started = Instant::now();
            continue;
        }
        let end = (n + BATCH).min(cfg.points);
        for i in n..end {
            let s = (i % series_n as u64) as usize;
            let k = (i / series_n as u64) as i64;
            // One point a second per series, with a few milliseconds of jitter; values a gauge
            // that moves on one reading in four, by up to one unit in steps of 0.25.
            let r = rng.next_u64();
            let t = start_ms + k * 1000 + (r % 5) as i64 - 2;
            let v = if (r >> 8) & 3 == 0 {
                last[s] + ((r >> 10) % 9) as f64 * 0.25 - 1.0
            } else {
                last[s]
            };
            last[s] = v;
            table[s].ts.push(t);
            table[s].vs.push(v);
        }
        in_table += end - n;
        stats.add_ops(end - n);
        n = end;

        let reason = match spill.as_ref().map(|c| c.poll()) {
            Some(SpillAction::BeginSpill { .. } | SpillAction::ContinueSpill { .. }) => {
                Some(Reason::Pressure)
            }
            _ if in_table * 16 >= cfg.memtable_bytes => Some(Reason::Size),
            _ => None,
        };
        if let Some(reason) = reason {
            flush(&mut table, reason, &mut o).map_err(|e| format!("writing segments: {e}"))?;
            in_table = 0;
            if reason == Reason::Pressure {
                stats
                    .spills
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
    flush(&mut table, Reason::End, &mut o).map_err(|e| format!("writing segments: {e}"))?;
    o.points = n;
    o.elapsed = started.elapsed();
    drop(table);
    let sink = out
        .into_inner()
        .map_err(|e| format!("writing segments: {}", e.error()))?;
    if let Sink::Governed(w) = sink {
        w.finish()
            .map_err(|e| format!("writing segments back: {e}"))?;
    }
    stats.finish();
    Ok(o)
}

/// Where segments go: the file itself, or a governed writer over it.
enum Sink {
    Plain(File),
    Governed(nodedb_mem::GovernedWriter),
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Plain(f) => f.write(buf),
            Sink::Governed(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Plain(f) => f.flush(),
            Sink::Governed(w) => w.flush(),
        }
    }
}
