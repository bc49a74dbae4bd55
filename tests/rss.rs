//! Resident-memory feedback: unaccounted resident memory counts against the ceiling, and
//! coming within the margin of the ceiling is recorded.

use std::path::Path;

use nodedb_mem::{EngineId, EventKind, MemError, MemoryGovernor, PressureLevel, Size};

const MIB: u64 = 1 << 20;

fn status(dir: &Path, rss_mib: u64, hwm_mib: u64) -> std::path::PathBuf {
    let p = dir.join("status");
    std::fs::write(
        &p,
        format!(
            "Name:\tdb\nVmHWM:\t{} kB\nVmRSS:\t{} kB\n",
            hwm_mib * 1024,
            rss_mib * 1024
        ),
    )
    .unwrap();
    p
}

#[test]
fn unaccounted_resident_memory_tightens_admission_and_raises_pressure() {
    let dir = tempfile::tempdir().unwrap();
    let gov = MemoryGovernor::builder()
        .global_ceiling(1024 * MIB)
        .budget(EngineId::Query, 512 * MIB)
        .proc_status_path(status(dir.path(), 900, 950))
        .build()
        .unwrap();
    let sample = gov.check_resident().unwrap();
    assert_eq!((sample.resident, sample.peak), (900 * MIB, 950 * MIB));
    assert_eq!(
        gov.last_resident().1,
        900 * MIB,
        "nothing is governed yet: all unaccounted"
    );
    assert_eq!(gov.global_pressure(), PressureLevel::Critical); // 900 / 1024 = 88 %
    // Query's budget would allow 200 MiB; the process's real memory does not.
    let err = gov.reserve(EngineId::Query, 200 * MIB).unwrap_err();
    assert!(
        matches!(err, MemError::CeilingExceeded { used, ceiling, .. } if used == 900 * MIB && ceiling == 1024 * MIB),
        "{err}"
    );
    assert!(gov.reserve(EngineId::Query, 100 * MIB).is_ok());
    // Resident memory falls: the next sample lifts the restriction.
    status(dir.path(), 100, 950);
    gov.check_resident().unwrap();
    assert!(gov.reserve(EngineId::Query, 200 * MIB).is_ok());
    let snap = gov.snapshot();
    assert_eq!(snap.resident.resident, 100 * MIB);
    let text = gov.prometheus();
    assert!(text.contains(&format!(
        "nodedb_mem_process_peak_resident_bytes {}",
        950 * MIB
    )));
}

#[test]
fn coming_within_the_margin_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let gov = MemoryGovernor::builder()
        .global_ceiling(1024 * MIB)
        .rss_margin(Size::parse("64MiB").unwrap())
        .proc_status_path(status(dir.path(), 950, 960))
        .build()
        .unwrap();
    gov.check_resident().unwrap(); // 950 + 64 < 1024: fine
    assert!(
        !gov.snapshot()
            .events
            .iter()
            .any(|e| matches!(e.kind, EventKind::ResidentNearCeiling { .. }))
    );
    status(dir.path(), 980, 980);
    gov.check_resident().unwrap();
    let near: Vec<_> = gov
        .snapshot()
        .events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::ResidentNearCeiling {
                resident, ceiling, ..
            } => Some((resident, ceiling)),
            _ => None,
        })
        .collect();
    assert_eq!(near, vec![(980 * MIB, 1024 * MIB)]);
    assert_eq!(gov.global_pressure(), PressureLevel::Emergency);
}

#[test]
fn bad_margins_and_missing_files_are_reported() {
    let err = MemoryGovernor::builder()
        .global_ceiling(64 * MIB)
        .rss_margin(64 * MIB)
        .build()
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration `rss_margin` = 64 MiB: must be above zero and below the ceiling (64 MiB)"
    );
    let gov = MemoryGovernor::builder()
        .global_ceiling(64 * MIB)
        .proc_status_path("/nonexistent/status")
        .build()
        .unwrap();
    let err = gov.check_resident().unwrap_err();
    assert!(
        err.to_string().starts_with("reading /nonexistent/status: "),
        "{err}"
    );
}

#[test]
fn the_real_process_has_a_resident_size() {
    let gov = MemoryGovernor::builder()
        .global_ceiling(1 << 40)
        .build()
        .unwrap();
    let s = gov.check_resident().unwrap();
    assert!(s.resident > 0 && s.peak >= s.resident);
}
