//! The NUMA topology parser and placement decisions, on machines described by files.

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nodedb_mem_alloc::ctl::numa::Topology;

struct Node<'a> {
    cpus: &'a str,
    mem_kib: u64,
    distance: &'a str,
}

fn machine(nodes: &[Node<'_>]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for (i, n) in nodes.iter().enumerate() {
        let dir = root.path().join(format!("sys/devices/system/node/node{i}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cpulist"), format!("{}\n", n.cpus)).unwrap();
        std::fs::write(
            dir.join("meminfo"),
            format!(
                "Node {i} MemTotal:       {} kB\nNode {i} MemFree:  1 kB\n",
                n.mem_kib
            ),
        )
        .unwrap();
        std::fs::write(dir.join("distance"), format!("{}\n", n.distance)).unwrap();
    }
    root
}

fn read(root: &Path) -> Topology {
    Topology::read(root.as_os_str().as_bytes())
}

#[test]
fn two_nodes() {
    let m = machine(&[
        Node {
            cpus: "0-3",
            mem_kib: 8 << 20,
            distance: "10 21",
        },
        Node {
            cpus: "4-7",
            mem_kib: 4 << 20,
            distance: "21 10",
        },
    ]);
    let t = read(m.path());
    assert_eq!(t.node_count(), 2);
    assert_eq!(t.node_memory(0), 8 << 30);
    assert_eq!(t.node_memory(1), 4 << 30);
    assert_eq!(
        (0..8).map(|c| t.placement_for_cpu(c)).collect::<Vec<_>>(),
        [0, 0, 0, 0, 1, 1, 1, 1]
    );
    assert_eq!(t.cpus_of(1).collect::<Vec<_>>(), [4, 5, 6, 7]);
}

#[test]
fn four_nodes_with_interleaved_cpus() {
    let m = machine(&[
        Node {
            cpus: "0,4,8,12",
            mem_kib: 1 << 20,
            distance: "10 16 16 22",
        },
        Node {
            cpus: "1,5,9,13",
            mem_kib: 1 << 20,
            distance: "16 10 22 16",
        },
        Node {
            cpus: "2,6,10,14",
            mem_kib: 1 << 20,
            distance: "16 22 10 16",
        },
        Node {
            cpus: "3,7,11,15",
            mem_kib: 1 << 20,
            distance: "22 16 16 10",
        },
    ]);
    let t = read(m.path());
    assert_eq!(t.node_count(), 4);
    for cpu in 0..16 {
        assert_eq!(t.placement_for_cpu(cpu), cpu % 4, "cpu {cpu}");
    }
    assert_eq!(t.cpus_of(2).collect::<Vec<_>>(), [2, 6, 10, 14]);
}

#[test]
fn a_memoryless_node_uses_its_nearest_node_with_memory() {
    let m = machine(&[
        Node {
            cpus: "0-1",
            mem_kib: 2 << 20,
            distance: "10 20 30",
        },
        Node {
            cpus: "2-3",
            mem_kib: 0,
            distance: "20 10 12",
        },
        Node {
            cpus: "4-5",
            mem_kib: 2 << 20,
            distance: "30 12 10",
        },
    ]);
    let t = read(m.path());
    assert_eq!(t.node_memory(1), 0);
    assert_eq!(
        t.memory_node_for(1),
        2,
        "node 2 is nearer (12) than node 0 (20)"
    );
    assert_eq!(t.placement_for_cpu(2), 2);
    assert_eq!(t.placement_for_cpu(0), 0);
    assert_eq!(t.placement_for_cpu(5), 2);
}

#[test]
fn without_the_files_there_is_one_node() {
    let empty = tempfile::tempdir().unwrap();
    let t = read(empty.path());
    assert_eq!(t, Topology::single());
    assert_eq!(t.node_count(), 1);
    assert_eq!(t.placement_for_cpu(17), 0);
}

#[test]
fn this_machine() {
    let t = Topology::read(b"/");
    assert!(t.node_count() >= 1);
    // SAFETY: sched_getcpu has no preconditions.
    let cpu = unsafe { libc::sched_getcpu() };
    assert!(cpu >= 0);
    assert!(t.has_node(t.placement_for_cpu(cpu as usize)));
}
