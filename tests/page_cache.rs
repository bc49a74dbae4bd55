//! Governed file I/O keeps an engine's page-cache footprint under its budget, where plain
//! writes leave nearly everything cached; protected regions stay resident and count against
//! the budget. Residency is measured with `mincore` over a mapping of the file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;

use nodedb_mem::{EngineId, MemError, MemoryGovernor, resident_bytes};

const MIB: usize = 1 << 20;
const TS: EngineId = EngineId::Timeseries;

/// A scratch file on disk (the target directory; not tmpfs).
fn scratch() -> File {
    tempfile::tempfile_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// How much of `file` is in the page cache now (`len`: what the caller expects it to hold).
fn cached(file: &File, len: usize) -> u64 {
    assert!(file.metadata().unwrap().len() >= len as u64);
    nodedb_mem::cached_bytes(file).unwrap()
}

/// Another descriptor of the writer's file, to measure it.
fn scratch_view(w: &nodedb_mem::GovernedWriter) -> File {
    w.file().try_clone().unwrap()
}

fn governor(budget: u64) -> MemoryGovernor {
    MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .budget(TS, 256 * MIB as u64)
        .page_cache_budget(TS, budget)
        .build()
        .unwrap()
}

#[test]
fn a_two_gib_governed_flush_leaves_at_most_its_budget_cached() {
    let total = 2048 * MIB;
    let budget = 32 * MIB as u64;
    let gov = governor(budget);
    let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();

    // Plain writes: nearly everything stays in the page cache.
    let mut plain = scratch();
    for _ in 0..total / MIB {
        plain.write_all(&chunk).unwrap();
    }
    let plain_cached = cached(&plain, total);

    // The same flush through a governed writer.
    let mut w = gov.writer(TS, scratch()).unwrap();
    let mut peak_cached = 0;
    for i in 0..total / MIB {
        w.write_all(&chunk).unwrap();
        assert!(
            gov.page_cache(TS).left_behind <= budget + MIB as u64,
            "left behind {} at {i} MiB",
            gov.page_cache(TS).left_behind
        );
        if i % 256 == 255 {
            assert!(w.left_behind() <= budget + MIB as u64);
            // What the kernel holds of the file, measured while the flush runs.
            let f = scratch_view(&w);
            peak_cached = peak_cached.max(cached(&f, (i + 1) * MIB));
        }
    }
    let mut file = w.finish().unwrap();
    let governed_cached = cached(&file, total);
    let stats = gov.page_cache(TS);
    eprintln!(
        "2 GiB flush: plain leaves {} MiB cached, governed {} MiB (budget {} MiB, peak {} MiB)",
        plain_cached >> 20,
        governed_cached >> 20,
        budget >> 20,
        stats.peak >> 20
    );
    assert!(
        plain_cached >= total as u64 * 3 / 4,
        "plain writes left only {} MiB cached",
        plain_cached >> 20
    );
    assert!(
        governed_cached <= budget,
        "{} MiB cached",
        governed_cached >> 20
    );
    assert!(stats.peak <= budget + MIB as u64);
    assert_eq!(stats.left_behind, 0);
    assert_eq!(stats.dropped, total as u64);
    eprintln!(
        "  most of it cached at a check during the flush: {} MiB",
        peak_cached >> 20
    );
    assert!(
        peak_cached <= 2 * budget,
        "{} MiB cached mid-flush",
        peak_cached >> 20
    );

    // Nothing written is lost: read it all back, through a governed reader.
    file.seek(SeekFrom::Start(0)).unwrap();
    let mut r = gov.reader(TS, file).unwrap();
    let mut buf = vec![0u8; MIB];
    for i in 0..total / MIB {
        r.read_exact(&mut buf).unwrap();
        assert!(buf == chunk, "MiB {i} differs");
        assert!(r.left_behind() <= budget + MIB as u64);
    }
    let file = r.into_inner().unwrap();
    let read_cached = cached(&file, total);
    eprintln!(
        "2 GiB governed read: {} MiB cached after it",
        read_cached >> 20
    );
    assert!(read_cached <= budget, "{} MiB cached", read_cached >> 20);
    assert_eq!(gov.page_cache(TS).left_behind, 0);
}

#[test]
fn io_errors_come_back_unchanged() {
    let gov = governor(8 * MIB as u64);
    // A file opened read-only: writing fails with EBADF, as it would on the `File`.
    let path = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let ro = File::open(path.path()).unwrap();
    let mut w = gov.writer(TS, ro).unwrap();
    let err = w.write(b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    assert_eq!(gov.page_cache(TS).left_behind, 0);
    drop(w);
    // Bad page-cache budgets are refused at build time.
    let err = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .page_cache_budget(TS, 0u64)
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration `page_cache.timeseries` = 0 B: must be above zero"
    );
}

#[test]
fn a_protected_region_stays_resident_and_counts_against_the_budget() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .budget(EngineId::Vector, 48 * MIB as u64)
        .build()
        .unwrap();
    let v = EngineId::Vector;
    // A 32 MiB index file, written and then dropped from the cache.
    let mut file = scratch();
    let page: Vec<u8> = (0..4096).map(|i| i as u8).collect();
    for _ in 0..(32 * MIB / 4096) {
        file.write_all(&page).unwrap();
    }
    file.sync_all().unwrap();
    // SAFETY: our descriptor; advice only.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let map = nodedb_mem::MappedFile::open(&file).unwrap();
    assert_eq!(map.bytes().len(), 32 * MIB);
    assert!(resident_bytes(map.bytes()).unwrap() < 32 * MIB as u64);

    let before = gov.usage(v);
    let p = gov.protect(v, map.bytes()).unwrap();
    assert_eq!(
        p.resident().unwrap(),
        32 * MIB as u64,
        "locked means resident"
    );
    assert_eq!(
        gov.usage(v) - before,
        32 * MIB as u64,
        "counted against the engine"
    );
    assert_eq!(gov.page_cache(v).protected, 32 * MIB as u64);
    assert_eq!(gov.page_cache(v).protected_resident, 32 * MIB as u64);
    let text = gov.prometheus();
    for name in ["protected_bytes", "protected_resident_bytes"] {
        assert!(
            text.contains(&format!(
                "nodedb_mem_engine_{name}{{engine=\"vector\"}} {}",
                32 * MIB
            )),
            "{name}"
        );
    }
    // Dropping the page cache does not evict locked pages.
    // SAFETY: as above.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(p.resident().unwrap(), 32 * MIB as u64);

    // A second protection past the budget is refused cleanly, with nothing locked or counted.
    let err = gov.protect(v, map.bytes()).unwrap_err();
    assert!(matches!(err, MemError::BudgetExceeded { .. }), "{err}");
    assert!(err.is_over_budget());
    assert_eq!(gov.usage(v) - before, 32 * MIB as u64);
    assert_eq!(gov.page_cache(v).protected, 32 * MIB as u64);

    drop(p);
    assert_eq!(gov.usage(v), before);
    assert_eq!(gov.page_cache(v).protected, 0);
    assert_eq!(gov.page_cache(v).protected_resident, 0);
}

#[test]
fn a_governed_directory_is_swept_out_of_the_page_cache() {
    let gov = governor(8 * MIB as u64);
    let q = EngineId::Query;
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let err = gov.govern_dir(q, dir.path().join("missing")).unwrap_err();
    assert!(err.to_string().ends_with(": not a directory"), "{err}");
    gov.govern_dir(q, dir.path()).unwrap();
    // A library writes its spill files there with plain writes, in a subdirectory.
    std::fs::create_dir(dir.path().join("spill")).unwrap();
    let mut f = File::create(dir.path().join("spill").join("part-0.arrow")).unwrap();
    let chunk = vec![3u8; MIB];
    for _ in 0..256 {
        f.write_all(&chunk).unwrap();
    }
    let first = gov.sweep_governed_dirs();
    assert_eq!(first.files, 1);
    assert!(first.cached_before >= 200 * MIB as u64, "{first:?}");
    // Pages still being written back stay until they are clean; the next sweep drops them.
    f.sync_all().unwrap();
    let second = gov.sweep_governed_dirs();
    eprintln!("governed directory: {first:?} then {second:?}");
    assert!(second.cached_after <= 4 * MIB as u64, "{second:?}");
    let stats = gov.page_cache(q);
    assert_eq!(stats.dirs_cached, second.cached_before);
    assert!(stats.dirs_dropped >= 200 * MIB as u64, "{stats:?}");
    // Nothing lost: the file reads back.
    let mut back = Vec::new();
    File::open(dir.path().join("spill").join("part-0.arrow"))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back.len(), 256 * MIB);
    assert!(back.iter().all(|&b| b == 3));
}

/// The byte at file offset `i` of the direct-I/O tests (position-dependent, so a block written
/// twice or out of place shows).
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

fn o_direct_set(file: &File) -> bool {
    // SAFETY: our descriptor; reads its status flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    assert!(flags >= 0);
    flags & libc::O_DIRECT != 0
}

#[test]
fn a_direct_flush_leaves_nothing_cached_and_loses_nothing() {
    let gov = governor(8 * MIB as u64);
    let total: u64 = 64 * MIB as u64 + 12_345;
    // The writer starts at an unaligned position, after 100 bytes written plainly.
    let mut file = scratch();
    let lead: Vec<u8> = (0..100).map(pattern).collect();
    file.write_all(&lead).unwrap();
    file.sync_all().unwrap();
    let mut w = gov.direct_writer(TS, file).unwrap();
    assert!(
        w.is_direct(),
        "the target directory's file system does direct I/O"
    );
    // Writes of an odd size, so no write lines up with a block.
    let piece = 3 * MIB as u64 / 2 + 7;
    let mut pos = 100u64;
    let mut most_cached = 0u64;
    while pos < 100 + total {
        let n = piece.min(100 + total - pos);
        let buf: Vec<u8> = (pos..pos + n).map(pattern).collect();
        w.write_all(&buf).unwrap();
        pos += n;
        assert!(
            o_direct_set(w.file()),
            "O_DIRECT on the descriptor while writing"
        );
        most_cached = most_cached.max(nodedb_mem::cached_bytes(w.file()).unwrap());
        assert_eq!(w.left_behind(), 0, "nothing charged between the ends");
    }
    let file = w.finish().unwrap();
    assert!(!o_direct_set(&file), "the descriptor's flags put back");
    let after = nodedb_mem::cached_bytes(&file).unwrap();
    let stats = gov.page_cache(TS);
    eprintln!(
        "direct flush of {} MiB: at most {most_cached} B cached while writing, {after} B after; \
         {} B direct, {} B through the cache",
        total >> 20,
        stats.direct_written,
        stats.dropped
    );
    // Only the partial blocks at either end went through the cache, and were dropped.
    assert_eq!(stats.direct_written + stats.dropped, total);
    assert!(stats.dropped < 8192, "{stats:?}");
    assert_eq!(stats.left_behind, 0);
    assert!(
        most_cached <= 64 << 10,
        "{most_cached} B cached while writing"
    );
    assert!(after <= 8192, "{after} B cached after finish");
    // Every byte where it belongs, and nothing past the end.
    assert_eq!(file.metadata().unwrap().len(), 100 + total);
    let mut back = Vec::new();
    File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert_eq!(back.len() as u64, 100 + total);
    if let Some(i) = (0..back.len()).find(|&i| back[i] != pattern(i as u64)) {
        panic!("byte {i} differs");
    }
    let text = gov.prometheus();
    assert!(text.contains(&format!(
        "nodedb_mem_engine_page_cache_direct_bytes_total{{engine=\"timeseries\"}} {}",
        stats.direct_written
    )));
}

#[test]
fn a_direct_writer_dropped_unfinished_writes_everything() {
    let gov = governor(8 * MIB as u64);
    let file = scratch();
    let view = file.try_clone().unwrap();
    let total = 3 * MIB as u64 + 5;
    let mut w = gov.direct_writer(TS, file).unwrap();
    let buf: Vec<u8> = (0..total).map(pattern).collect();
    w.write_all(&buf).unwrap();
    // Up to 1 MiB is still gathered in the writer; dropping it writes that too.
    drop(w);
    assert!(!o_direct_set(&view));
    assert_eq!(view.metadata().unwrap().len(), total);
    let mut back = Vec::new();
    File::open(format!("/proc/self/fd/{}", view.as_raw_fd()))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == buf, "contents differ");
    assert_eq!(gov.page_cache(TS).left_behind, 0);
}

#[test]
fn an_appending_writer_drops_what_it_appended() {
    // A file opened for appending with 32 MiB in it already, not cached.
    let path = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut f = File::create(path.path()).unwrap();
    f.write_all(&vec![1u8; 32 * MIB]).unwrap();
    f.sync_all().unwrap();
    // SAFETY: our descriptor; advice only.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    drop(f);
    let budget = 8 * MIB as u64;
    for direct in [false, true] {
        let gov = governor(budget);
        let before = std::fs::metadata(path.path()).unwrap().len();
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path.path())
            .unwrap();
        let mut w = if direct {
            gov.direct_writer(TS, file).unwrap()
        } else {
            gov.writer(TS, file).unwrap()
        };
        let chunk = vec![2u8; MIB];
        for _ in 0..64 {
            w.write_all(&chunk).unwrap();
        }
        let file = w.finish().unwrap();
        let len = file.metadata().unwrap().len();
        assert_eq!(len, before + 64 * MIB as u64);
        // What was appended is what was dropped: the cache holds none of it. (Measured through
        // a readable descriptor: an append-only one cannot be mapped.)
        let cached = nodedb_mem::cached_bytes(&File::open(path.path()).unwrap()).unwrap();
        eprintln!("appending (direct: {direct}): {cached} B of the file cached after finish");
        assert!(cached <= budget, "{cached} B cached (direct: {direct})");
        let stats = gov.page_cache(TS);
        assert_eq!(stats.dropped + stats.direct_written, 64 * MIB as u64);
        let mut back = Vec::new();
        let mut reread = File::open(path.path()).unwrap();
        reread.read_to_end(&mut back).unwrap();
        assert!(back[before as usize..].iter().all(|&b| b == 2));
        assert!(back[..32 * MIB].iter().all(|&b| b == 1));
        // Reading it back cached it all: out again for the next round.
        // SAFETY: our descriptor; advice only.
        unsafe { libc::posix_fadvise(reread.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// This process's locked memory (`VmLck`), in bytes.
fn locked_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmLck:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// This process's peak resident memory (`VmHWM`), in bytes.
fn peak_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[test]
fn overlapping_protections_keep_what_the_live_ones_cover_locked() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .budget(EngineId::Vector, 256 * MIB as u64)
        .build()
        .unwrap();
    let v = EngineId::Vector;
    let mut file = scratch();
    file.write_all(&vec![5u8; 48 * MIB]).unwrap();
    let map = nodedb_mem::MappedFile::open(&file).unwrap();
    let bytes = map.bytes();
    assert_eq!(locked_bytes(), 0);
    let a = gov.protect(v, &bytes[..32 * MIB]).unwrap();
    let b = gov.protect(v, &bytes[16 * MIB..]).unwrap();
    assert_eq!(locked_bytes(), 48 * MIB as u64);
    drop(a);
    // [16, 48) is still protected by `b`: only [0, 16) is unlocked.
    assert_eq!(locked_bytes(), 32 * MIB as u64);
    assert_eq!(b.resident().unwrap(), 32 * MIB as u64);
    drop(b);
    assert_eq!(locked_bytes(), 0);
    // The same region twice; one dropped: the other keeps it locked.
    let c = gov.protect(v, &bytes[..8 * MIB]).unwrap();
    let d = gov.protect(v, &bytes[..8 * MIB]).unwrap();
    drop(c);
    assert_eq!(locked_bytes(), 8 * MIB as u64);
    // Unaligned ends sharing a page: the shared page stays locked while one lives.
    let e = gov.protect(v, &bytes[8 * MIB..8 * MIB + 100]).unwrap();
    let f = gov
        .protect(v, &bytes[8 * MIB + 200..8 * MIB + 300])
        .unwrap();
    assert_eq!(locked_bytes(), 8 * MIB as u64 + 4096);
    drop(e);
    assert_eq!(locked_bytes(), 8 * MIB as u64 + 4096);
    drop((d, f));
    assert_eq!(locked_bytes(), 0);
    assert_eq!(gov.page_cache(v).protected, 0);
}

#[test]
fn a_sweep_costs_what_a_sparse_file_holds_not_its_apparent_size() {
    let gov = governor(32 * MIB as u64);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.path().join("sparse"))
        .unwrap();
    // 512 GiB apparent, 1 MiB of data at 100 GiB.
    file.set_len(512 << 30).unwrap();
    file.seek(SeekFrom::Start(100 << 30)).unwrap();
    file.write_all(&vec![9u8; MIB]).unwrap();
    assert!(file.metadata().unwrap().len() == 512 << 30);
    gov.govern_dir(TS, dir.path()).unwrap();
    let peak = peak_bytes();
    let s = gov.sweep_governed_dirs();
    // A byte per page of the apparent size was 128 MiB here.
    let grew = peak_bytes() - peak;
    assert!(grew < 8 * MIB as u64, "peak memory grew by {grew} B");
    assert_eq!(s.files, 1);
    assert_eq!(s.cached_before, MIB as u64);
    // The data is what it was, and `cached_bytes` left the position where it was.
    file.seek(SeekFrom::Start(100 << 30)).unwrap();
    let before = nodedb_mem::cached_bytes(&file).unwrap();
    assert!(before <= MIB as u64);
    assert_eq!(file.stream_position().unwrap(), 100 << 30);
    let mut back = vec![0u8; MIB];
    file.read_exact(&mut back).unwrap();
    assert!(back.iter().all(|&b| b == 9));
}

#[test]
fn a_sweep_examines_at_most_its_budget_and_the_next_resumes_after_it() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .sweep_budget(MIB as u64)
        .build()
        .unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let files: Vec<File> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.path().join(name))
                .unwrap();
            f.write_all(&vec![1u8; MIB]).unwrap();
            // Clean pages: a sweep drops them at once.
            f.sync_all().unwrap();
            f
        })
        .collect();
    assert!(files.iter().all(|f| cached(f, MIB) == MIB as u64));
    gov.govern_dir(TS, dir.path()).unwrap();
    // Each sweep takes one file's MiB, in path order.
    for i in 0..3 {
        let s = gov.sweep_governed_dirs();
        assert_eq!(s.cached_before, MIB as u64, "sweep {i}");
        assert_eq!(s.cached_after, 0, "sweep {i}");
        for (j, f) in files.iter().enumerate() {
            let expected = if j <= i { 0 } else { MIB as u64 };
            assert_eq!(cached(f, MIB), expected, "file {j} after sweep {i}");
        }
    }
    let err = MemoryGovernor::builder()
        .global_ceiling(1 << 30)
        .sweep_budget(0)
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration `sweep_budget` = 0 B: must be above zero"
    );
}
