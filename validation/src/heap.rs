//! Each engine's heap profile at its peak: the sampler thread keeps the engine's live heap
//! samples whenever its usage reaches a new high (by 2 % and by a 64th of its limit, or by
//! any amount a second after the last), and after the run they are resolved into `heap-<engine>.pb.gz` (pprof),
//! `heap-<engine>.svg` (a flame graph) and `report.json`'s top sites. Taking samples is a scan
//! of the sampler's table (about a millisecond); resolving stacks, which reads the binary's
//! symbols, waits until the run is measured.

use std::path::Path;

use nodedb_mem::{HeapProfile, HeapSamples, MemoryGovernor};
use serde::Serialize;

use crate::monitor::{ENGINES, Sample};

/// An engine's samples at its highest usage so far.
#[derive(Debug)]
pub(crate) struct Peak {
    at_ms: u64,
    usage: u64,
    samples: HeapSamples,
}

/// The samples of each engine (in [`ENGINES`] order) at its peak, and what taking them cost.
#[derive(Debug, Default)]
pub(crate) struct Peaks {
    peaks: [Option<Peak>; 3],
    takes: [u64; 3],
    taking: [std::time::Duration; 3],
}

/// Samples are taken again when usage passes the last peak by this fraction (1/50: 2 %) and
/// by this fraction of the engine's limit (1/64: an engine growing from nothing is not
/// scanned at every step of its way up; each take scans the sampler's whole table)...
const REGROWTH: u64 = 50;
const REGROWTH_OF_LIMIT: u64 = 64;
/// ...or by any amount this long after the last were taken.
const RETAKE_MS: u64 = 1000;

impl Peaks {
    /// Takes an engine's samples if `x` shows its usage at a new high (see the module's
    /// documentation).
    pub(crate) fn observe(&mut self, gov: &MemoryGovernor, x: &Sample) {
        if gov.heap_profiling() == 0 {
            return;
        }
        for (i, e) in ENGINES.into_iter().enumerate() {
            let usage = x.usage[i];
            let (best, at) = self.peaks[i]
                .as_ref()
                .map_or((0, 0), |p| (p.usage, p.at_ms));
            let step = (best / REGROWTH).max(x.limit[i] / REGROWTH_OF_LIMIT);
            let higher =
                usage > best + step || (usage > best && x.t_ms.saturating_sub(at) >= RETAKE_MS);
            if usage > 0 && higher {
                let began = std::time::Instant::now();
                let samples = gov.heap_samples(Some(e));
                self.taking[i] += began.elapsed();
                self.takes[i] += 1;
                self.peaks[i] = Some(Peak {
                    at_ms: x.t_ms,
                    usage,
                    samples,
                });
            }
        }
    }
}

/// One allocation site in `report.json`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct SiteReport {
    /// The innermost function outside the standard library's allocation machinery.
    pub(crate) name: String,
    /// Live bytes: the site's sampled share of the engine's heap times the exact heap.
    pub(crate) bytes: u64,
    /// The share of the engine's heap, in percent.
    pub(crate) share_percent: f64,
    /// The sampled estimate before scaling, and the samples behind it.
    pub(crate) sampled_bytes: u64,
    pub(crate) samples: usize,
}

/// One engine's heap at its peak in `report.json`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HeapReport {
    pub(crate) engine: &'static str,
    /// Seconds from the start when the samples were taken.
    pub(crate) at_seconds: f64,
    /// The engine's usage (heap and reservations) then.
    pub(crate) usage_bytes: u64,
    /// The ledger's exact live heap bytes of the engine then, and the sampled estimate.
    pub(crate) exact_heap_bytes: u64,
    pub(crate) estimated_heap_bytes: u64,
    /// `(estimated - exact) / exact`, in percent.
    pub(crate) error_percent: Option<f64>,
    /// The mean sampling interval, in bytes.
    pub(crate) interval_bytes: u64,
    pub(crate) samples: usize,
    pub(crate) sites: usize,
    /// How many times the engine's samples were taken over the run (each new high), and the
    /// time taking them cost the sampler thread, in milliseconds.
    pub(crate) takes: u64,
    pub(crate) taking_ms: f64,
    /// The largest sites by name (the innermost function outside the standard library's
    /// allocation machinery; stacks ending in the same function summed), up to ten.
    pub(crate) top_sites: Vec<SiteReport>,
    /// The files written: the pprof profile and the flame graph.
    pub(crate) pprof: String,
    pub(crate) flamegraph: String,
}

/// Resolves each engine's peak samples and writes its profile and flame graph into `out`.
pub(crate) fn write(out: &Path, peaks: Peaks) -> Result<Vec<HeapReport>, String> {
    let mut reports = Vec::new();
    let (takes, taking) = (peaks.takes, peaks.taking);
    for (i, peak) in peaks.peaks.into_iter().enumerate() {
        let Some(peak) = peak else { continue };
        let name = ENGINES[i].name();
        let profile = peak.samples.resolve();
        let pprof = format!("heap-{name}.pb.gz");
        let flamegraph = format!("heap-{name}.svg");
        std::fs::write(out.join(&pprof), profile.to_pprof())
            .map_err(|e| format!("writing {pprof}: {e}"))?;
        let svg = profile
            .to_flamegraph_svg()
            .map_err(|e| format!("drawing {flamegraph}: {e}"))?;
        std::fs::write(out.join(&flamegraph), svg)
            .map_err(|e| format!("writing {flamegraph}: {e}"))?;
        let exact = profile.exact_bytes;
        reports.push(HeapReport {
            engine: name,
            at_seconds: peak.at_ms as f64 / 1000.0,
            usage_bytes: peak.usage,
            exact_heap_bytes: exact,
            estimated_heap_bytes: profile.estimated_bytes().round() as u64,
            error_percent: profile.error().map(|e| e * 100.0),
            interval_bytes: profile.interval,
            samples: peak.samples.len(),
            sites: profile.sites.len(),
            takes: takes[i],
            taking_ms: taking[i].as_secs_f64() * 1000.0,
            top_sites: top_sites(&profile, 10),
            pprof,
            flamegraph,
        });
    }
    Ok(reports)
}

/// The `n` largest sites by name: the stacks that end in the same function summed (the flame
/// graph and the pprof profile keep them apart).
fn top_sites(profile: &HeapProfile, n: usize) -> Vec<SiteReport> {
    let exact = profile.exact_bytes;
    profile
        .by_function()
        .into_iter()
        .take(n)
        .map(|f| SiteReport {
            share_percent: if exact > 0 {
                f.bytes * 100.0 / exact as f64
            } else {
                0.0
            },
            name: f.function,
            bytes: f.bytes.round() as u64,
            sampled_bytes: f.sampled_bytes.round() as u64,
            samples: f.samples,
        })
        .collect()
}
