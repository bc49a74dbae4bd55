//! The installed governor in real environments: `install()` with its defaults in a process that
//! forks, under an address-space limit, and where the engine arenas cannot exist at all.
//!
//! Tests needing a fresh process run this binary again with one `#[ignore]`d test selected.

use std::os::unix::process::CommandExt;
use std::process::Command;

use nodedb_mem::{
    EngineGuard, EngineId, GovernedAlloc, INFLIGHT_BOUND_ENV, MemError, MemoryGovernor,
    RANGE_BYTES_ENV, flush_thread,
};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const MIB: u64 = 1 << 20;

#[path = "common/child.rs"]
mod child;
use child::run_child;

#[test]
fn a_default_install_survives_fork_and_pre_exec() {
    // Defaults but for the overflow directory, which is made sure to be on disk.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .budget(EngineId::Query, 16 * MIB)
        // The background thread runs (fork with it alive), but may not lend Query more.
        .cap(EngineId::Query, 16 * MIB)
        .overflow(nodedb_mem::OverflowConfig::in_dir(dir.path()))
        .install()
        .unwrap();
    let q = EngineId::Query;
    // Query past its budget, so part of it lives in overflow when the process forks.
    let mut rows: Vec<Vec<u8>> = Vec::with_capacity(8192);
    {
        let _g = EngineGuard::enter(q);
        rows.extend((0..8192).map(|i| vec![(i % 256) as u8; 4096]));
    }
    assert!(rows.iter().any(|r| nodedb_mem::is_overflow(r.as_ptr())));
    for _ in 0..3 {
        // SAFETY: the child only allocates and frees, then leaves with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let ok = std::panic::catch_unwind(|| {
                let a = {
                    let _g = EngineGuard::enter(q);
                    vec![3u8; 1 << 20]
                };
                let b: Vec<u64> = (0..100_000).collect();
                nodedb_mem::is_forked_child()
                    && nodedb_mem::owner(a.as_ptr()) == q
                    && !nodedb_mem::is_overflow(a.as_ptr())
                    && b.iter().sum::<u64>() == 4_999_950_000
            })
            .unwrap_or(false);
            // SAFETY: ends the child at once, as a child that does not exec should.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child status {status:#x}"
        );
    }
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "exit 0"]);
    // SAFETY: the closure does nothing; it only makes `Command` fork instead of spawn.
    unsafe { cmd.pre_exec(|| Ok(())) };
    assert!(cmd.status().unwrap().success());
    // The parent's data and counts are intact.
    assert!(
        rows.iter()
            .enumerate()
            .all(|(i, r)| r.iter().all(|&b| b == (i % 256) as u8))
    );
    flush_thread();
    let before = gov.usage(q) + gov.budget(q).overflow_bytes();
    drop(rows);
    flush_thread();
    let after = gov.usage(q) + gov.budget(q).overflow_bytes();
    assert!(before - after >= 8192 * 4096);
}

#[test]
fn install_says_why_the_arenas_are_missing() {
    let (ok, out) = run_child("child_install_without_arenas", &[], Some(500_000));
    assert!(ok, "{out}");
    assert!(
        out.contains("the engine arenas could not be created: reserving 704 MiB of address space"),
        "{out}"
    );
    let (ok, out) = run_child(
        "child_install_without_arenas",
        &[(RANGE_BYTES_ENV, "12 parsecs")],
        None,
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("NODEDB_MEM_RANGE_BYTES must be a size from 64 MiB to 4 TiB"),
        "{out}"
    );
}

#[test]
#[ignore = "run by install_says_why_the_arenas_are_missing in a process of its own"]
fn child_install_without_arenas() {
    let err = MemoryGovernor::builder()
        .global_ceiling(256 * MIB)
        .install()
        .unwrap_err();
    assert!(matches!(err, MemError::ArenasUnavailable(_)), "{err:?}");
    println!("{err}");
    assert!(nodedb_mem::installed().is_none());
    // Allowed explicitly, it installs, and says nothing is attributed.
    let gov = MemoryGovernor::builder()
        .global_ceiling(256 * MIB)
        .allow_unattributed(true)
        .install()
        .unwrap();
    assert_eq!(gov.snapshot().engine(EngineId::Query).range_bytes, 0);
}

#[test]
fn install_under_an_eight_gb_limit_attributes_and_reports_the_range() {
    let (ok, out) = run_child("child_install_under_a_limit", &[], Some(8_000_000));
    assert!(ok, "{out}");
    assert!(out.contains("range 268435456"), "{out}");
}

#[test]
#[ignore = "run by install_under_an_eight_gb_limit_attributes_and_reports_the_range"]
fn child_install_under_a_limit() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .budget(EngineId::Query, 256 * MIB)
        .install()
        .unwrap();
    let q = EngineId::Query;
    flush_thread();
    let base = gov.usage(q);
    let v = {
        let _g = EngineGuard::enter(q);
        vec![1u8; 100 << 20]
    };
    flush_thread();
    assert_eq!(gov.usage(q) - base, 100 << 20);
    let snap = gov.snapshot();
    let range = snap.engine(q).range_bytes;
    println!("range {range}");
    assert_eq!(snap.engine(EngineId::Unattributed).range_bytes, 0);
    assert!(gov.prometheus().contains(&format!(
        "nodedb_mem_engine_range_bytes{{engine=\"query\"}} {range}"
    )));
    drop(v);
}

#[test]
fn the_in_flight_bound_comes_from_the_environment_and_install_checks_it() {
    let (ok, out) = run_child("child_at_one_mib", &[(INFLIGHT_BOUND_ENV, "1MiB")], None);
    assert!(ok, "{out}");
    assert!(out.contains("bound 1048576, interval 393216"), "{out}");
    for (value, why) in [
        ("3MiB", "must be a power of two"),
        ("8MiB", "must be between 64 KiB and 4 MiB"),
        ("lots", "expected a number of bytes, such as 1MiB"),
    ] {
        let (ok, out) = run_child(
            "child_with_a_bad_bound",
            &[(INFLIGHT_BOUND_ENV, value)],
            None,
        );
        assert!(ok, "{out}");
        assert!(
            out.contains(&format!(
                "invalid configuration `NODEDB_MEM_INFLIGHT_BOUND` = {value}: {why}"
            )),
            "{out}"
        );
    }
}

#[test]
#[ignore = "run by the_in_flight_bound_comes_from_the_environment_and_install_checks_it"]
fn child_at_one_mib() {
    let b = nodedb_mem::inflight_bound();
    println!("bound {}, interval {}", b.batch, b.interval);
    // A program expecting another bound is refused, and told how to get it.
    let err = MemoryGovernor::builder()
        .global_ceiling(256 * MIB)
        .inflight_bound(64 << 10)
        .install()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration `inflight_bound` = 64 KiB: the process's bound is 1 MiB, fixed \
         at its first allocation; start it with NODEDB_MEM_INFLIGHT_BOUND=64KiB"
    );
    // The bound it runs under installs, and holds: a thread's unsettled bytes stay within it.
    let gov = MemoryGovernor::builder()
        .global_ceiling(256 * MIB)
        .inflight_bound(1 << 20)
        .background(None)
        .install()
        .unwrap();
    let q = EngineId::Query;
    flush_thread();
    let base = gov.usage(q);
    // Blocks of jemalloc's size classes (their usable size is their size), held in a list
    // allocated outside the engine.
    const CLASSES: [usize; 6] = [64, 128, 512, 1024, 2048, 4096];
    let mut live: Vec<Vec<u8>> = Vec::with_capacity(20_000);
    let mut bytes = 0u64;
    let mut worst = (i64::MAX, i64::MIN);
    let g = EngineGuard::enter(q);
    for i in 0..20_000usize {
        if i % 3 == 2 {
            bytes -= live.swap_remove((i * 7) % live.len()).len() as u64;
        } else {
            let n = CLASSES[(i * 13) % CLASSES.len()];
            live.push(vec![i as u8; n]);
            bytes += n as u64;
        }
        let off = gov.usage(q) as i64 - (base + bytes) as i64;
        worst = (worst.0.min(off), worst.1.max(off));
    }
    println!("ledger off by {} to {} B", worst.0, worst.1);
    assert!(
        worst.0 >= 0 && worst.1 < 1 << 20,
        "within [0, 1 MiB): {worst:?}"
    );
    assert!(worst.1 > 64 << 10, "the larger bound is used: {worst:?}");
    drop(live);
    drop(g);
    flush_thread();
    assert_eq!(gov.usage(q), base, "exact once the thread has flushed");
}

#[test]
#[ignore = "run by the_in_flight_bound_comes_from_the_environment_and_install_checks_it"]
fn child_with_a_bad_bound() {
    assert_eq!(
        nodedb_mem::inflight_bound().batch,
        64 << 10,
        "a bound that does not parse leaves the default"
    );
    let err = MemoryGovernor::builder()
        .global_ceiling(256 * MIB)
        .install()
        .unwrap_err();
    println!("{err}");
    assert!(nodedb_mem::installed().is_none());
}
