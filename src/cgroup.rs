//! The kernel's view of the process's memory cgroup: its usage, limits, events, statistics
//! and pressure stall information, read from the cgroup files (v2, or the v1 memory
//! controller), for the snapshot and the metrics.
//!
//! The files are read where `/proc/self/cgroup` says the process is, under a root that is `/`
//! in production and a directory of fake files in tests. A file that is missing, unreadable
//! or holds something unexpected leaves its figures unknown (`None`) and is named in
//! [`CgroupFigures::problems`]: reading the kernel's view never fails a snapshot.

use std::path::{Path, PathBuf};

use crate::kept::KeptFile;

/// Which cgroup interface the figures come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    /// The unified hierarchy (`memory.current`, `memory.max`, `memory.events`, …).
    V2,
    /// The v1 memory controller (`memory.usage_in_bytes`, `memory.limit_in_bytes`, …).
    V1,
}

/// The memory cgroup the process is in.
#[derive(Clone, Debug)]
pub(crate) struct Cgroup {
    pub(crate) version: CgroupVersion,
    /// The cgroup's directory.
    pub(crate) dir: PathBuf,
    /// The hierarchy's mount point (the top of the walk for limits set by ancestors).
    mount: PathBuf,
    /// The files the background thread reads, kept open.
    files: std::sync::Arc<TickFiles>,
}

/// The files the background thread reads, kept open: the cgroup's own limit files (every
/// tick), its stall time (once a second) and its ancestors' limits (every five seconds).
#[derive(Debug)]
struct TickFiles {
    /// `memory.pressure` (v2 only).
    pressure: Option<KeptFile>,
    /// The limit files on the path from the cgroup up to the hierarchy's root, the cgroup's
    /// own first (never empty): `memory.max` (v1: `memory.limit_in_bytes`) and `memory.high`
    /// (v2; empty in v1).
    walk_max: Vec<KeptFile>,
    walk_high: Vec<KeptFile>,
}

impl Cgroup {
    fn new(version: CgroupVersion, dir: PathBuf, mount: PathBuf) -> Cgroup {
        let v2 = version == CgroupVersion::V2;
        let mut levels = vec![dir.clone()];
        let mut up = dir.clone();
        while up != mount && up.pop() && up.starts_with(&mount) {
            levels.push(up.clone());
        }
        let walk = |file: &str| levels.iter().map(|d| KeptFile::new(d.join(file))).collect();
        let files = TickFiles {
            pressure: v2.then(|| KeptFile::new(dir.join("memory.pressure"))),
            walk_max: walk(if v2 {
                "memory.max"
            } else {
                "memory.limit_in_bytes"
            }),
            walk_high: if v2 { walk("memory.high") } else { Vec::new() },
        };
        Cgroup {
            version,
            dir,
            mount,
            files: std::sync::Arc::new(files),
        }
    }
}

impl PartialEq for Cgroup {
    fn eq(&self, other: &Cgroup) -> bool {
        (self.version, &self.dir, &self.mount) == (other.version, &other.dir, &other.mount)
    }
}

impl Eq for Cgroup {}

/// Counts from `memory.events` (v2: each counts since the cgroup was made, for it and its
/// descendants). In v1, `max` is `memory.failcnt` and `oom_kill` comes from
/// `memory.oom_control`; the others are unknown there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupEvents {
    /// Times usage went over `memory.low`'s protection.
    pub low: Option<u64>,
    /// Times usage went over `memory.high` (the kernel throttled and reclaimed).
    pub high: Option<u64>,
    /// Times usage hit `memory.max` (the kernel reclaimed to stay under it).
    pub max: Option<u64>,
    /// Times the cgroup ran out of memory after reclaim.
    pub oom: Option<u64>,
    /// Processes the OOM killer killed in it.
    pub oom_kill: Option<u64>,
}

/// Byte figures from `memory.stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupStat {
    /// Anonymous memory (v1: `rss`).
    pub anon: Option<u64>,
    /// Page cache (v1: `cache`).
    pub file: Option<u64>,
    /// Page cache waiting to be written back (v1: `dirty`).
    pub file_dirty: Option<u64>,
    /// Page cache being written back (v1: `writeback`).
    pub file_writeback: Option<u64>,
    /// Memory the kernel holds for the cgroup (v2 only: `kernel`, or `slab` + `kernel_stack`
    /// + `pagetables` on kernels before 5.18).
    pub kernel: Option<u64>,
    /// Anonymous transparent huge pages (v1: `rss_huge`).
    pub anon_thp: Option<u64>,
}

/// One line of pressure stall information: the share of time tasks stalled on memory over
/// the last 10, 60 and 300 seconds (percent), and the stalled time in total.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PsiLine {
    /// Percent of the last 10 s.
    pub avg10: f64,
    /// Percent of the last 60 s.
    pub avg60: f64,
    /// Percent of the last 300 s.
    pub avg300: f64,
    /// Stalled time in total, in microseconds.
    pub total_us: u64,
}

/// The cgroup's `memory.pressure` (v2 only).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MemoryPressure {
    /// Some task stalled on memory.
    pub some: PsiLine,
    /// Every non-idle task stalled on memory at once.
    pub full: PsiLine,
}

/// The kernel's figures for the process's memory cgroup at one moment; see the module's
/// rules for files that cannot be read.
#[derive(Clone, Debug, PartialEq)]
pub struct CgroupFigures {
    /// The interface they come from.
    pub version: CgroupVersion,
    /// The cgroup's directory.
    pub dir: PathBuf,
    /// Memory charged to the cgroup (`memory.current`; v1 `memory.usage_in_bytes`), page cache
    /// included.
    pub current: Option<u64>,
    /// The tightest hard limit on the path from the cgroup up (`memory.max`; v1
    /// `memory.limit_in_bytes`); `None` when there is none or it cannot be read.
    pub max: Option<u64>,
    /// The tightest `memory.high` on the path (v2 only).
    pub high: Option<u64>,
    /// `memory.events`.
    pub events: CgroupEvents,
    /// `memory.stat`.
    pub stat: CgroupStat,
    /// `memory.pressure` (v2 only).
    pub pressure: Option<MemoryPressure>,
    /// Files that could not be read or parsed, each with the reason.
    pub problems: Vec<String>,
}

impl CgroupFigures {
    /// Appends the known figures in the Prometheus text format (`nodedb_mem_cgroup_*`), and
    /// whether the tightest limit is below `ceiling`.
    pub(crate) fn write_prometheus(&self, out: &mut String, ceiling: u64) {
        use std::fmt::Write;
        let header = crate::metrics::header;
        let gauges = [
            (
                "cgroup_current_bytes",
                "Memory charged to the process's cgroup, page cache included.",
                self.current,
            ),
            (
                "cgroup_max_bytes",
                "The tightest memory.max (v1 limit_in_bytes) on the cgroup's path.",
                self.max,
            ),
            (
                "cgroup_high_bytes",
                "The tightest memory.high on the cgroup's path.",
                self.high,
            ),
        ];
        for (name, help, value) in gauges {
            if let Some(v) = value {
                header(out, name, "gauge", help);
                let _ = writeln!(out, "nodedb_mem_{name} {v}");
            }
        }
        let e = &self.events;
        family(
            out,
            ("cgroup_events_total", "counter", "event"),
            "The cgroup's memory.events (v1: max is failcnt).",
            &[
                ("low", e.low),
                ("high", e.high),
                ("max", e.max),
                ("oom", e.oom),
                ("oom_kill", e.oom_kill),
            ],
        );
        let st = &self.stat;
        family(
            out,
            ("cgroup_stat_bytes", "gauge", "item"),
            "Figures of the cgroup's memory.stat.",
            &[
                ("anon", st.anon),
                ("file", st.file),
                ("file_dirty", st.file_dirty),
                ("file_writeback", st.file_writeback),
                ("kernel", st.kernel),
                ("anon_thp", st.anon_thp),
            ],
        );
        if let Some(p) = &self.pressure {
            header(
                out,
                "cgroup_pressure_stall_seconds_total",
                "counter",
                "Time tasks of the cgroup stalled on memory (some: any task; full: all at once).",
            );
            for (kind, line) in [("some", p.some), ("full", p.full)] {
                let _ = writeln!(
                    out,
                    "nodedb_mem_cgroup_pressure_stall_seconds_total{{kind=\"{kind}\"}} {}",
                    line.total_us as f64 / 1e6
                );
            }
            header(
                out,
                "cgroup_pressure_avg10_ratio",
                "gauge",
                "Share of the last 10 s the cgroup's tasks stalled on memory.",
            );
            for (kind, line) in [("some", p.some), ("full", p.full)] {
                let _ = writeln!(
                    out,
                    "nodedb_mem_cgroup_pressure_avg10_ratio{{kind=\"{kind}\"}} {}",
                    line.avg10 / 100.0
                );
            }
        }
        header(
            out,
            "cgroup_read_problems",
            "gauge",
            "cgroup files that could not be read or parsed at the snapshot.",
        );
        let _ = writeln!(
            out,
            "nodedb_mem_cgroup_read_problems {}",
            self.problems.len()
        );
        header(
            out,
            "cgroup_limit_below_ceiling",
            "gauge",
            "1 when the cgroup's tightest limit (memory.max or memory.high) is below the ceiling: an explicit ceiling that does not follow it, or one not moved yet.",
        );
        let limit = self.max.into_iter().chain(self.high).min();
        let below = limit.is_some_and(|l| l < ceiling);
        let _ = writeln!(
            out,
            "nodedb_mem_cgroup_limit_below_ceiling {}",
            u8::from(below)
        );
    }
}

/// Appends the metric family `(name, kind, label)` with one line per known value, labelled by
/// its key; nothing when no value is known.
fn family(
    out: &mut String,
    (name, kind, label): (&str, &str, &str),
    help: &str,
    values: &[(&str, Option<u64>)],
) {
    use std::fmt::Write;
    if values.iter().all(|(_, v)| v.is_none()) {
        return;
    }
    crate::metrics::header(out, name, kind, help);
    for (key, v) in values {
        if let Some(v) = v {
            let _ = writeln!(out, "nodedb_mem_{name}{{{label}=\"{key}\"}} {v}");
        }
    }
}

/// cgroup v1 reports "no limit" as `LONG_MAX` rounded down to a page; anything this large is
/// no limit at all.
pub(crate) const CGROUP_V1_UNLIMITED: u64 = 1 << 62;

impl Cgroup {
    /// The memory cgroup of the process, as `/proc/self/cgroup` under `root` names it: the
    /// unified hierarchy where its memory controller is on (mounted at `sys/fs/cgroup`, or at
    /// `sys/fs/cgroup/unified` beside v1 controllers), else the v1 memory controller.
    pub(crate) fn find(root: &Path) -> Option<Cgroup> {
        let membership = std::fs::read_to_string(root.join("proc/self/cgroup")).ok()?;
        let mut v1 = None;
        for line in membership.lines() {
            let mut parts = line.splitn(3, ':');
            let (Some(id), Some(controllers), Some(path)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let rel = path.trim_start_matches('/');
            if id == "0" && controllers.is_empty() {
                for mount in ["sys/fs/cgroup", "sys/fs/cgroup/unified"] {
                    let mount = root.join(mount);
                    let dir = mount.join(rel);
                    if dir.join("memory.current").exists() {
                        return Some(Cgroup::new(CgroupVersion::V2, dir, mount));
                    }
                }
            } else if controllers.split(',').any(|c| c == "memory") {
                let mount = root.join("sys/fs/cgroup/memory");
                v1 = Some(Cgroup::new(CgroupVersion::V1, mount.join(rel), mount));
            }
        }
        v1
    }

    /// The cgroup's `memory.pressure` (v2 only), if it reads.
    pub(crate) fn pressure(&self) -> Option<MemoryPressure> {
        self.files
            .pressure
            .as_ref()?
            .with_text(parse_pressure)
            .ok()
            .flatten()
    }

    /// Reads every figure now.
    pub(crate) fn read(&self) -> CgroupFigures {
        let mut problems = Vec::new();
        let mut figures = CgroupFigures {
            version: self.version,
            dir: self.dir.clone(),
            current: None,
            max: None,
            high: None,
            events: CgroupEvents::default(),
            stat: CgroupStat::default(),
            pressure: None,
            problems: Vec::new(),
        };
        match self.version {
            CgroupVersion::V2 => {
                figures.current = self.number("memory.current", &mut problems);
                figures.max = self.tightest("memory.max", parse_v2_limit);
                figures.high = self.tightest("memory.high", parse_v2_limit);
                if let Some(text) = self.text("memory.events", &mut problems) {
                    let get = |k: &str| keyed(&text, k);
                    figures.events = CgroupEvents {
                        low: get("low"),
                        high: get("high"),
                        max: get("max"),
                        oom: get("oom"),
                        oom_kill: get("oom_kill"),
                    };
                }
                if let Some(text) = self.text("memory.stat", &mut problems) {
                    let get = |k: &str| keyed(&text, k);
                    let kernel = get("kernel").or_else(|| {
                        let parts = [get("slab"), get("kernel_stack"), get("pagetables")];
                        parts
                            .iter()
                            .any(Option::is_some)
                            .then(|| parts.iter().flatten().sum())
                    });
                    figures.stat = CgroupStat {
                        anon: get("anon"),
                        file: get("file"),
                        file_dirty: get("file_dirty"),
                        file_writeback: get("file_writeback"),
                        kernel,
                        anon_thp: get("anon_thp"),
                    };
                }
                if let Some(text) = self.text("memory.pressure", &mut problems) {
                    figures.pressure = parse_pressure(&text);
                    if figures.pressure.is_none() {
                        problems.push(format!(
                            "{}: not pressure stall information",
                            self.dir.join("memory.pressure").display()
                        ));
                    }
                }
            }
            CgroupVersion::V1 => {
                figures.current = self.number("memory.usage_in_bytes", &mut problems);
                figures.max = self.tightest("memory.limit_in_bytes", |s| {
                    s.parse().ok().filter(|&v: &u64| v < CGROUP_V1_UNLIMITED)
                });
                figures.events.max = self.number("memory.failcnt", &mut problems);
                if let Some(text) = self.text("memory.oom_control", &mut problems) {
                    figures.events.oom_kill = keyed(&text, "oom_kill");
                }
                if let Some(text) = self.text("memory.stat", &mut problems) {
                    let get = |k: &str| keyed(&text, k);
                    figures.stat = CgroupStat {
                        anon: get("rss"),
                        file: get("cache"),
                        file_dirty: get("dirty"),
                        file_writeback: get("writeback"),
                        kernel: None,
                        anon_thp: get("rss_huge"),
                    };
                }
            }
        }
        figures.problems = problems;
        figures
    }

    /// A file's text, or a problem noted.
    fn text(&self, file: &str, problems: &mut Vec<String>) -> Option<String> {
        let path = self.dir.join(file);
        match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) => {
                problems.push(format!("{}: {e}", path.display()));
                None
            }
        }
    }

    /// A file holding one number, or a problem noted.
    fn number(&self, file: &str, problems: &mut Vec<String>) -> Option<u64> {
        let text = self.text(file, problems)?;
        let v = text.trim().parse().ok();
        if v.is_none() {
            problems.push(format!(
                "{}: {:?} is not a number",
                self.dir.join(file).display(),
                text.trim()
            ));
        }
        v
    }

    /// The smallest value `parse` finds in `file` on the path from the cgroup up to the
    /// hierarchy's root (a cgroup cannot use more than its ancestors allow).
    fn tightest(&self, file: &str, parse: impl Fn(&str) -> Option<u64>) -> Option<u64> {
        self.tightest_at(file, parse).map(|(v, _)| v)
    }

    /// [`tightest`](Self::tightest), with the file that set it.
    fn tightest_at(
        &self,
        file: &str,
        parse: impl Fn(&str) -> Option<u64>,
    ) -> Option<(u64, PathBuf)> {
        let files = if file == "memory.high" {
            &self.files.walk_high
        } else {
            &self.files.walk_max
        };
        let mut best: Option<(u64, &KeptFile)> = None;
        for f in files {
            if let Ok(Some(v)) = f.with_text(|t| parse(t.trim()))
                && best.is_none_or(|(b, _)| v < b)
            {
                best = Some((v, f));
            }
        }
        best.map(|(v, f)| (v, f.path().to_owned()))
    }

    /// The cgroup's own limits (`memory.max` and `memory.high`; in v1 `memory.limit_in_bytes`
    /// and nothing), `u64::MAX` for none and `None` where a file does not read as a limit:
    /// what moves when the limit the process lives under is changed on its own cgroup (a
    /// container's, resized in place), read without walking up the hierarchy.
    pub(crate) fn own_limits(&self) -> [Option<u64>; 2] {
        let read = |file: Option<&KeptFile>| {
            let parse = |t: &str| {
                let t = t.trim();
                if t == "max" {
                    Some(u64::MAX)
                } else {
                    t.parse().ok()
                }
            };
            file?.with_text(parse).ok().flatten()
        };
        [
            read(self.files.walk_max.first()),
            read(self.files.walk_high.first()),
        ]
    }

    /// The limit the ceiling follows: the tightest `memory.max` or `memory.high` on the path
    /// (v1: `memory.limit_in_bytes`), with the file that set it and which kind it is;
    /// `Ok(None)` when there is none. An error (saying which file and why) when the cgroup's
    /// own limit file cannot be read or holds neither a number nor `max`: the cgroup vanished
    /// or is being changed, and the last good limit should stand.
    pub(crate) fn limit(&self) -> Result<Option<CgroupLimit>, String> {
        let own = &self.files.walk_max[0];
        let path = own.path();
        let text = own
            .with_text(str::to_owned)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let text = text.trim();
        if text != "max" && text.parse::<u64>().is_err() {
            return Err(format!(
                "{}: {text:?} is neither a byte count nor \"max\"",
                path.display()
            ));
        }
        let found = match self.version {
            CgroupVersion::V2 => {
                let max = self.tightest_at("memory.max", parse_v2_limit);
                let high = self.tightest_at("memory.high", parse_v2_limit);
                match (max, high) {
                    (Some((m, file)), Some((h, _))) if m <= h => Some(CgroupLimit {
                        bytes: m,
                        file,
                        high: false,
                    }),
                    (_, Some((h, file))) => Some(CgroupLimit {
                        bytes: h,
                        file,
                        high: true,
                    }),
                    (Some((m, file)), None) => Some(CgroupLimit {
                        bytes: m,
                        file,
                        high: false,
                    }),
                    (None, None) => None,
                }
            }
            CgroupVersion::V1 => self
                .tightest_at("memory.limit_in_bytes", |s| {
                    s.parse().ok().filter(|&v: &u64| v < CGROUP_V1_UNLIMITED)
                })
                .map(|(bytes, file)| CgroupLimit {
                    bytes,
                    file,
                    high: false,
                }),
        };
        Ok(found.filter(|l| l.bytes > 0))
    }
}

/// A limit on the process's cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CgroupLimit {
    pub(crate) bytes: u64,
    /// The file that set it.
    pub(crate) file: PathBuf,
    /// Whether it is a `memory.high` (a throttling threshold) rather than a hard limit.
    pub(crate) high: bool,
}

/// A v2 limit: a byte count, or `max` for none.
fn parse_v2_limit(s: &str) -> Option<u64> {
    (s != "max").then(|| s.parse().ok()).flatten()
}

/// The value of `key` in a flat keyed file (`key value` per line).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Parses `memory.pressure`: a `some` and a `full` line of `avg10=… avg60=… avg300=…
/// total=…`. `None` unless both lines are whole.
pub(crate) fn parse_pressure(text: &str) -> Option<MemoryPressure> {
    let line = |kind: &str| {
        let rest = text
            .lines()
            .find_map(|l| l.strip_prefix(kind)?.strip_prefix(' '))?;
        let mut psi = PsiLine::default();
        let mut seen = 0u8;
        for field in rest.split_whitespace() {
            let (k, v) = field.split_once('=')?;
            match k {
                "avg10" => (psi.avg10, seen) = (v.parse().ok()?, seen | 1),
                "avg60" => (psi.avg60, seen) = (v.parse().ok()?, seen | 2),
                "avg300" => (psi.avg300, seen) = (v.parse().ok()?, seen | 4),
                "total" => (psi.total_us, seen) = (v.parse().ok()?, seen | 8),
                _ => {}
            }
        }
        (seen == 15).then_some(psi)
    };
    Some(MemoryPressure {
        some: line("some")?,
        full: line("full")?,
    })
}

#[cfg(all(test, not(nodedb_mem_loom)))]
mod tests {
    use super::*;
    use crate::test_support::FakeRoot;
    use std::fs;

    const PSI: &str = "some avg10=1.50 avg60=0.25 avg300=0.00 total=232000\n\
                       full avg10=0.75 avg60=0.10 avg300=0.00 total=116000\n";

    #[test]
    fn pressure_lines_parse_and_broken_ones_do_not() {
        let p = parse_pressure(PSI).unwrap();
        assert_eq!(
            p.some,
            PsiLine {
                avg10: 1.5,
                avg60: 0.25,
                avg300: 0.0,
                total_us: 232_000
            }
        );
        assert_eq!((p.full.avg10, p.full.total_us), (0.75, 116_000));
        for broken in [
            "",
            "some avg10=1.50 avg60=0.25 avg300=0.00 total=232000\n",
            "some avg10=x avg60=0.25 avg300=0.00 total=1\nfull avg10=0 avg60=0 avg300=0 total=1\n",
            "some avg10=1 avg60=0.25 total=1\nfull avg10=0 avg60=0 avg300=0 total=1\n",
            "somewhere avg10=1 avg60=1 avg300=1 total=1\nfull avg10=0 avg60=0 avg300=0 total=1\n",
        ] {
            assert_eq!(parse_pressure(broken), None, "{broken:?}");
        }
    }

    fn v2_tree() -> FakeRoot {
        let root = FakeRoot::new();
        root.file("proc/self/cgroup", "0::/pod/db\n")
            .file("sys/fs/cgroup/memory.max", "max\n")
            .file("sys/fs/cgroup/pod/memory.max", "536870912\n")
            .file("sys/fs/cgroup/pod/memory.high", "max\n")
            .file("sys/fs/cgroup/pod/db/memory.current", "314572800\n")
            .file("sys/fs/cgroup/pod/db/memory.max", "max\n")
            .file("sys/fs/cgroup/pod/db/memory.high", "429496729\n")
            .file(
                "sys/fs/cgroup/pod/db/memory.events",
                "low 0\nhigh 12\nmax 364\noom 1\noom_kill 0\noom_group_kill 0\n",
            )
            .file(
                "sys/fs/cgroup/pod/db/memory.stat",
                "anon 201326592\nfile 104857600\nkernel 8388608\nanon_thp 67108864\n\
                 file_dirty 4096\nfile_writeback 0\n",
            )
            .file("sys/fs/cgroup/pod/db/memory.pressure", PSI);
        root
    }

    #[test]
    fn a_v2_cgroup_is_read_with_the_tightest_limits_on_its_path() {
        let root = v2_tree();
        let cg = Cgroup::find(root.path()).unwrap();
        assert_eq!(cg.version, CgroupVersion::V2);
        let f = cg.read();
        assert_eq!(f.problems, Vec::<String>::new());
        assert_eq!(f.dir, root.path().join("sys/fs/cgroup/pod/db"));
        assert_eq!(
            (f.current, f.max, f.high),
            (Some(300 << 20), Some(512 << 20), Some(429_496_729))
        );
        assert_eq!(
            f.events,
            CgroupEvents {
                low: Some(0),
                high: Some(12),
                max: Some(364),
                oom: Some(1),
                oom_kill: Some(0)
            }
        );
        assert_eq!(
            f.stat,
            CgroupStat {
                anon: Some(192 << 20),
                file: Some(100 << 20),
                file_dirty: Some(4096),
                file_writeback: Some(0),
                kernel: Some(8 << 20),
                anon_thp: Some(64 << 20),
            }
        );
        assert_eq!(f.pressure.unwrap().some.total_us, 232_000);
    }

    #[test]
    fn the_figures_are_exported_for_prometheus() {
        let root = v2_tree();
        let mut out = String::new();
        Cgroup::find(root.path())
            .unwrap()
            .read()
            .write_prometheus(&mut out, 1 << 30);
        for line in [
            "nodedb_mem_cgroup_current_bytes 314572800",
            "nodedb_mem_cgroup_max_bytes 536870912",
            "nodedb_mem_cgroup_high_bytes 429496729",
            "nodedb_mem_cgroup_events_total{event=\"max\"} 364",
            "nodedb_mem_cgroup_events_total{event=\"oom_kill\"} 0",
            "nodedb_mem_cgroup_stat_bytes{item=\"anon_thp\"} 67108864",
            "nodedb_mem_cgroup_pressure_stall_seconds_total{kind=\"some\"} 0.232",
            "nodedb_mem_cgroup_pressure_avg10_ratio{kind=\"full\"} 0.0075",
            "nodedb_mem_cgroup_read_problems 0",
            "nodedb_mem_cgroup_limit_below_ceiling 1",
            "# TYPE nodedb_mem_cgroup_events_total counter",
        ] {
            assert!(out.lines().any(|l| l == line), "{line} not in\n{out}");
        }
    }

    #[test]
    fn vanished_and_garbage_files_are_named_and_leave_figures_unknown() {
        let root = v2_tree();
        let cg = Cgroup::find(root.path()).unwrap();
        let dir = root.path().join("sys/fs/cgroup/pod/db");
        fs::remove_file(dir.join("memory.events")).unwrap();
        fs::write(dir.join("memory.current"), "lots\n").unwrap();
        fs::write(dir.join("memory.pressure"), "some nonsense\n").unwrap();
        // A limit that is not a number is no limit from that file: the ancestor's holds.
        fs::write(dir.join("memory.max"), "12 MiB\n").unwrap();
        // Kernels before 5.18 have no `kernel` line: its parts are summed.
        fs::write(
            dir.join("memory.stat"),
            "anon 1\nslab 4096\nkernel_stack 8192\npagetables 4096\n",
        )
        .unwrap();
        let f = cg.read();
        assert_eq!((f.current, f.max), (None, Some(512 << 20)));
        assert_eq!(f.events, CgroupEvents::default());
        assert_eq!(
            (f.stat.anon, f.stat.kernel, f.stat.file),
            (Some(1), Some(16384), None)
        );
        assert_eq!(f.pressure, None);
        let problems = f.problems.join("\n");
        assert_eq!(f.problems.len(), 3, "{problems}");
        assert!(
            problems.contains("memory.current: \"lots\" is not a number"),
            "{problems}"
        );
        assert!(
            problems.contains("memory.events: No such file"),
            "{problems}"
        );
        assert!(
            problems.contains("memory.pressure: not pressure stall information"),
            "{problems}"
        );
        // The whole directory gone (the cgroup was removed): every figure unknown, no panic.
        fs::remove_dir_all(&dir).unwrap();
        let f = cg.read();
        assert_eq!((f.current, f.max), (None, Some(512 << 20)));
        assert!(f.problems.len() >= 4, "{:?}", f.problems);
    }

    #[test]
    fn a_hybrid_mount_uses_v2_only_where_its_memory_controller_is_on() {
        // systemd's hybrid layout: v1 controllers, and the unified hierarchy beside them with
        // no memory controller (no memory.current): the v1 memory controller is read.
        let root = FakeRoot::new();
        root.file(
            "proc/self/cgroup",
            "9:name=systemd:/\n4:memory:/job/7\n0::/\n",
        )
        .file("sys/fs/cgroup/unified/cgroup.procs", "1\n")
        .file(
            "sys/fs/cgroup/memory/job/7/memory.usage_in_bytes",
            "1048576\n",
        )
        .file(
            "sys/fs/cgroup/memory/job/7/memory.limit_in_bytes",
            "9223372036854771712\n",
        )
        .file(
            "sys/fs/cgroup/memory/job/memory.limit_in_bytes",
            "268435456\n",
        )
        .file("sys/fs/cgroup/memory/job/7/memory.failcnt", "3\n")
        .file(
            "sys/fs/cgroup/memory/job/7/memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n",
        )
        .file(
            "sys/fs/cgroup/memory/job/7/memory.stat",
            "cache 4096\nrss 8192\nrss_huge 0\ndirty 0\nwriteback 0\n",
        );
        let cg = Cgroup::find(root.path()).unwrap();
        assert_eq!(cg.version, CgroupVersion::V1);
        let f = cg.read();
        assert_eq!(f.problems, Vec::<String>::new());
        assert_eq!((f.current, f.max), (Some(1 << 20), Some(256 << 20)));
        assert_eq!(
            (f.events.max, f.events.oom_kill, f.events.high),
            (Some(3), Some(2), None)
        );
        assert_eq!((f.stat.anon, f.stat.file), (Some(8192), Some(4096)));
        assert_eq!(f.pressure, None);
        // With the memory controller on in the unified hierarchy, v2 is read.
        root.file("sys/fs/cgroup/unified/memory.current", "5\n");
        let cg = Cgroup::find(root.path()).unwrap();
        assert_eq!(
            (cg.version, cg.read().current),
            (CgroupVersion::V2, Some(5))
        );
    }

    #[test]
    fn no_membership_file_means_no_cgroup() {
        assert_eq!(Cgroup::find(FakeRoot::new().path()), None);
    }

    #[test]
    fn this_machines_cgroup_reads_without_panicking() {
        if let Some(cg) = Cgroup::find(Path::new("/")) {
            let f = cg.read();
            assert!(f.current.is_some() || !f.problems.is_empty(), "{f:?}");
        }
    }
}
