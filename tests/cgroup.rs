//! The kernel's figures for the process's memory cgroup in the snapshot and the metrics, read
//! from a fake cgroup tree (a directory standing in for `/`).

use nodedb_mem::{CgroupVersion, MemoryGovernor};

fn file(root: &std::path::Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, text).unwrap();
}

#[test]
fn the_snapshot_and_prometheus_carry_the_cgroups_figures() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    file(r, "proc/self/cgroup", "0::/db\n");
    file(r, "sys/fs/cgroup/db/memory.current", "104857600\n");
    file(r, "sys/fs/cgroup/db/memory.max", "268435456\n");
    file(r, "sys/fs/cgroup/db/memory.high", "max\n");
    file(
        r,
        "sys/fs/cgroup/db/memory.events",
        "low 0\nhigh 0\nmax 7\noom 0\noom_kill 0\n",
    );
    file(
        r,
        "sys/fs/cgroup/db/memory.stat",
        "anon 52428800\nfile 41943040\n",
    );
    file(
        r,
        "sys/fs/cgroup/db/memory.pressure",
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=1500000\n\
         full avg10=0.00 avg60=0.00 avg300=0.00 total=500000\n",
    );
    let gov = MemoryGovernor::builder()
        .ceiling_environment(None, r)
        .build()
        .unwrap();
    // The ceiling is the cgroup's limit; the figures come from the same cgroup.
    assert_eq!(gov.ceiling(), 256 << 20);
    let c = gov.snapshot().cgroup.unwrap();
    assert_eq!(c.version, CgroupVersion::V2);
    assert_eq!(
        (c.current, c.max, c.high),
        (Some(100 << 20), Some(256 << 20), None)
    );
    assert_eq!((c.events.max, c.stat.file), (Some(7), Some(40 << 20)));
    assert_eq!(c.pressure.unwrap().full.total_us, 500_000);
    // The limit moves: the next reading sees it.
    file(r, "sys/fs/cgroup/db/memory.max", "134217728\n");
    assert_eq!(gov.cgroup().unwrap().max, Some(128 << 20));
    let text = gov.prometheus();
    assert!(
        text.contains("\nnodedb_mem_cgroup_max_bytes 134217728\n"),
        "{text}"
    );
    assert!(
        text.contains("\nnodedb_mem_cgroup_pressure_stall_seconds_total{kind=\"some\"} 1.5\n"),
        "{text}"
    );
    // The cgroup removed under the process: every figure unknown, each file named, no panic.
    std::fs::remove_dir_all(r.join("sys/fs/cgroup/db")).unwrap();
    let c = gov.cgroup().unwrap();
    assert_eq!((c.current, c.max), (None, None));
    assert_eq!(c.problems.len(), 4, "{:?}", c.problems);
    assert!(
        gov.prometheus()
            .contains("\nnodedb_mem_cgroup_read_problems 4\n")
    );
}

#[test]
fn outside_a_memory_cgroup_there_are_no_figures() {
    let root = tempfile::tempdir().unwrap();
    file(root.path(), "proc/meminfo", "MemTotal:       2097152 kB\n");
    let gov = MemoryGovernor::builder()
        .ceiling_environment(None, root.path())
        .build()
        .unwrap();
    assert_eq!(gov.cgroup(), None);
    assert!(!gov.prometheus().contains("nodedb_mem_cgroup_"));
}
