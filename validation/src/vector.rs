//! The vector engine: an HNSW index (the `hnsw_rs` crate) over generated, clustered vectors,
//! built under an admission check against the Vector budget, then queried until the deadline;
//! recall@10 is measured against brute force on a sample of queries.

use std::time::{Duration, Instant};

use hnsw_rs::anndists::dist::DistL2;
use hnsw_rs::hnsw::Hnsw;
use nodedb_mem::{EngineGuard, EngineId, MemoryGovernor};

use crate::stats::{EngineStats, Rng};

/// Vector dimension.
pub(crate) const DIM: usize = 48;
/// Neighbours returned per query.
const K: usize = 10;
/// Candidates kept while searching (64 gave recall@10 of 0.77 at 41,000 vectors; 128 gives
/// 0.85 at 59,000).
const EF_SEARCH: usize = 128;
/// Vectors inserted between two admission checks.
const BATCH: usize = 512;
/// Inserts between two looks at the build's deadline.
const DEADLINE_EVERY: usize = 64;

/// What the engine is asked to do.
#[derive(Debug, Clone)]
pub(crate) struct VecConfig {
    /// Vectors to insert (fewer if the budget refuses more).
    pub(crate) vectors: usize,
    /// Queries whose recall is measured against brute force.
    pub(crate) recall_queries: usize,
    pub(crate) seed: u64,
    /// The build stops at this instant (the index then serves queries as it is).
    pub(crate) build_deadline: Instant,
    /// Queries run until this instant.
    pub(crate) deadline: Instant,
    /// At most this many timed queries.
    pub(crate) max_queries: u64,
    /// Where the built vectors are written, then mapped and (with a governor) protected.
    pub(crate) vectors_file: std::path::PathBuf,
    /// Bytes of documents kept beside the index once it is built (split evenly among the
    /// vectors, at least 64 B each; 0 for none): the rows a search returns, allocated without
    /// a reservation, so what passes the engine's limit lives in its overflow region.
    pub(crate) documents: u64,
    /// When the documents arrive: the queries run without them until then (and they are
    /// written when the queries end, if that is earlier).
    pub(crate) documents_at: Instant,
}

/// What the engine did.
#[derive(Debug, Clone, Default)]
pub(crate) struct VecOutcome {
    pub(crate) inserted: usize,
    pub(crate) build_time: Duration,
    pub(crate) queries: u64,
    pub(crate) query_time: Duration,
    /// Mean recall@10 over the sampled queries.
    pub(crate) recall: f64,
    /// Whether the budget stopped the build before every vector was in.
    pub(crate) stopped_by_budget: bool,
    /// Bytes the index took per vector, as the governor saw them after the first batch.
    pub(crate) bytes_per_vector: u64,
    /// Bytes of vector data kept in a file-backed mapping, locked resident (0 if the governor
    /// refused, or without one).
    pub(crate) protected_bytes: u64,
    /// The lowest share of the mapped vector data found resident while queries ran (`mincore`
    /// after every 256 queries), 1.0 when it never dropped.
    pub(crate) min_residency: f64,
    /// Why the data was not protected, if it was not.
    pub(crate) protect_refused: Option<String>,
    /// Whether the refusal came from the system (`mlock` and `RLIMIT_MEMLOCK`), not the budget.
    pub(crate) protect_refused_by_system: bool,
    /// Documents kept and their total size.
    pub(crate) documents: usize,
    pub(crate) document_bytes: u64,
    /// Documents of search results read back while queries ran, and those whose bytes were
    /// not the ones written.
    pub(crate) documents_read: u64,
    pub(crate) documents_corrupt: u64,
}

/// Bytes of each document for `total` over `count` vectors (a multiple of 8, at least 64).
fn document_size(total: u64, count: usize) -> usize {
    let each = total / count.max(1) as u64;
    usize::try_from(each).unwrap_or(usize::MAX).max(64) & !7
}

/// Document `i` of `len` bytes: its number in the first 8 bytes, then its low byte repeated.
fn document(i: usize, len: usize) -> Box<[u8]> {
    let mut d = vec![i as u8; len].into_boxed_slice();
    d[..8].copy_from_slice(&(i as u64).to_le_bytes());
    d
}

/// Whether `d` is document `i` as written (its number, and its last byte).
fn document_intact(d: &[u8], i: usize) -> bool {
    d.len() >= 8 && d[..8] == (i as u64).to_le_bytes() && d.last() == Some(&(i as u8))
}

/// Generates vector `i`: one of 64 cluster centres plus noise, the same for the same seed.
fn vector(seed: u64, i: usize, out: &mut [f32]) {
    let mut centre = Rng::new(seed ^ 0xC1A5_7E45 ^ (i as u64 % 64).wrapping_mul(0x9E37));
    let mut noise = Rng::new(
        seed.wrapping_add(i as u64)
            .wrapping_mul(0x2545_F491_4F6C_DD1D),
    );
    for x in out.iter_mut() {
        *x = centre.next_f32() * 10.0 + noise.next_f32();
    }
}

fn l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Runs the engine on the calling thread, under the Vector guard.
pub(crate) fn run(
    cfg: &VecConfig,
    gov: Option<&MemoryGovernor>,
    stats: &EngineStats,
) -> Result<VecOutcome, String> {
    let _guard = EngineGuard::enter(EngineId::Vector);
    let mut o = VecOutcome::default();
    let index: Hnsw<'_, f32, DistL2> = Hnsw::new(16, cfg.vectors.max(1), 16, 48, DistL2 {});
    // The vectors are kept for the brute-force recall check (and count against the budget).
    let mut data: Vec<f32> = Vec::new();
    let mut v = [0f32; DIM];
    let started = Instant::now();
    let mut per_vector = 0u64;
    while o.inserted < cfg.vectors && Instant::now() < cfg.build_deadline {
        let n = BATCH.min(cfg.vectors - o.inserted);
        if let (Some(g), true) = (gov, per_vector > 0) {
            // Admission for the next batch at the size the first batch really took: the index
            // stops growing (and keeps serving queries) rather than pushing the engine into
            // overflow.
            if g.reserve(EngineId::Vector, per_vector * n as u64).is_err() {
                stats
                    .rejections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                o.stopped_by_budget = true;
                break;
            }
        }
        let before = gov.map_or(0, |g| g.usage(EngineId::Vector));
        // The deadline is looked at every `DEADLINE_EVERY` inserts, not only between batches:
        // on a loaded machine a batch took seconds in a debug build, and the documents, due
        // when the build stops, came at the end of the short run.
        let mut done = 0;
        for i in o.inserted..o.inserted + n {
            if done > 0 && done % DEADLINE_EVERY == 0 && Instant::now() >= cfg.build_deadline {
                break;
            }
            vector(cfg.seed, i, &mut v);
            data.extend_from_slice(&v);
            index.insert((&v, i));
            done += 1;
        }
        let n = done;
        if let (Some(g), 0) = (gov, per_vector) {
            nodedb_mem::flush_thread();
            per_vector = g.usage(EngineId::Vector).saturating_sub(before) / n as u64;
            // Doubling of `data` and the graph's growth make later batches dearer than the
            // first: leave a margin.
            per_vector += per_vector / 2;
            o.bytes_per_vector = per_vector;
        }
        o.inserted += n;
        stats.add_ops(n as u64);
    }
    o.build_time = started.elapsed();
    if o.inserted == 0 {
        stats.finish();
        return Err("the vector engine inserted nothing".into());
    }

    // The vectors move to a file-backed mapping (hot data of the engine, like an index's upper
    // layers), protected from other engines' page-cache traffic: locked resident and counted
    // against the Vector budget instead of the heap vector they replace.
    let mapped = Mapped::write(&cfg.vectors_file, &data)?;
    drop(data);
    let data: &[f32] = mapped.floats();
    let protected = match gov.map(|g| g.protect(EngineId::Vector, mapped.bytes())) {
        Some(Ok(p)) => {
            o.protected_bytes = p.len() as u64;
            Some(p)
        }
        Some(Err(e)) => {
            o.protect_refused_by_system = matches!(e, nodedb_mem::MemError::Io { .. });
            o.protect_refused = Some(e.to_string());
            None
        }
        None => None,
    };

    // The documents: allocated with no reservation, as a store would, past the engine's
    // limit into its overflow region (pushed out to its file as resident memory nears the
    // ceiling), so the process can hold more live data than the ceiling. They arrive at
    // `documents_at` (the build deadline in the workload), between two queries once the index
    // is built: the index, idle, has lent its spare limit by then, and becomes busy again.
    let mut docs: Vec<Box<[u8]>> = Vec::new();
    let mut docs_due = cfg.documents > 0;
    let write_docs = |docs: &mut Vec<Box<[u8]>>, o: &mut VecOutcome| {
        let len = document_size(cfg.documents, o.inserted);
        *docs = (0..o.inserted).map(|i| document(i, len)).collect();
        o.documents = docs.len();
        o.document_bytes = docs.iter().map(|d| d.len() as u64).sum();
    };

    o.min_residency = 1.0;
    let sample_residency = |o: &mut VecOutcome| {
        let resident = nodedb_mem::resident_bytes(mapped.bytes()).unwrap_or(0);
        let share = resident as f64 / mapped.bytes().len().max(1) as f64;
        o.min_residency = o.min_residency.min(share);
    };

    // Queries: perturbed copies of indexed vectors, until the deadline.
    let mut rng = Rng::new(cfg.seed ^ 0x5EA7C4);
    let mut q = [0f32; DIM];
    let inserted = o.inserted;
    let make_query = |rng: &mut Rng, q: &mut [f32; DIM]| {
        let i = (rng.next_u64() % inserted as u64) as usize;
        q.copy_from_slice(&data[i * DIM..(i + 1) * DIM]);
        for x in q.iter_mut() {
            *x += rng.next_f32() * 0.2 - 0.1;
        }
    };
    let q_started = Instant::now();
    loop {
        if docs_due && Instant::now() >= cfg.documents_at {
            write_docs(&mut docs, &mut o);
            docs_due = false;
        }
        make_query(&mut rng, &mut q);
        let found = index.search(&q, K, EF_SEARCH);
        // The best hit's document, as a search returning rows would read it.
        if let Some(d) = found
            .first()
            .and_then(|n| docs.get(n.d_id).map(|d| (n.d_id, d)))
        {
            o.documents_read += 1;
            o.documents_corrupt += u64::from(!document_intact(d.1, d.0));
        }
        o.queries += 1;
        stats.add_ops(1);
        if o.queries % 256 == 0 {
            sample_residency(&mut o);
        }
        if o.queries >= cfg.max_queries || Instant::now() >= cfg.deadline {
            break;
        }
    }
    o.query_time = q_started.elapsed();
    if docs_due {
        // The queries ended (`max_queries`) before the documents were due: they are still
        // written, so the engine holds what it was given to hold.
        write_docs(&mut docs, &mut o);
    }

    // Recall@10 against brute force.
    let mut hits = 0usize;
    let sample = cfg.recall_queries.max(1);
    for _ in 0..sample {
        make_query(&mut rng, &mut q);
        let found: Vec<usize> = index
            .search(&q, K, EF_SEARCH)
            .iter()
            .map(|n| n.d_id)
            .collect();
        let mut exact: Vec<(f32, usize)> = (0..o.inserted)
            .map(|i| (l2(&q, &data[i * DIM..(i + 1) * DIM]), i))
            .collect();
        let k = K.min(exact.len());
        exact.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0));
        hits += exact[..k].iter().filter(|(_, i)| found.contains(i)).count();
    }
    o.recall = hits as f64 / (sample * K.min(o.inserted)) as f64;
    sample_residency(&mut o);
    drop(docs);
    drop(index);
    drop(protected);
    drop(mapped);
    stats.finish();
    Ok(o)
}

/// A file holding the vectors, mapped read-only.
struct Mapped(nodedb_mem::MappedFile);

impl Mapped {
    fn write(path: &std::path::Path, data: &[f32]) -> Result<Mapped, String> {
        use std::io::Write;
        // SAFETY: `f32` has no padding and every byte of it is initialised, so its storage
        // reads as `4 × len` bytes for as long as `data` is borrowed.
        let bytes: &[u8] = unsafe {
            std::slice::from_raw_parts(data.as_ptr().cast(), std::mem::size_of_val(data))
        };
        let mut file = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        file.write_all(bytes)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        nodedb_mem::MappedFile::open(&file)
            .map(Mapped)
            .map_err(|e| format!("mapping {}: {e}", path.display()))
    }

    fn bytes(&self) -> &[u8] {
        self.0.bytes()
    }

    fn floats(&self) -> &[f32] {
        let bytes = self.0.bytes();
        if bytes.is_empty() {
            return &[];
        }
        // SAFETY: a non-empty mapping starts on a page boundary, so the bytes are aligned for
        // `f32`; they hold `len / 4` floats written by `write`, and any bit pattern is a valid
        // `f32`; the view borrows `self`.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast(), bytes.len() / 4) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_deterministic_and_distinct() {
        let (mut a, mut b, mut c) = ([0f32; DIM], [0f32; DIM], [0f32; DIM]);
        vector(7, 3, &mut a);
        vector(7, 3, &mut b);
        vector(7, 4, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|x| (0.0..11.0).contains(x)));
    }

    #[test]
    fn documents_carry_their_number_and_are_sized_evenly() {
        assert_eq!(document_size(1 << 20, 1000), 1048);
        assert_eq!(document_size(100, 1000), 64);
        assert_eq!(document_size(1 << 20, 0), 1 << 20);
        let d = document(300, 64);
        assert!(document_intact(&d, 300));
        assert!(!document_intact(&d, 301));
        let mut bad = d.clone();
        bad[63] ^= 1;
        assert!(!document_intact(&bad, 300));
    }

    #[test]
    fn a_small_index_finds_its_own_neighbours() {
        let stats = EngineStats::default();
        let dir = tempfile::tempdir().unwrap();
        let cfg = VecConfig {
            vectors: 2_000,
            recall_queries: 20,
            seed: 1,
            build_deadline: Instant::now() + Duration::from_secs(600),
            deadline: Instant::now() + Duration::from_secs(600),
            max_queries: 100,
            vectors_file: dir.path().join("vectors.f32"),
            documents: 2_000 * 1000,
            documents_at: Instant::now(),
        };
        let o = run(&cfg, None, &stats).expect("runs");
        assert_eq!((o.documents, o.document_bytes), (2_000, 2_000 * 1000));
        assert_eq!((o.documents_read, o.documents_corrupt), (100, 0));
        assert_eq!(
            std::fs::metadata(dir.path().join("vectors.f32"))
                .unwrap()
                .len(),
            (2_000 * DIM * 4) as u64
        );
        assert_eq!(
            o.protected_bytes, 0,
            "nothing to protect without a governor"
        );
        assert_eq!(o.inserted, 2_000);
        assert_eq!(o.queries, 100);
        assert_eq!(stats.ops(), 2_100);
        assert!(o.recall >= 0.9, "recall {}", o.recall);
        assert!(stats.is_done());
    }
}
