//! The file-backed overflow region: unnamed 0600 file, lazy growth within a capacity, page-out
//! that drops resident memory with the data intact, hole punching, tmpfs refusal, and
//! injected failures of the backing store.

use std::os::fd::AsRawFd;
use std::sync::Mutex;

use nodedb_mem_alloc::{
    ctl::overflow::OverflowError, ctl::overflow::OverflowRegion,
    ctl::overflow::fault as overflow_fault,
};

const MIB: usize = 1 << 20;

/// Fault injection is process-wide: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A scratch directory on a disk-backed filesystem: the target directory's, or else the
/// checkout's (which CI clones onto disk).
fn disk_dir() -> tempfile::TempDir {
    for base in [env!("CARGO_TARGET_TMPDIR"), env!("CARGO_MANIFEST_DIR")] {
        let dir = tempfile::tempdir_in(base).unwrap();
        match OverflowRegion::create(dir.path(), 4096, false) {
            Err(OverflowError::Tmpfs) => continue,
            _ => return dir,
        }
    }
    panic!("no disk-backed directory to test the overflow region in");
}

fn rss_file_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssFile:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn the_backing_file_has_no_name_and_mode_0600() {
    let _s = serial();
    let dir = disk_dir();
    let region = OverflowRegion::create(dir.path(), 4 * MIB, false).unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no file name is visible"
    );
    // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat fills `st` for our open descriptor.
    let rc = unsafe { libc::fstat(region.file().as_raw_fd(), &mut st) };
    assert_eq!(rc, 0);
    assert_eq!(st.st_mode & 0o777, 0o600);
    assert_eq!(
        st.st_nlink, 0,
        "the file has no link: it goes away with the descriptor"
    );
    let link = std::fs::read_link(format!("/proc/self/fd/{}", region.file().as_raw_fd())).unwrap();
    assert!(link.to_string_lossy().ends_with("(deleted)"), "{link:?}");
    drop(region);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn it_grows_lazily_within_its_capacity() {
    let _s = serial();
    let dir = disk_dir();
    let region = OverflowRegion::create(dir.path(), 8 * MIB + 1, false).unwrap();
    assert_eq!(region.capacity(), 8 * MIB + 4096, "rounded up to a page");
    assert!(region.is_empty());
    assert_eq!(region.grow_to(MIB + 1).unwrap(), MIB + 4096);
    // SAFETY: the first MiB + a page is mapped read-write.
    let bytes = unsafe { std::slice::from_raw_parts_mut(region.base(), MIB + 4096) };
    bytes.fill(0xAB);
    assert_eq!(region.grow_to(100).unwrap(), MIB + 4096, "never shrinks");
    region.grow_to(8 * MIB).unwrap();
    // SAFETY: now 8 MiB are mapped; the first part kept its bytes.
    let bytes = unsafe { std::slice::from_raw_parts(region.base(), 8 * MIB) };
    assert!(bytes[..MIB].iter().all(|&b| b == 0xAB));
    assert!(bytes[2 * MIB..].iter().all(|&b| b == 0));
    assert!(region.contains(bytes.as_ptr()));
    assert_eq!(
        region.grow_to(9 * MIB),
        Err(OverflowError::Exhausted {
            requested: 9 * MIB,
            capacity: 8 * MIB + 4096
        })
    );
    assert_eq!(
        OverflowRegion::create(dir.path(), 0, false).unwrap_err(),
        OverflowError::ZeroCapacity
    );
}

#[test]
fn page_out_drops_resident_memory_and_keeps_the_data() {
    let _s = serial();
    let dir = disk_dir();
    let region = OverflowRegion::create(dir.path(), 64 * MIB, false).unwrap();
    region.grow_to(64 * MIB).unwrap();
    // SAFETY: 64 MiB are mapped read-write.
    let bytes = unsafe { std::slice::from_raw_parts_mut(region.base(), 64 * MIB) };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i / 4096) as u8;
    }
    let before = rss_file_kib();
    let method = region.page_out(0, 64 * MIB).unwrap();
    let after = rss_file_kib();
    eprintln!("RssFile {before} kB -> {after} kB ({method:?})");
    assert!(before >= 60 * 1024, "the pages were resident: {before} kB");
    assert!(
        after + 48 * 1024 <= before,
        "page-out freed at least 48 MiB: {before} -> {after} kB"
    );
    assert!(
        bytes
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i / 4096) as u8),
        "data intact"
    );
}

#[test]
fn punched_holes_read_back_as_zeros() {
    let _s = serial();
    let dir = disk_dir();
    let region = OverflowRegion::create(dir.path(), 4 * MIB, false).unwrap();
    region.grow_to(4 * MIB).unwrap();
    // SAFETY: 4 MiB are mapped read-write.
    let bytes = unsafe { std::slice::from_raw_parts_mut(region.base(), 4 * MIB) };
    bytes.fill(7);
    region.punch_hole(MIB, 2 * MIB).unwrap();
    assert!(bytes[..MIB].iter().all(|&b| b == 7));
    assert!(bytes[MIB..3 * MIB].iter().all(|&b| b == 0));
    assert!(bytes[3 * MIB..].iter().all(|&b| b == 7));
    assert!(region.punch_hole(1, 4096).is_err(), "unaligned");
    assert!(
        region.page_out(0, 5 * MIB).is_err(),
        "beyond the mapped part"
    );
}

#[test]
fn tmpfs_is_refused_unless_allowed() {
    let _s = serial();
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm here; nothing to check");
        return;
    }
    let err = OverflowRegion::create(shm, MIB, false).unwrap_err();
    assert_eq!(err, OverflowError::Tmpfs);
    assert!(err.to_string().contains("tmpfs"));
    assert!(OverflowRegion::create(shm, MIB, true).is_ok());
}

#[test]
fn injected_failures_leave_the_region_as_it_was() {
    let _s = serial();
    let dir = disk_dir();
    let region = OverflowRegion::create(dir.path(), 16 * MIB, false).unwrap();
    region.grow_to(MIB).unwrap();
    // The file cannot grow (disk full).
    overflow_fault::fail_after(0, libc::ENOSPC);
    let err = region.grow_to(4 * MIB).unwrap_err();
    assert_eq!(
        err,
        OverflowError::Os {
            op: "growing the overflow file",
            errno: libc::ENOSPC
        }
    );
    assert_eq!(
        err.to_string(),
        format!(
            "growing the overflow file failed: {}",
            std::io::Error::from_raw_os_error(libc::ENOSPC)
        )
    );
    assert_eq!(region.len(), MIB);
    // A region that cannot be mapped is not created.
    overflow_fault::fail_after(0, libc::ENOMEM);
    let err = OverflowRegion::create(dir.path(), MIB, false).unwrap_err();
    assert_eq!(
        err,
        OverflowError::Os {
            op: "mapping the overflow file",
            errno: libc::ENOMEM
        }
    );
    // An I/O error, then recovery.
    overflow_fault::fail_after(0, libc::EIO);
    assert!(region.grow_to(2 * MIB).is_err());
    assert_eq!(region.grow_to(4 * MIB).unwrap(), 4 * MIB);
    overflow_fault::clear();
    // SAFETY: 4 MiB are mapped read-write.
    let bytes = unsafe { std::slice::from_raw_parts_mut(region.base(), 4 * MIB) };
    bytes.fill(1);
    assert!(bytes.iter().all(|&b| b == 1));
}
