//! reserve + release of the governor: uncontended, through one and two scopes, waiting when it
//! fits at once, and on two threads at once.
#![expect(
    missing_docs,
    reason = "criterion_group! generates an undocumented public function"
)]

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nodedb_mem::{EngineId, MemoryGovernor};

fn governor() -> MemoryGovernor {
    MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .build()
        .expect("a valid configuration")
}

fn reserve_release(c: &mut Criterion) {
    let mut group = c.benchmark_group("reserve_release");
    group.throughput(Throughput::Elements(1));

    let gov = governor();
    group.bench_function("uncontended", |b| {
        b.iter(|| drop(black_box(gov.reserve(EngineId::Query, black_box(4096)))))
    });

    // The same reservation admitted through a database and a tenant scope: two more
    // compare-and-swaps on the way in, two more decrements on the way out.
    let db = gov
        .create_scope("db", None, 1 << 29)
        .expect("a valid scope");
    let tenant = gov
        .create_scope("tenant", Some(&db), 1 << 28)
        .expect("a valid scope");
    group.bench_function("in_one_scope", |b| {
        b.iter(|| {
            drop(black_box(gov.reserve_in(
                EngineId::Query,
                &db,
                black_box(4096),
            )))
        })
    });
    group.bench_function("in_two_scopes", |b| {
        b.iter(|| {
            drop(black_box(gov.reserve_in(
                EngineId::Query,
                &tenant,
                black_box(4096),
            )))
        })
    });
    // A waiting reservation that fits at once: the queue's lock and an empty queue.
    group.bench_function("blocking_fits_at_once", |b| {
        b.iter(|| {
            drop(black_box(gov.reserve_blocking(
                EngineId::Query,
                None,
                black_box(4096),
                Duration::from_secs(1),
            )))
        })
    });

    group.bench_function("pressure_poll", |b| {
        b.iter(|| black_box(gov.pressure(black_box(EngineId::Query))))
    });

    // Two threads reserving and releasing against the same engine (one ledger cache line);
    // the time reported is per operation of one thread while the other runs too.
    for (name, engines) in [
        ("2_threads_same_engine", [EngineId::Query, EngineId::Query]),
        ("2_threads_two_engines", [EngineId::Query, EngineId::Vector]),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| two_threads(&gov, engines, iters))
        });
    }
    group.finish();
}

fn two_threads(gov: &MemoryGovernor, engines: [EngineId; 2], iters: u64) -> Duration {
    let barrier = Barrier::new(2);
    std::thread::scope(|s| {
        let handles = engines.map(|engine| {
            let barrier = &barrier;
            s.spawn(move || {
                barrier.wait();
                let start = Instant::now();
                for _ in 0..iters {
                    drop(black_box(gov.reserve(engine, black_box(4096))));
                }
                start.elapsed()
            })
        });
        let [a, b] = handles.map(|h| h.join().expect("bench thread"));
        a.max(b)
    })
}

criterion_group!(benches, reserve_release);
criterion_main!(benches);
