//! NUMA topology from `/sys`, read without allocating (the allocator reads it while it sets
//! itself up), and the placement decisions built on it.

use std::ffi::c_int;

pub use crate::id::MAX_NODES;
/// Most CPUs mapped to nodes; CPUs above this count as node 0's.
pub const MAX_CPUS: usize = 1024;

const NO_NODE: u8 = u8::MAX;

/// Nodes, their CPUs, memory sizes and distances.
///
/// On a machine without the `/sys` files (some containers) or with one node, the topology is
/// a single node 0 holding every CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    present: [bool; MAX_NODES],
    mem: [u64; MAX_NODES],
    distance: [[u8; MAX_NODES]; MAX_NODES],
    cpu_node: [u8; MAX_CPUS],
}

impl Topology {
    /// One node, 0, holding every CPU and all memory.
    pub const fn single() -> Topology {
        let mut t = Topology {
            present: [false; MAX_NODES],
            mem: [0; MAX_NODES],
            distance: [[0; MAX_NODES]; MAX_NODES],
            cpu_node: [0; MAX_CPUS],
        };
        t.present[0] = true;
        t.mem[0] = u64::MAX;
        t.distance[0][0] = 10;
        t
    }

    /// Reads the topology under `root` (`b"/"` in production; a directory of fake files in
    /// tests). Missing or unreadable files give [`Topology::single`]; nodes beyond
    /// [`MAX_NODES`] are ignored. Allocates nothing.
    pub fn read(root: &[u8]) -> Topology {
        let mut t = Topology {
            present: [false; MAX_NODES],
            mem: [0; MAX_NODES],
            distance: [[0; MAX_NODES]; MAX_NODES],
            cpu_node: [NO_NODE; MAX_CPUS],
        };
        let mut buf = [0u8; 4096];
        let mut any = false;
        for node in 0..MAX_NODES {
            let mut path = PathBuf::new(root);
            path.push(b"/sys/devices/system/node/node");
            path.push_num(node as u64);
            let dir_len = path.len;
            path.push(b"/cpulist");
            let Some(n) = read_file(&path, &mut buf) else {
                continue;
            };
            any = true;
            t.present[node] = true;
            for_each_in_list(&buf[..n], |cpu| {
                if let Some(slot) = t.cpu_node.get_mut(cpu as usize) {
                    *slot = node as u8;
                }
            });
            path.len = dir_len;
            path.push(b"/meminfo");
            if let Some(n) = read_file(&path, &mut buf) {
                t.mem[node] = parse_mem_total(&buf[..n]).unwrap_or(0);
            }
            path.len = dir_len;
            path.push(b"/distance");
            if let Some(n) = read_file(&path, &mut buf) {
                let mut to = 0;
                for_each_number(&buf[..n], |d| {
                    if to < MAX_NODES {
                        t.distance[node][to] = d.min(255) as u8;
                    }
                    to += 1;
                });
            }
        }
        if !any {
            return Topology::single();
        }
        // CPUs no node claims (offline, or above the files' knowledge) belong to the first node.
        let first = t.present.iter().position(|&p| p).unwrap_or(0) as u8;
        for slot in &mut t.cpu_node {
            if *slot == NO_NODE {
                *slot = first;
            }
        }
        t
    }

    /// Number of nodes present.
    pub fn node_count(&self) -> usize {
        self.present.iter().filter(|&&p| p).count()
    }

    /// Whether `node` is present.
    pub fn has_node(&self, node: usize) -> bool {
        self.present.get(node).copied().unwrap_or(false)
    }

    /// Memory of `node` in bytes (`u64::MAX` for the single-node fallback, which knows none).
    pub fn node_memory(&self, node: usize) -> u64 {
        self.mem.get(node).copied().unwrap_or(0)
    }

    /// The node `cpu` belongs to.
    pub fn node_of_cpu(&self, cpu: usize) -> usize {
        self.cpu_node.get(cpu).copied().unwrap_or(0) as usize
    }

    /// The CPUs of `node`, as a bitmask over CPU numbers (for `sched_setaffinity`).
    pub fn cpus_of(&self, node: usize) -> impl Iterator<Item = usize> + '_ {
        let present = self.has_node(node);
        self.cpu_node
            .iter()
            .enumerate()
            .filter(move |&(_, &n)| present && n as usize == node)
            .map(|(cpu, _)| cpu)
    }

    /// Where memory for threads running on `node` is placed: the node itself when it has
    /// memory, else the nearest node that has (by the kernel's distance table; the lowest
    /// number on ties, and node 0's memory if nothing is known).
    pub fn memory_node_for(&self, node: usize) -> usize {
        if self.node_memory(node) > 0 {
            return node;
        }
        let mut best: Option<(u8, usize)> = None;
        for (other, &present) in self.present.iter().enumerate() {
            if !present || self.mem[other] == 0 {
                continue;
            }
            let d = self
                .distance
                .get(node)
                .map_or(u8::MAX, |row| row[other])
                .max(1);
            if best.is_none_or(|(bd, _)| d < bd) {
                best = Some((d, other));
            }
        }
        best.map_or(0, |(_, n)| n)
    }

    /// The node whose arenas serve a thread running on `cpu`.
    pub fn placement_for_cpu(&self, cpu: usize) -> usize {
        self.memory_node_for(self.node_of_cpu(cpu))
    }
}

/// A path assembled on the stack.
struct PathBuf {
    bytes: [u8; 512],
    len: usize,
}

impl PathBuf {
    fn new(root: &[u8]) -> PathBuf {
        let mut p = PathBuf {
            bytes: [0; 512],
            len: 0,
        };
        let root = if root == b"/" { &[][..] } else { root };
        p.push(root.strip_suffix(b"/").unwrap_or(root));
        p
    }

    fn push(&mut self, s: &[u8]) {
        let end = (self.len + s.len()).min(self.bytes.len() - 1);
        let n = end - self.len;
        self.bytes[self.len..end].copy_from_slice(&s[..n]);
        self.len = end;
    }

    fn push_num(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// Reads a small file into `out` with raw system calls; `None` if it cannot be read.
fn read_file(path: &PathBuf, out: &mut [u8]) -> Option<usize> {
    let mut z = [0u8; 513];
    z[..path.len].copy_from_slice(&path.bytes[..path.len]);
    // SAFETY: `z` is NUL-terminated (zeroed beyond `len`); open has no other preconditions.
    let fd: c_int = unsafe { libc::open(z.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    let mut total = 0;
    while total < out.len() {
        // SAFETY: reading into the unfilled tail of `out`, whose length bounds the read.
        let n = unsafe { libc::read(fd, out[total..].as_mut_ptr().cast(), out.len() - total) };
        if n <= 0 {
            break;
        }
        total += n as usize;
    }
    // SAFETY: `fd` was opened above and is closed once.
    unsafe { libc::close(fd) };
    Some(total)
}

/// Calls `f` for every number in a kernel list like `0-3,8,10-11`.
fn for_each_in_list(text: &[u8], mut f: impl FnMut(u64)) {
    for part in text.split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() {
            continue;
        }
        let mut ends = part.splitn(2, |&b| b == b'-');
        let (Some(lo), hi) = (ends.next().and_then(parse_u64), ends.next()) else {
            continue;
        };
        let hi = hi.and_then(parse_u64).unwrap_or(lo);
        for v in lo..=hi.min(lo + MAX_CPUS as u64) {
            f(v);
        }
    }
}

fn for_each_number(text: &[u8], mut f: impl FnMut(u64)) {
    for word in text.split(|b| b.is_ascii_whitespace()) {
        if let Some(v) = parse_u64(word) {
            f(v);
        }
    }
}

use super::parse::field as parse_u64;

/// `MemTotal` from a node's `meminfo` ("Node 0 MemTotal:  7563040 kB"), in bytes.
fn parse_mem_total(text: &[u8]) -> Option<u64> {
    let line = text
        .split(|&b| b == b'\n')
        .find(|l| l.windows(9).any(|w| w == b"MemTotal:"))?;
    let after = line.split(|&b| b == b':').nth(1)?;
    let kib = after
        .split(|b| b.is_ascii_whitespace())
        .find_map(parse_u64)?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_and_numbers_parse() {
        let mut v = Vec::new();
        for_each_in_list(b"0-3,8,10-11\n", |x| v.push(x));
        assert_eq!(v, [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(
            parse_mem_total(b"Node 1 MemTotal:  2048 kB\nNode 1 MemFree: 1 kB\n"),
            Some(2 << 20)
        );
        assert_eq!(parse_u64(b"12x"), None);
    }
}
