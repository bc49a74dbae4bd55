//! An engine's top allocation sites for breach events: ranked by sampled live bytes, named by
//! their short names, computed at most once a second per engine (a breach storm reuses the
//! last answer).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nodedb_mem_alloc::ctl::profile as sampler;

use super::{Symbols, short_name};
use crate::top_sites::{TOP_SITES, TopSite, TopSites};
use crate::{EngineGuard, EngineId};

/// How long an engine's top sites are reused before they are computed again.
pub(crate) const TOP_SITES_REFRESH: Duration = Duration::from_secs(1);

/// How many of the largest stacks are resolved and merged by name to find the top sites
/// (several stacks often end in the same function; smaller stacks are not looked at).
const RESOLVED_STACKS: usize = 32;

/// Function names kept for the life of the process (see [`TopSites`]): past this many, further
/// names are reported as `"(other)"`. A program has far fewer allocating functions.
const MAX_NAMES: usize = 1 << 16;

/// The short names of the stacks named so far (by their return addresses), so a stack is
/// resolved once: at most this many are remembered (then forgotten all at once).
const MAX_STACK_NAMES: usize = 1 << 14;
static STACK_NAMES: Mutex<Option<HashMap<Vec<usize>, &'static str>>> = Mutex::new(None);

/// The last top sites of each engine and when they were computed.
#[derive(Debug, Default)]
pub(crate) struct TopSitesCache {
    engines: [Mutex<Option<(Instant, TopSites)>>; EngineId::COUNT],
}

impl TopSitesCache {
    /// `engine`'s top sites, computed now if the last were computed over
    /// [`TOP_SITES_REFRESH`] ago. Allocates, and reads debug information the first time a
    /// stack is resolved; a caller computing them holds the engine's entry, and another
    /// caller for the same engine meanwhile waits for the answer.
    pub(crate) fn get(&self, engine: EngineId) -> TopSites {
        let mut at = self.engines[engine.index()]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((when, top)) = *at
            && when.elapsed() < TOP_SITES_REFRESH
        {
            return top;
        }
        let top = compute(engine);
        *at = Some((Instant::now(), top));
        top
    }
}

/// `engine`'s largest sites by sampled live bytes, scaled to its exact live bytes.
pub(crate) fn compute(engine: EngineId) -> TopSites {
    if sampler::sample_counts().live == 0 {
        return TopSites::NONE;
    }
    let samples = sampler::live_samples(Some(engine));
    if samples.is_empty() {
        return TopSites::NONE;
    }
    let mut by_stack: HashMap<&[usize], f64> = HashMap::new();
    let mut total = 0.0;
    for s in &samples {
        *by_stack.entry(&s.stack).or_default() += s.weight;
        total += s.weight;
    }
    let mut stacks: Vec<(&[usize], f64)> = by_stack.into_iter().collect();
    stacks.sort_by(|a, b| b.1.total_cmp(&a.1));
    stacks.truncate(RESOLVED_STACKS);
    // As for a profile, what naming the stacks allocates is charged to nobody's engine.
    let _own = EngineGuard::enter(EngineId::Unattributed);
    let mut by_name: Vec<(&'static str, f64)> = Vec::new();
    let mut kept = STACK_NAMES.lock().unwrap_or_else(|p| p.into_inner());
    let names = kept.get_or_insert_with(HashMap::new);
    let mut symbols: Option<Symbols> = None;
    for (stack, weight) in stacks {
        let name = match names.get(stack) {
            Some(&name) => name,
            None => {
                let frames = symbols.get_or_insert_with(Symbols::default).stack(stack);
                let name = intern(short_name(&frames));
                if names.len() >= MAX_STACK_NAMES {
                    names.clear();
                }
                names.insert(stack.to_vec(), name);
                name
            }
        };
        match by_name.iter_mut().find(|(n, _)| *n == name) {
            Some((_, w)) => *w += weight,
            None => by_name.push((name, weight)),
        }
    }
    drop(kept);
    if symbols.is_some() {
        // The symbol reader keeps the binary mapped and its symbols parsed for the life of
        // the process: 30 MiB of file pages in the resident set for the main job's 160 MB
        // binary, and its parsed tables on the heap. Stacks named once are remembered above;
        // the reader's memory is given back.
        backtrace::clear_symbol_cache();
    }
    by_name.sort_by(|a, b| b.1.total_cmp(&a.1));
    let exact = nodedb_mem_alloc::ctl::ledger::charged(engine) as f64;
    let scale = if exact > 0.0 && total > 0.0 {
        exact / total
    } else {
        1.0
    };
    TopSites::new(
        by_name
            .into_iter()
            .take(TOP_SITES)
            .map(|(name, weight)| TopSite {
                function: name,
                bytes: (weight * scale).round() as u64,
            }),
    )
}

/// `name` as a string that lives as long as the process, stored once.
fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    let names = names.get_or_insert_with(HashSet::new);
    if let Some(&kept) = names.get(name) {
        return kept;
    }
    if names.len() >= MAX_NAMES {
        return "(other)";
    }
    let kept: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.insert(kept);
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interns_each_name_once() {
        let a = intern(&String::from("engine::site"));
        let b = intern(&String::from("engine::site"));
        assert!(std::ptr::eq(a, b));
        assert_eq!(a, "engine::site");
    }

    #[test]
    fn an_engine_with_nothing_sampled_has_no_sites() {
        // No `GovernedAlloc` in the unit tests: nothing is ever sampled.
        assert!(compute(EngineId::Query).is_empty());
        let cache = TopSitesCache::default();
        assert!(cache.get(EngineId::Vector).is_empty());
    }
}
