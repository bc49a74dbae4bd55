//! Heap profiles per engine: which code holds each engine's memory, from the allocator's
//! samples (`nodedb_mem_alloc::ctl::profile`), each block's engine known by its address, and
//! checked against the exact ledger.
//!
//! Sampling is on at the interval set with [`GovernorBuilder::heap_profile_interval`]
//! (or [`MemoryGovernor::set_heap_profiling`] at run time); [`MemoryGovernor::heap_profile`]
//! resolves the live samples' stacks in-process and returns a [`HeapProfile`], which writes
//! itself as pprof (gzip-compressed protobuf, for `pprof` and `go tool pprof`), as folded
//! stacks, or as a flame-graph SVG.
//!
//! ```
//! use nodedb_mem::{EngineId, MemoryGovernor};
//!
//! let gov = MemoryGovernor::builder().global_ceiling(1 << 30).build().unwrap();
//! gov.set_heap_profiling(64 << 10);
//! let profile = gov.heap_profile(Some(EngineId::Query));
//! // Without `GovernedAlloc` as the global allocator nothing is sampled.
//! assert!(profile.sites.is_empty());
//! let pprof = profile.to_pprof();
//! assert_eq!(&pprof[..2], &[0x1f, 0x8b]); // gzip
//! gov.set_heap_profiling(0);
//! ```
//!
//! [`GovernorBuilder::heap_profile_interval`]: crate::GovernorBuilder::heap_profile_interval

mod pprof;
mod top;

pub(crate) use top::TopSitesCache;

use std::collections::HashMap;
use std::fmt::Write as _;

use nodedb_mem_alloc::ctl::profile as sampler;

use crate::{EngineGuard, EngineId, MemoryGovernor, Scope, ScopeId};

pub use nodedb_mem_alloc::ctl::profile::{DEFAULT_SAMPLE_INTERVAL, SampleCounts};

/// One frame of a call stack, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// The function (demangled), or `"??"` when no symbol covers the address.
    pub function: String,
    /// Its source file and line, where debug information says.
    pub file: Option<String>,
    /// The line in `file`.
    pub line: Option<u32>,
    /// The return address (or, for the innermost frame, the instruction) it was taken at.
    pub address: usize,
}

/// One allocation site: a call stack and the live memory sampled there.
#[derive(Clone, Debug, PartialEq)]
pub struct Site {
    /// The engine that owns the memory.
    pub engine: EngineId,
    /// The stack, innermost (the allocating call) first, the allocator's own frames left out.
    pub frames: Vec<Frame>,
    /// Live bytes: the sampled estimate scaled so the profile's sites add up to the ledger's
    /// exact figure (the sampled shares, the exact total).
    pub bytes: f64,
    /// The sampled estimate itself: each sample stands for its size over its chance of being
    /// sampled.
    pub sampled_bytes: f64,
    /// Estimated live blocks.
    pub blocks: f64,
    /// Samples behind the estimate.
    pub samples: usize,
    /// The scope the allocating thread was tagged with ([`Scope::tag_thread`]), if any.
    pub scope: Option<ScopeId>,
    /// That scope's path, where it still existed when the samples were taken.
    pub scope_path: Option<String>,
}

impl Site {
    /// The innermost frame outside the standard library's allocation machinery, as a short
    /// name for reports (`"??"` for an empty stack).
    pub fn name(&self) -> &str {
        short_name(&self.frames)
    }
}

/// The innermost function of `frames` outside the standard library's allocation machinery
/// (the first frame's where all are; `"??"` for none).
fn short_name(frames: &[Frame]) -> &str {
    frames
        .iter()
        .map(|f| f.function.as_str())
        .find(|f| !is_plumbing(f))
        .or_else(|| frames.first().map(|f| f.function.as_str()))
        .unwrap_or("??")
}

/// One function's live bytes over every stack it allocated from: a row of
/// [`HeapProfile::by_function`].
#[derive(Clone, Debug, PartialEq)]
pub struct FunctionBytes {
    /// The function, as [`Site::name`] names a site.
    pub function: String,
    /// Its sites' [`bytes`](Site::bytes) summed (scaled to the ledger).
    pub bytes: f64,
    /// Its sites' [`sampled_bytes`](Site::sampled_bytes) summed.
    pub sampled_bytes: f64,
    /// Its sites' samples.
    pub samples: usize,
    /// How many sites (stacks, scopes, engines) it was merged from.
    pub sites: usize,
}

/// The live heap of one engine (or all), by allocation site.
#[derive(Clone, Debug, PartialEq)]
pub struct HeapProfile {
    /// The engine profiled (`None`: all).
    pub engine: Option<EngineId>,
    /// The mean sampling interval when the profile was taken (bytes; 0: sampling was off,
    /// the profile holds what was sampled before).
    pub interval: u64,
    /// Sites by estimated bytes, largest first.
    pub sites: Vec<Site>,
    /// The exact live heap bytes of the engine(s) from the ledger, to judge the estimate by.
    pub exact_bytes: u64,
}

impl HeapProfile {
    /// The sampled estimate of the live bytes, before scaling to the ledger: the sum of the
    /// sites' [`sampled_bytes`](Site::sampled_bytes).
    pub fn estimated_bytes(&self) -> f64 {
        self.sites.iter().map(|s| s.sampled_bytes).sum()
    }

    /// `(estimated - exact) / exact`: how far the sampled estimate is from the ledger
    /// (`None` when the ledger holds nothing). The sites' `bytes` are scaled by `1 / (1 +
    /// error)`; an error far from 0 at a fine interval says the samples miss blocks (sampling
    /// turned on after they were allocated, or blocks in overflow, which are not sampled).
    pub fn error(&self) -> Option<f64> {
        (self.exact_bytes > 0)
            .then(|| (self.estimated_bytes() - self.exact_bytes as f64) / self.exact_bytes as f64)
    }

    /// The `n` largest sites.
    pub fn top(&self, n: usize) -> &[Site] {
        &self.sites[..n.min(self.sites.len())]
    }

    /// The sites merged by function ([`Site::name`]: the innermost frame outside the
    /// allocation machinery), largest `bytes` first, ties by name: what `pprof -top` lists by
    /// flat bytes, the question "which code holds the memory" answered without the callers
    /// that split one function over many stacks.
    pub fn by_function(&self) -> Vec<FunctionBytes> {
        let mut at: HashMap<&str, usize> = HashMap::new();
        let mut rows: Vec<FunctionBytes> = Vec::new();
        for s in &self.sites {
            let name = s.name();
            let i = *at.entry(name).or_insert_with(|| {
                rows.push(FunctionBytes {
                    function: name.to_owned(),
                    bytes: 0.0,
                    sampled_bytes: 0.0,
                    samples: 0,
                    sites: 0,
                });
                rows.len() - 1
            });
            let r = &mut rows[i];
            r.bytes += s.bytes;
            r.sampled_bytes += s.sampled_bytes;
            r.samples += s.samples;
            r.sites += 1;
        }
        rows.sort_by(|a, b| {
            b.bytes
                .total_cmp(&a.bytes)
                .then_with(|| a.function.cmp(&b.function))
        });
        rows
    }

    /// The live bytes of the sites tagged with `scope` (scaled as every site's are). The
    /// ledger counts heap bytes by engine, not by scope: this is the sampled figure alone.
    pub fn scope_bytes(&self, scope: ScopeId) -> f64 {
        self.sites
            .iter()
            .filter(|s| s.scope == Some(scope))
            .map(|s| s.bytes)
            .sum()
    }

    /// Folded stacks, one line per site: `engine;outermost;…;innermost bytes`, with a frame
    /// `scope:<path>` after the engine for a tagged site (the input of `flamegraph.pl` and
    /// `inferno-flamegraph`).
    pub fn to_folded(&self) -> String {
        let mut out = String::new();
        for s in &self.sites {
            out.push_str(s.engine.name());
            if let Some(scope) = s.scope {
                let name = s.scope_path.clone().unwrap_or_else(|| scope.to_string());
                out.push_str(";scope:");
                out.push_str(&name.replace([';', ' '], "_"));
            }
            for f in s.frames.iter().rev() {
                out.push(';');
                out.push_str(&f.function.replace([';', ' '], "_"));
            }
            let _ = writeln!(out, " {}", s.bytes.round() as u64);
        }
        out
    }

    /// The profile in pprof's format: a gzip-compressed `perftools.profiles.Profile` with
    /// sample types `inuse_objects`/`count` and `inuse_space`/`bytes`, each sample labelled
    /// with its `engine`.
    pub fn to_pprof(&self) -> Vec<u8> {
        pprof::encode(self)
    }

    /// A flame graph of the profile, as SVG (a one-line picture saying so when nothing was
    /// sampled).
    pub fn to_flamegraph_svg(&self) -> std::io::Result<Vec<u8>> {
        if self.sites.is_empty() {
            return Ok(concat!(
                r#"<?xml version="1.0" standalone="no"?>"#,
                r#"<svg version="1.1" width="600" height="40" xmlns="http://www.w3.org/2000/svg">"#,
                r#"<text x="10" y="24">no live sampled blocks</text></svg>"#
            )
            .as_bytes()
            .to_vec());
        }
        let folded = self.to_folded();
        let mut options = inferno::flamegraph::Options::default();
        options.title = format!(
            "live heap: {}",
            self.engine.map_or("all engines", EngineId::name)
        );
        options.count_name = "bytes".to_string();
        let mut svg = Vec::new();
        inferno::flamegraph::from_lines(&mut options, folded.lines(), &mut svg)
            .map_err(std::io::Error::other)?;
        Ok(svg)
    }
}

/// Frames of the allocator, the sampler and the standard library's allocation entry points:
/// left out of stacks (innermost first, up to the first frame that is none of these).
fn is_internal(function: &str) -> bool {
    const INTERNAL: &[&str] = &[
        "nodedb_mem_alloc::",
        "<nodedb_mem_alloc::",
        "backtrace::",
        "__rustc::",
        "__rust_alloc",
        "__rust_realloc",
        "alloc::alloc::",
        "std::alloc::",
        "<std::alloc::",
        "_rjem_",
    ];
    INTERNAL.iter().any(|p| function.starts_with(p)) || function == "??"
}

/// The standard library's allocation entry points, which call the global allocator:
/// `__rust_alloc`, `__rust_realloc`, `__rust_alloc_zeroed` (`__rustc::…` in newer
/// toolchains).
fn is_entry_point(function: &str) -> bool {
    let f = function.strip_prefix("__rustc::").unwrap_or(function);
    matches!(
        f,
        "__rust_alloc" | "__rust_realloc" | "__rust_alloc_zeroed" | "__rust_dealloc"
    )
}

/// Library frames a report's short name looks past (the site is the caller).
fn is_plumbing(function: &str) -> bool {
    const PLUMBING: &[&str] = &[
        "alloc::",
        "<alloc::",
        "core::",
        "<core::",
        "std::",
        "<std::",
        "hashbrown::",
        "<hashbrown::",
    ];
    // A trait method of the library on any type: `<u8 as alloc::vec::…>::from_elem`.
    let trait_path = function.split_once(" as ").map_or("", |(_, rest)| rest);
    PLUMBING
        .iter()
        .any(|p| function.starts_with(p) || trait_path.starts_with(p))
}

/// Resolves return addresses to frames (inlined calls expanded, innermost first), once each.
#[derive(Default)]
struct Symbols {
    cache: HashMap<usize, Vec<Frame>>,
}

impl Symbols {
    fn frames(&mut self, address: usize, innermost: bool) -> &[Frame] {
        self.cache.entry(address).or_insert_with(|| {
            // A return address points after the call: resolve the call itself.
            let at = if innermost {
                address
            } else {
                address.saturating_sub(1)
            };
            let mut frames = Vec::new();
            backtrace::resolve(at as *mut std::ffi::c_void, |sym| {
                frames.push(Frame {
                    function: sym
                        .name()
                        .map_or_else(|| "??".to_string(), |n| format!("{n:#}")),
                    file: sym.filename().map(|p| p.display().to_string()),
                    line: sym.lineno(),
                    address,
                });
            });
            if frames.is_empty() {
                frames.push(Frame {
                    function: "??".to_string(),
                    file: None,
                    line: None,
                    address,
                });
            }
            frames
        })
    }

    /// A sample's stack, resolved, the allocator's own frames left out: everything up to the
    /// standard library's allocation entry point (`__rust_alloc` and kin), so that a global
    /// allocator wrapping `GovernedAlloc` is left out too; without one, the frames of the
    /// allocator, the sampler and the standard library's allocation functions on top.
    fn stack(&mut self, addresses: &[usize]) -> Vec<Frame> {
        let mut out = Vec::new();
        for (i, &a) in addresses.iter().enumerate() {
            out.extend_from_slice(self.frames(a, i == 0));
        }
        let internal = match out.iter().rposition(|f| is_entry_point(&f.function)) {
            Some(entry) => entry + 1,
            None => out.iter().take_while(|f| is_internal(&f.function)).count(),
        };
        if internal == out.len() {
            return out;
        }
        out.drain(..internal);
        out
    }
}

/// The live samples of one engine (or of every engine) taken at one moment, their stacks not
/// yet resolved: cheap to take (a scan of the sampler's table, no symbol lookup), kept to be
/// [resolved](HeapSamples::resolve) into a [`HeapProfile`] later — after a measurement, say,
/// or on another thread.
#[derive(Clone, Debug)]
pub struct HeapSamples {
    engine: Option<EngineId>,
    interval: u64,
    samples: Vec<sampler::LiveSample>,
    /// The ledger's live heap bytes of each engine when the samples were taken.
    exact: [u64; EngineId::COUNT],
    /// The paths of the scopes the samples are tagged with, where they still exist.
    scope_paths: HashMap<u64, String>,
}

impl HeapSamples {
    /// The engine sampled (`None`: all).
    pub fn engine(&self) -> Option<EngineId> {
        self.engine
    }

    /// How many live samples were taken.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether nothing was sampled.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The ledger's exact live heap bytes of the engine(s) when the samples were taken.
    pub fn exact_bytes(&self) -> u64 {
        self.engines().map(|e| self.exact[e.index()]).sum()
    }

    /// The engines covered: the one asked for, or every engine with an arena.
    fn engines(&self) -> impl Iterator<Item = EngineId> + '_ {
        EngineId::ALL.into_iter().filter(|&e| match self.engine {
            Some(one) => e == one,
            None => e != EngineId::Unattributed,
        })
    }

    /// The profile: stacks resolved in this process (which must be the one that took the
    /// samples), the sites of each engine scaled to its exact bytes at the time of taking.
    pub fn resolve(&self) -> HeapProfile {
        // The symbol reader's caches (the binary's debug information, kept for the life of
        // the process) are the governor's, not the calling engine's.
        let _own = EngineGuard::enter(EngineId::Unattributed);
        let mut symbols = Symbols::default();
        let mut sites: HashMap<(EngineId, u64, &[usize]), Site> = HashMap::new();
        for s in &self.samples {
            let blocks = if s.size > 0 {
                s.weight / s.size as f64
            } else {
                0.0
            };
            let site = sites
                .entry((s.engine, s.tag, &s.stack))
                .or_insert_with(|| Site {
                    engine: s.engine,
                    frames: symbols.stack(&s.stack),
                    bytes: 0.0,
                    sampled_bytes: 0.0,
                    blocks: 0.0,
                    samples: 0,
                    scope: (s.tag != 0).then_some(ScopeId(s.tag)),
                    scope_path: self.scope_paths.get(&s.tag).cloned(),
                });
            site.sampled_bytes += s.weight;
            site.blocks += blocks;
            site.samples += 1;
        }
        let mut sites: Vec<Site> = sites.into_values().collect();
        for e in self.engines() {
            let sampled: f64 = sites
                .iter()
                .filter(|s| s.engine == e)
                .map(|s| s.sampled_bytes)
                .sum();
            let exact = self.exact[e.index()];
            let scale = if sampled > 0.0 && exact > 0 {
                exact as f64 / sampled
            } else {
                1.0
            };
            for s in sites.iter_mut().filter(|s| s.engine == e) {
                s.bytes = s.sampled_bytes * scale;
                s.blocks *= scale;
            }
        }
        drop(symbols);
        // The reader's mapped binary and parsed symbols are given back (see `top.rs`): a
        // profile is asked for now and then, and pays the reading each time.
        backtrace::clear_symbol_cache();
        sites.sort_by(|a, b| b.bytes.total_cmp(&a.bytes));
        HeapProfile {
            engine: self.engine,
            interval: self.interval,
            sites,
            exact_bytes: self.exact_bytes(),
        }
    }
}

/// Takes the live samples of `engine` (every engine with an arena with `None`), with each
/// engine's exact live bytes `exact_of(engine)`.
pub(crate) fn take(
    engine: Option<EngineId>,
    exact_of: impl Fn(EngineId) -> u64,
    path_of: impl Fn(ScopeId) -> Option<String>,
) -> HeapSamples {
    let samples = sampler::live_samples(engine);
    let mut scope_paths = HashMap::new();
    for s in &samples {
        if s.tag != 0
            && !scope_paths.contains_key(&s.tag)
            && let Some(path) = path_of(ScopeId(s.tag))
        {
            scope_paths.insert(s.tag, path);
        }
    }
    HeapSamples {
        engine,
        interval: sampler::sample_interval(),
        samples,
        exact: EngineId::ALL.map(exact_of),
        scope_paths,
    }
}

/// While it lives, the calling thread's heap-profile samples carry a scope (see
/// [`Scope::tag_thread`]); dropping it restores the tag before.
#[must_use = "the thread is tagged only while the guard lives"]
#[derive(Debug)]
pub struct ScopeTag {
    previous: u64,
    /// Tags are the thread's: the guard stays on it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for ScopeTag {
    fn drop(&mut self) {
        sampler::set_thread_tag(self.previous);
    }
}

impl Scope {
    /// Tags the calling thread with this scope until the guard drops: heap-profile samples
    /// it takes meanwhile carry the scope, so a profile says which scope's work (a query, a
    /// tenant) allocated what. Allocations are still charged by engine ([`EngineGuard`]);
    /// a scope governs its reservations. Guards nest; the innermost tags.
    ///
    /// ```
    /// # use nodedb_mem::MemoryGovernor;
    /// let gov = MemoryGovernor::builder().global_ceiling(1 << 30).build().unwrap();
    /// let tenant = gov.create_scope("acme", None, 256 << 20).unwrap();
    /// {
    ///     let _tag = tenant.tag_thread();
    ///     // allocations here are sampled with the scope `acme`
    /// }
    /// ```
    pub fn tag_thread(&self) -> ScopeTag {
        ScopeTag {
            previous: sampler::set_thread_tag(self.id().get()),
            _not_send: std::marker::PhantomData,
        }
    }
}

impl MemoryGovernor {
    /// Samples heap allocations for profiles at a mean interval of `bytes` allocated per
    /// thread from now on (`0` stops sampling; blocks already sampled stay in profiles until
    /// freed). Takes effect only with `GovernedAlloc` as the global allocator.
    pub fn set_heap_profiling(&self, bytes: u64) {
        sampler::set_sample_interval(bytes);
    }

    /// The heap-profile sampling interval in bytes (0: off).
    pub fn heap_profiling(&self) -> u64 {
        sampler::sample_interval()
    }

    /// The sampler's counts: samples taken, dropped, live, stacks stored.
    pub fn heap_profile_counts(&self) -> SampleCounts {
        sampler::sample_counts()
    }

    /// The live heap of `engine` (all engines with `None`) by allocation site, stacks
    /// resolved in this process, with the exact ledger figure beside the estimate. Allocates
    /// (the profile charged to the calling thread's engine, the symbol reader's caches to
    /// `Unattributed`); takes milliseconds for thousands of
    /// samples, longer the first time symbols are read.
    pub fn heap_profile(&self, engine: Option<EngineId>) -> HeapProfile {
        self.heap_samples(engine).resolve()
    }

    /// The live samples of `engine` (all engines with `None`) now, stacks unresolved: what
    /// [`heap_profile`](Self::heap_profile) resolves, to keep and resolve later. Takes about a
    /// millisecond (a scan of the sampler's table) and allocates the samples.
    pub fn heap_samples(&self, engine: Option<EngineId>) -> HeapSamples {
        nodedb_mem_alloc::ctl::thread::flush_thread();
        take(engine, nodedb_mem_alloc::ctl::ledger::charged, |id| {
            self.scope_by_id(id).map(|s| s.path().to_owned())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(engine: EngineId, functions: &[&str], bytes: f64, samples: usize) -> Site {
        Site {
            engine,
            frames: functions
                .iter()
                .map(|f| Frame {
                    function: (*f).to_owned(),
                    file: None,
                    line: None,
                    address: 0,
                })
                .collect(),
            bytes,
            sampled_bytes: bytes * 2.0,
            blocks: 1.0,
            samples,
            scope: None,
            scope_path: None,
        }
    }

    #[test]
    fn by_function_merges_the_stacks_of_one_function_and_orders_by_bytes() {
        let profile = HeapProfile {
            engine: None,
            interval: 1 << 20,
            sites: vec![
                site(EngineId::Query, &["hash_table", "aggregate"], 300.0, 3),
                site(EngineId::Query, &["rows", "scan"], 250.0, 2),
                site(EngineId::Query, &["hash_table", "join"], 200.0, 2),
                // The allocation machinery is not the function.
                site(
                    EngineId::Vector,
                    &["alloc::raw_vec::finish_grow", "rows", "insert"],
                    100.0,
                    1,
                ),
                site(EngineId::Vector, &["b_tie"], 50.0, 1),
                site(EngineId::Vector, &["a_tie"], 50.0, 1),
            ],
            exact_bytes: 950,
        };
        let f = profile.by_function();
        let got: Vec<(&str, f64, f64, usize, usize)> = f
            .iter()
            .map(|r| {
                (
                    r.function.as_str(),
                    r.bytes,
                    r.sampled_bytes,
                    r.samples,
                    r.sites,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("hash_table", 500.0, 1000.0, 5, 2),
                ("rows", 350.0, 700.0, 3, 2),
                ("a_tie", 50.0, 100.0, 1, 1),
                ("b_tie", 50.0, 100.0, 1, 1),
            ]
        );
        assert!(
            HeapProfile {
                sites: Vec::new(),
                ..profile
            }
            .by_function()
            .is_empty()
        );
    }
}
