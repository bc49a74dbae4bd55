//! On this machine: engine extents are bound to their node with `mbind` (checked with
//! `get_mempolicy` and in `/proc/self/numa_maps`), pinning works and fails cleanly, and
//! allocations still land in the right engine. This binary installs `GovernedAlloc`.

use nodedb_mem_alloc::{
    EngineGuard, EngineId, GovernedAlloc, ctl::arenas::node_of, ctl::arenas::owner,
    ctl::numa::NumaError, ctl::numa::bind_thread_to_local_numa, ctl::numa::machine_topology,
    ctl::numa::mbind_failures, ctl::numa::pin_thread_arena, ctl::numa::thread_node,
};

#[global_allocator]
static ALLOC: GovernedAlloc = GovernedAlloc::new();

const MPOL_PREFERRED: i32 = 1;
const MPOL_F_ADDR: libc::c_ulong = 2;

fn policy_of(addr: *const u8) -> (i32, u64) {
    let mut mode: i32 = -1;
    let mut mask: u64 = 0;
    // SAFETY: get_mempolicy writes the mode and a 64-bit node mask for the page at `addr`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut mode as *mut i32,
            &mut mask as *mut u64,
            64 as libc::c_ulong,
            addr,
            MPOL_F_ADDR,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    (mode, mask)
}

#[test]
fn engine_memory_is_bound_to_its_node() {
    let block = {
        let _g = EngineGuard::enter(EngineId::Vector);
        vec![3u8; 1 << 20]
    };
    assert_eq!(owner(block.as_ptr()), EngineId::Vector);
    let node = node_of(block.as_ptr());
    assert!(machine_topology().has_node(node));
    assert_eq!(policy_of(block.as_ptr()), (MPOL_PREFERRED, 1 << node));
    assert_eq!(mbind_failures(), 0);

    assert_kernel_prefers(block.as_ptr(), node);
}

/// The kernel's own view: the mapping holding `ptr` in `/proc/self/numa_maps` prefers `node`.
fn assert_kernel_prefers(ptr: *const u8, node: usize) {
    let maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
    let addr = ptr as usize;
    let line = maps
        .lines()
        .filter_map(|l| {
            let start = usize::from_str_radix(l.split_whitespace().next()?, 16).ok()?;
            (start <= addr).then_some((start, l))
        })
        .max_by_key(|(start, _)| *start)
        .map(|(_, l)| l.to_owned())
        .unwrap();
    eprintln!("numa_maps: {line}");
    assert!(line.contains(&format!("prefer:{node}")), "{line}");
}

#[test]
fn pinning_moves_the_thread_and_fails_cleanly() {
    std::thread::spawn(|| {
        let cores = libc::CPU_SETSIZE as usize;
        // SAFETY: an all-zero cpu_set_t is a valid value to fill.
        let affinity = || unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set);
            (0..cores)
                .filter(|&c| libc::CPU_ISSET(c, &set))
                .collect::<Vec<_>>()
        };
        let before = affinity();
        let err = pin_thread_arena(100_000).unwrap_err();
        assert!(matches!(err, NumaError::NoSuchCore { core: 100_000, .. }));
        assert!(
            err.to_string()
                .starts_with("no CPU 100000: this machine has "),
            "{err}"
        );
        assert_eq!(
            affinity(),
            before,
            "a failed pin leaves the thread as it was"
        );

        // The last CPU this thread may run on (a container's cpuset may not start at 0).
        let last = *before.last().expect("at least one allowed CPU");
        let node = pin_thread_arena(last).unwrap();
        assert_eq!(affinity(), vec![last]);
        assert_eq!(thread_node(), node);
        assert_eq!(node, machine_topology().placement_for_cpu(last));
        let after_pin = {
            let _g = EngineGuard::enter(EngineId::Query);
            (0..300)
                .map(|i| Box::new([i as u8; 64]))
                .collect::<Vec<_>>()
        };
        assert!(
            after_pin
                .iter()
                .all(|b| owner(b.as_ptr()) == EngineId::Query)
        );
        assert!(after_pin.iter().all(|b| node_of(b.as_ptr()) == node));
        let big = {
            let _g = EngineGuard::enter(EngineId::Query);
            vec![1u8; 4 << 20]
        };
        assert_eq!(node_of(big.as_ptr()), node);
        assert_eq!(policy_of(big.as_ptr()), (MPOL_PREFERRED, 1 << node));
        assert_kernel_prefers(big.as_ptr(), node);

        let local = bind_thread_to_local_numa().unwrap();
        assert_eq!(local, machine_topology().placement_for_cpu(last));
        assert!(affinity().contains(&last));
    })
    .join()
    .unwrap();
}
