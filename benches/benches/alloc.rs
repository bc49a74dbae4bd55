//! The governed allocator against plain jemalloc (tikv-jemallocator) and the system allocator,
//! in the same process, on the same workloads. Each allocator is called explicitly through
//! `GlobalAlloc` (collections through an `allocator-api2` adapter), so the three share one
//! process, one jemalloc and one machine state; read the results as ratios.
#![expect(
    missing_docs,
    reason = "criterion_group! generates an undocumented public function"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use allocator_api2::alloc::{AllocError, Allocator};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use nodedb_mem::{EngineGuard, EngineId, GovernedAlloc};
use tikv_jemallocator::Jemalloc;

#[global_allocator]
static GLOBAL: GovernedAlloc = GovernedAlloc::new();

static GOVERNED: GovernedAlloc = GovernedAlloc::new();
static JEMALLOC: Jemalloc = Jemalloc;
static SYSTEM: System = System;

/// An `allocator-api2` allocator that forwards to a `GlobalAlloc`.
#[derive(Clone, Copy)]
struct Via(&'static (dyn GlobalAlloc + Sync));

// SAFETY: every method forwards to a `GlobalAlloc` with the same layout; zero-sized requests
// get a dangling, well-aligned pointer and are never passed on.
unsafe impl Allocator for Via {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            let dangling = NonNull::new(layout.align() as *mut u8).ok_or(AllocError)?;
            return Ok(NonNull::slice_from_raw_parts(dangling, 0));
        }
        // SAFETY: non-zero size.
        let p = unsafe { self.0.alloc(layout) };
        NonNull::new(p)
            .map(|p| NonNull::slice_from_raw_parts(p, layout.size()))
            .ok_or(AllocError)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            // SAFETY: allocated by `allocate` above with this layout.
            unsafe { self.0.dealloc(ptr.as_ptr(), layout) }
        }
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old.size() == 0 || old.align() != new.align() {
            let fresh = self.allocate(new)?;
            // SAFETY: both blocks are valid for `old.size()` bytes and do not overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr.as_ptr(), fresh.cast().as_ptr(), old.size());
                self.deallocate(ptr, old);
            }
            return Ok(fresh);
        }
        // SAFETY: `ptr` is live for `old`; `new.size()` is non-zero.
        let p = unsafe { self.0.realloc(ptr.as_ptr(), old, new.size()) };
        NonNull::new(p)
            .map(|p| NonNull::slice_from_raw_parts(p, new.size()))
            .ok_or(AllocError)
    }
}

const ALLOCATORS: [(&str, &'static (dyn GlobalAlloc + Sync)); 3] = [
    ("governed", &GOVERNED),
    ("jemalloc", &JEMALLOC),
    ("system", &SYSTEM),
];

/// Runs `f` inside a Query guard after enough Query allocations that Query is this thread's
/// home engine (what a thread that stays in one engine sees).
fn in_query<R>(f: impl FnOnce() -> R) -> R {
    let _g = EngineGuard::enter(EngineId::Query);
    for _ in 0..1024 {
        drop(black_box(Box::new(0u64)));
    }
    assert_eq!(nodedb_mem::current_engine(), EngineId::Query);
    f()
}

fn churn(a: &dyn GlobalAlloc, layouts: &[Layout], ptrs: &mut [*mut u8]) {
    for (p, &l) in ptrs.iter_mut().zip(layouts) {
        // SAFETY: non-zero sizes; freed below with the same layout.
        *p = unsafe { a.alloc(l) };
    }
    for (&p, &l) in ptrs.iter().zip(layouts) {
        // SAFETY: allocated above with this layout.
        unsafe { a.dealloc(black_box(p), l) };
    }
}

fn layouts(n: usize, max: usize, seed: u64) -> Vec<Layout> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let size = if max <= 256 {
                16 + (x as usize % (max - 15))
            } else {
                // log-uniform up to `max`
                let lg = 4 + (x as usize % (max.ilog2() as usize - 3));
                1 + ((x >> 20) as usize % (1 << lg))
            };
            Layout::from_size_align(size, 8).unwrap()
        })
        .collect()
}

fn small_and_mixed(c: &mut Criterion) {
    for (name, max) in [("small_churn_16_256", 256), ("mixed_up_to_64k", 64 << 10)] {
        let mut g = c.benchmark_group(name);
        let ls = layouts(64, max, 0x1234_5678_9abc_def1);
        g.throughput(Throughput::Elements(ls.len() as u64));
        let mut ptrs = vec![std::ptr::null_mut(); ls.len()];
        for (label, a) in ALLOCATORS {
            g.bench_function(BenchmarkId::from_parameter(label), |b| {
                in_query(|| b.iter(|| churn(a, &ls, &mut ptrs)))
            });
        }
        g.finish();
    }
}

struct SendPtr(*mut u8);
// SAFETY: the pointer is handed over, never used by the sender again.
unsafe impl Send for SendPtr {}

fn producer_consumer(c: &mut Criterion) {
    let mut g = c.benchmark_group("cross_thread_free_2_threads");
    const N: u64 = 10_000;
    g.throughput(Throughput::Elements(N));
    let layout = Layout::from_size_align(64, 8).unwrap();
    for (label, a) in ALLOCATORS {
        g.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter_custom(|iters| {
                let (tx, rx) = std::sync::mpsc::sync_channel::<SendPtr>(4096);
                let consumer = std::thread::spawn(move || {
                    for p in rx {
                        // SAFETY: allocated by the producer with `layout`, handed over.
                        unsafe { a.dealloc(p.0, layout) };
                    }
                });
                let start = Instant::now();
                in_query(|| {
                    for _ in 0..iters * N {
                        // SAFETY: non-zero size.
                        let p = unsafe { a.alloc(layout) };
                        tx.send(SendPtr(p)).unwrap();
                    }
                });
                drop(tx);
                consumer.join().unwrap();
                start.elapsed()
            })
        });
    }
    g.finish();
}

fn vec_growth(c: &mut Criterion) {
    let mut g = c.benchmark_group("vec_growth_to_64MiB");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Bytes(64 << 20));
    let chunk = [7u8; 4096];
    for (label, a) in ALLOCATORS {
        g.bench_function(BenchmarkId::from_parameter(label), |b| {
            in_query(|| {
                b.iter(|| {
                    let mut v = allocator_api2::vec::Vec::new_in(Via(a));
                    while v.len() < 64 << 20 {
                        v.extend_from_slice(&chunk);
                    }
                    black_box(v.len())
                })
            })
        });
    }
    g.finish();
}

fn hashmap_mix(c: &mut Criterion) {
    let mut g = c.benchmark_group("hashmap_1M_entries_build_and_drop");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    const ENTRIES: u64 = 1_000_000;
    g.throughput(Throughput::Elements(ENTRIES));
    for (label, a) in ALLOCATORS {
        g.bench_function(BenchmarkId::from_parameter(label), |b| {
            in_query(|| {
                b.iter(|| {
                    let via = Via(a);
                    let mut m = hashbrown::HashMap::with_capacity_and_hasher_in(
                        0,
                        hashbrown::DefaultHashBuilder::default(),
                        via,
                    );
                    for i in 0..ENTRIES {
                        let mut key = allocator_api2::vec::Vec::with_capacity_in(24, via);
                        key.extend_from_slice(format_key(i).as_bytes());
                        let len = 16 + (i as usize * 7) % 112;
                        let mut value = allocator_api2::vec::Vec::with_capacity_in(len, via);
                        value.resize(len, i as u8);
                        m.insert(key, value);
                    }
                    black_box(m.len())
                })
            })
        });
    }
    g.finish();
}

/// `"key-<i>"` on the stack, so only the map's own allocations go through the allocator.
fn format_key(i: u64) -> KeyBuf {
    use std::io::Write;
    let mut k = KeyBuf([0; 24], 0);
    let mut w = &mut k.0[..];
    let _ = write!(w, "key-{i}");
    k.1 = 24 - w.len();
    k
}

struct KeyBuf([u8; 24], usize);

impl KeyBuf {
    fn as_bytes(&self) -> &[u8] {
        &self.0[..self.1]
    }
}

fn engine_switch(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_switch");
    g.bench_function("guard_enter_and_drop", |b| {
        in_query(|| b.iter(|| drop(black_box(EngineGuard::enter(black_box(EngineId::Vector))))))
    });
    let layout = Layout::from_size_align(64, 8).unwrap();
    // A hop: enter another engine, allocate and free a block there, come back. Entering the
    // guard restarts the run of visits, so the thread never moves home: every block takes the
    // visit path (the other engine's arena, no thread cache).
    g.bench_function("hop_alloc_free_64B_in_another_engine", |b| {
        in_query(|| {
            b.iter(|| {
                let _v = EngineGuard::enter(EngineId::Vector);
                // SAFETY: non-zero size, freed at once with the same layout.
                unsafe { GOVERNED.dealloc(black_box(GOVERNED.alloc(layout)), layout) }
            });
            assert_eq!(nodedb_mem::home_engine(), EngineId::Query);
        })
    });
    g.bench_function("home_alloc_free_64B", |b| {
        in_query(|| {
            // SAFETY: as above.
            b.iter(|| unsafe { GOVERNED.dealloc(black_box(GOVERNED.alloc(layout)), layout) })
        })
    });
    g.finish();
}

fn overflow(c: &mut Criterion) {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    nodedb_mem::enable_overflow(dir, 1 << 30, false, nodedb_mem::OverflowPolicy::FallBack)
        .expect("overflow regions in the target directory");
    let mut g = c.benchmark_group("overflow");
    let layout = Layout::from_size_align(4096, 8).unwrap();
    for (name, limit) in [
        ("normal_alloc_free_4KiB", None),
        ("overflow_alloc_free_4KiB", Some(0)),
    ] {
        nodedb_mem::set_overflow_limit(EngineId::Crdt, limit);
        g.bench_function(name, |b| {
            let _g = EngineGuard::enter(EngineId::Crdt);
            for _ in 0..1024 {
                drop(black_box(Box::new(0u64))); // Crdt becomes this thread's home
            }
            b.iter(|| {
                // SAFETY: non-zero size, freed at once with the same layout.
                unsafe { GOVERNED.dealloc(black_box(GOVERNED.alloc(layout)), layout) }
            })
        });
    }
    nodedb_mem::set_overflow_limit(EngineId::Crdt, None);
    g.finish();
}

criterion_group!(
    benches,
    overflow,
    small_and_mixed,
    producer_consumer,
    vec_growth,
    hashmap_mix,
    engine_switch
);
criterion_main!(benches);
