//! The process's real resident memory, as the kernel reports it.

use std::path::Path;

use crate::kept::KeptFile;

/// One sample of the process's resident memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RssSample {
    /// Resident set size now (`VmRSS`).
    pub resident: u64,
    /// The highest resident set size so far (`VmHWM`, the kernel's own peak).
    pub peak: u64,
    /// jemalloc's `stats.resident` (0 for a standalone governor).
    pub allocator_resident: u64,
}

/// Reads `VmRSS` and `VmHWM` from a `/proc/<pid>/status`-format file, kept open.
pub(crate) fn read_status(file: &KeptFile) -> std::io::Result<(u64, u64)> {
    file.with_text(|text| parse_status(text, file.path()))?
}

/// `VmRSS` and `VmHWM` from the text of a status file.
fn parse_status(text: &str, path: &Path) -> std::io::Result<(u64, u64)> {
    let field = |name: &str| -> std::io::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("no {name} in {}", path.display()),
                )
            })
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_status_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("status");
        let file = KeptFile::new(p.clone());
        std::fs::write(&p, "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n").unwrap();
        assert_eq!(read_status(&file).unwrap(), (1 << 20, 2 << 20));
        std::fs::write(&p, "Name:\tx\n").unwrap();
        let e = read_status(&file).unwrap_err();
        assert!(e.to_string().starts_with("no VmRSS: in "), "{e}");
        let (rss, hwm) = read_status(&KeptFile::new("/proc/self/status".into())).unwrap();
        assert!(rss > 0 && hwm >= rss);
    }
}
