//! The governor bound to the global allocator. This binary installs `GovernedAlloc`.

use std::sync::{Mutex, MutexGuard, OnceLock};

use nodedb_mem::{
    EngineExt, EngineGuard, EngineId, GovernedAlloc, MemError, MemoryGovernor, PressureLevel,
    flush_thread, owner,
};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const MIB: u64 = 1 << 20;

fn gov() -> &'static MemoryGovernor {
    static GOV: OnceLock<&'static MemoryGovernor> = OnceLock::new();
    GOV.get_or_init(|| {
        MemoryGovernor::builder()
            .global_ceiling(1 << 30)
            .budget(EngineId::Query, 64 * MIB)
            .budget(EngineId::Vector, 64 * MIB)
            // These tests pin exact limits; the background thread would rebalance them.
            .background(None)
            .install()
            .expect("first install")
    })
}

/// The ledger is process-wide: one test at a time.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn settled(engine: EngineId) -> u64 {
    let gov = gov();
    flush_thread();
    gov.usage(engine)
}

#[test]
fn install_binds_once() {
    let _s = serial();
    let gov = gov();
    assert!(std::ptr::eq(nodedb_mem::installed().unwrap(), gov));
    let again = MemoryGovernor::builder().global_ceiling(1 << 30).install();
    assert!(matches!(again, Err(MemError::AlreadyInstalled)));
    assert_eq!(
        again.unwrap_err().to_string(),
        "a memory governor is already installed in this process"
    );
}

#[test]
fn usage_is_live_bytes_plus_reservations() {
    let _s = serial();
    let before = settled(EngineId::Query);
    let block: Vec<u8> = {
        let _g = EngineGuard::enter(EngineId::Query);
        Vec::with_capacity(4096)
    };
    let r = gov().reserve(EngineId::Query, 1000).unwrap();
    assert_eq!(settled(EngineId::Query) - before, 4096 + 1000);
    let b = gov().budget(EngineId::Query);
    assert_eq!(b.reserved(), 1000);
    drop(block);
    drop(r);
    assert_eq!(settled(EngineId::Query), before);
    gov().check_consistency().unwrap();
}

#[test]
fn reservations_see_what_the_allocator_charged() {
    let _s = serial();
    let base = settled(EngineId::Query);
    let big: Vec<u8> = {
        let _g = EngineGuard::enter(EngineId::Query);
        vec![1u8; (60 * MIB) as usize] // >= 1 MiB: charged at once, page-rounded
    };
    let used = 60 * MIB + base;
    assert_eq!(gov().usage(EngineId::Query), used);
    let err = gov().reserve(EngineId::Query, 5 * MIB).unwrap_err();
    assert!(
        matches!(err, MemError::BudgetExceeded { used: u, limit, .. } if u == used && limit == 64 * MIB),
        "{err}"
    );
    assert!(gov().pressure(EngineId::Query) >= PressureLevel::Critical);
    drop(big);
    let r = gov().reserve(EngineId::Query, 5 * MIB).unwrap();
    drop(r);
    assert_eq!(gov().pressure(EngineId::Query), PressureLevel::Normal);
}

#[test]
fn snapshot_and_prometheus_carry_arena_figures() {
    let _s = serial();
    let block: Vec<u8> = {
        let _g = EngineGuard::enter(EngineId::Vector);
        vec![7u8; 8 << 20]
    };
    let snap = gov().snapshot();
    let v = snap.engine(EngineId::Vector);
    assert!(v.arena.resident >= 8 << 20, "{:?}", v.arena);
    assert!(v.arena.active >= 8 << 20, "{:?}", v.arena);
    assert!(v.used >= 8 << 20);
    let text = gov().prometheus();
    let line = text
        .lines()
        .find(|l| l.starts_with("nodedb_mem_engine_arena_resident_bytes{engine=\"vector\"}"))
        .unwrap();
    let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value >= 8 << 20);
    // Per NUMA node: the block's node holds it.
    let node = nodedb_mem::node_of(block.as_ptr());
    assert!(v.arena_by_node[node].resident >= 8 << 20);
    let label =
        format!("nodedb_mem_engine_node_resident_bytes{{engine=\"vector\",node=\"{node}\"}} ");
    assert!(text.contains(&label), "{label}");
    drop(block);
}

#[test]
fn tasks_keep_their_engine_across_worker_threads() {
    let _s = serial();
    let before = settled(EngineId::Vector);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Worker threads publish their batches when they stop, before `drop(rt)` returns
        // (a thread's own exit flush may run after the runtime has let go of it).
        .on_thread_stop(flush_thread)
        .build()
        .unwrap();
    let blocks: Vec<Vec<Box<[u8; 200]>>> = rt.block_on(async {
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                tokio::spawn(
                    async move {
                        let mut mine = Vec::with_capacity(64);
                        let mut threads = std::collections::HashSet::new();
                        for i in 0..64 {
                            mine.push(Box::new([(t + i) as u8; 200]));
                            threads.insert(std::thread::current().id());
                            tokio::task::yield_now().await;
                        }
                        (mine, threads.len())
                    }
                    .in_engine(EngineId::Vector),
                )
            })
            .collect();
        // Whether a task moves between workers is the scheduler's choice (on a loaded machine
        // it may not); `a_future_polled_on_two_threads_keeps_its_engine` forces the move.
        let mut out = Vec::new();
        for t in tasks {
            let (mine, _threads) = t.await.unwrap();
            out.push(mine);
        }
        out
    });
    drop(rt);
    for b in blocks.iter().flatten() {
        assert_eq!(owner(b.as_ptr()), EngineId::Vector);
    }
    // 32 tasks × (64 blocks of class 224 + a 64-pointer vector, 512 B).
    assert_eq!(settled(EngineId::Vector) - before, 32 * (64 * 224 + 512));
    drop(blocks);
    assert_eq!(settled(EngineId::Vector), before);
}

#[test]
fn a_future_polled_on_two_threads_keeps_its_engine() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let _s = serial();
    let before = settled(EngineId::Crdt);
    // Pending once, then ready: the first poll happens on one thread, the second on another.
    let mut yielded = false;
    let pause = std::future::poll_fn(move |cx| {
        if std::mem::replace(&mut yielded, true) {
            Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    });
    let mut fut = Box::pin(
        async move {
            let a = Box::new([1u8; 200]);
            let first = std::thread::current().id();
            pause.await;
            let b = Box::new([2u8; 200]);
            (a, b, first != std::thread::current().id())
        }
        .in_engine(EngineId::Crdt),
    );
    fn poll<F: Future>(fut: &mut std::pin::Pin<Box<F>>) -> Poll<F::Output> {
        let poll = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        flush_thread();
        poll
    }
    let mut fut = std::thread::spawn(move || {
        assert!(poll(&mut fut).is_pending());
        fut
    })
    .join()
    .unwrap();
    let (a, b, moved) = std::thread::spawn(move || match poll(&mut fut) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the future should be ready"),
    })
    .join()
    .unwrap();
    assert!(moved, "the two polls ran on one thread");
    assert_eq!(owner(a.as_ptr()), EngineId::Crdt);
    assert_eq!(owner(b.as_ptr()), EngineId::Crdt);
    // Two blocks of the 224 B class; the future's own box was allocated outside the engine.
    assert_eq!(settled(EngineId::Crdt) - before, 2 * 224);
    drop((a, b));
    assert_eq!(settled(EngineId::Crdt), before);
}

/// Allocates (and leaks into `out`) 1 MiB when dropped.
struct AllocatesOnDrop(std::sync::Arc<Mutex<Option<Vec<u8>>>>);

impl Drop for AllocatesOnDrop {
    fn drop(&mut self) {
        *self.0.lock().unwrap() = Some(vec![7u8; 1 << 20]);
    }
}

#[test]
fn the_inner_future_is_dropped_inside_the_engine() {
    let _s = serial();
    let out = std::sync::Arc::new(Mutex::new(None));
    let state = AllocatesOnDrop(out.clone());
    // Never completed: dropped pending, as a cancelled task is.
    let fut = async move {
        let _state = state;
        std::future::pending::<()>().await;
    }
    .in_engine(EngineId::Sparse);
    let mut fut = Box::pin(fut);
    use std::future::Future;
    assert!(
        fut.as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
            .is_pending()
    );
    let before = settled(EngineId::Sparse);
    drop(fut);
    let block = out.lock().unwrap().take().unwrap();
    assert_eq!(owner(block.as_ptr()), EngineId::Sparse);
    assert_eq!(settled(EngineId::Sparse) - before, 1 << 20);
    drop(block);
    assert_eq!(settled(EngineId::Sparse), before);
}

#[test]
fn the_fallible_allocator_is_charged_by_the_global_allocator_once() {
    use allocator_api2::vec::Vec as AVec;
    let _s = serial();
    let before = settled(EngineId::Query);
    let alloc = nodedb_mem::EngineAllocator::new(gov(), EngineId::Query);
    let mut v: AVec<u8, _> = AVec::new_in(alloc);
    v.try_reserve_exact(8 << 20).unwrap(); // >= 1 MiB: charged at once, page-rounded
    assert_eq!(owner(v.as_ptr()), EngineId::Query);
    assert_eq!(settled(EngineId::Query) - before, 8 << 20);
    assert_eq!(gov().budget(EngineId::Query).reserved(), 0);
    // Growing in place to 60 MiB asks admission for the 52 MiB more only: it fits the 64 MiB
    // budget; 70 MiB does not.
    v.try_reserve_exact(60 << 20).unwrap();
    assert_eq!(settled(EngineId::Query) - before, 60 << 20);
    assert!(v.try_reserve_exact(70 << 20).is_err());
    assert_eq!(v.capacity(), 60 << 20);
    drop(v);
    assert_eq!(settled(EngineId::Query), before);
}

#[test]
fn check_resident_purges_an_engine_that_keeps_too_many_dirty_pages() {
    let _s = serial();
    let gov = gov();
    let e = EngineId::Vector; // 64 MiB budget: a 16 MiB allowance of dirty pages
    let dirty = |e: EngineId| gov.snapshot().engine(e).arena.dirty;
    let before = gov.snapshot().dirty_purges;
    gov.check_resident().unwrap();
    assert!(dirty(e) <= 16 * MIB);
    // 24 MiB of 256 KiB blocks, freed: jemalloc keeps the pages dirty (10 s decay).
    let blocks: Vec<Vec<u8>> = {
        let _g = EngineGuard::enter(e);
        (0..96).map(|i| vec![i as u8; 256 << 10]).collect()
    };
    drop(blocks);
    flush_thread();
    assert!(dirty(e) > 16 * MIB, "only {} B dirty", dirty(e));
    let query_dirty = dirty(EngineId::Query);
    gov.check_resident().unwrap();
    assert!(dirty(e) < MIB, "{} B still dirty", dirty(e));
    assert_eq!(gov.snapshot().dirty_purges, before + 1);
    assert!(
        gov.prometheus()
            .contains(&format!("nodedb_mem_dirty_purges_total {}", before + 1))
    );
    // Another engine within its allowance kept its pages.
    assert_eq!(dirty(EngineId::Query), query_dirty);
}

#[test]
fn a_waiting_reservation_sees_heap_memory_freed_without_any_call_to_the_governor() {
    let _s = serial();
    let gov = gov();
    let base = settled(EngineId::Query);
    let block: Vec<u8> = {
        let _g = EngineGuard::enter(EngineId::Query);
        vec![1u8; (60 * MIB - base) as usize]
    };
    assert!(settled(EngineId::Query) >= 60 * MIB);
    let waiter = std::thread::spawn(move || {
        gov.reserve_blocking(
            EngineId::Query,
            None,
            16 * MIB,
            std::time::Duration::from_secs(30),
        )
    });
    while gov.snapshot().engine(EngineId::Query).waiters == 0 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // The free goes to the allocator only; the waiting request is retried and finds the room.
    drop(block);
    let r = waiter.join().unwrap().unwrap();
    assert_eq!(r.size(), 16 * MIB);
    assert_eq!(gov.snapshot().engine(EngineId::Query).waiters, 0);
}
