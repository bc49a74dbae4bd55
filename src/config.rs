//! The governor's builder and the validation of every setting.

use std::path::PathBuf;

use crate::EngineId;
use crate::ceiling::{self, CeilingSource, MEMORY_LIMIT_ENV};
use crate::error::{MemError, Result};
use crate::pressure::PressureThresholds;
use crate::size::{ByteSize, Size, fraction_of};

/// The smallest global ceiling accepted: 1 MiB.
pub const MIN_CEILING: u64 = 1 << 20;
/// The largest global ceiling accepted: 1 PiB. Larger values are typos (or `u64::MAX`), and
/// the bound keeps every signed counter of the ledger far from overflow.
pub const MAX_CEILING: u64 = 1 << 50;
/// Share of the ceiling left unassigned by default, for allocator overhead (metadata,
/// fragmentation, thread caches) and memory outside the governor's view.
pub const DEFAULT_OVERHEAD_RESERVE: f64 = 0.10;

/// Default margin kept between the process's resident memory and the ceiling: when resident
/// memory comes closer than this, the governor purges dirty pages and counts the excess.
pub const DEFAULT_RSS_MARGIN: f64 = 0.05;

/// Default share of the cgroup's memory limit kept free below the ceiling when the ceiling
/// comes from the cgroup (see [`GovernorBuilder::cgroup_margin`]).
pub const DEFAULT_CGROUP_MARGIN: f64 = 0.10;

/// The most an engine's overflow region can ever hold: the largest range the allocator
/// reserves per engine (4 TiB). The bound in a given process is its reserved range,
/// [`range_bytes`](crate::range_bytes), which `install` checks.
pub const MAX_OVERFLOW_CAPACITY: u64 = nodedb_mem_alloc::ctl::arenas::MAX_RANGE_BYTES as u64;

/// The interval of the background thread `install` starts by default: resident sampling,
/// purging, rebalancing, events. While nothing moves it sleeps longer, up to
/// [`BACKGROUND_STRETCH_MAX`] intervals, and is woken at once when something does; idle it
/// costs about 9,600 instructions a second (`docs/benchmarks.md`).
pub const DEFAULT_BACKGROUND_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The longest the background thread sleeps while nothing moves, in intervals: after each quiet
/// tick its sleep doubles up to this many intervals, and anything that moves (an engine's
/// allocations growing, an event, a request waiting) wakes it at once. See
/// [`Snapshot::background_sleep`](crate::Snapshot::background_sleep) and `docs/design.md`.
pub const BACKGROUND_STRETCH_MAX: u32 = 20;

/// How much file data one sweep of a governed directory examines by default (see
/// [`GovernorBuilder::sweep_budget`]).
pub const DEFAULT_SWEEP_BUDGET: u64 = 4 << 30;

/// The smallest default page-cache budget of an engine's governed I/O.
pub const DEFAULT_MIN_PAGE_CACHE: u64 = 4 << 20;

/// Share of the overflow directory's free space that a default capacity leaves to others.
pub const OVERFLOW_DISK_RESERVE: f64 = 0.10;

/// Where and how much an engine over its limit may overflow to.
///
/// Each engine (but `Unattributed`) gets a region of `capacity` bytes, backed by an unnamed
/// file in `dir`: pageable memory the kernel can write back and evict, so an engine over its
/// budget slows down instead of taking the process's resident memory past the ceiling.
#[derive(Clone, Debug, PartialEq)]
pub struct OverflowConfig {
    /// Directory of the backing files (default: the OS temp directory). Must not be on tmpfs
    /// (its pages cannot be evicted without swap) unless `allow_tmpfs`.
    pub dir: PathBuf,
    /// Capacity of each engine's region, in bytes or as a fraction of the ceiling. `None` (the
    /// default): from the disk, the free space of `dir`'s filesystem at `install` less a reserve
    /// of [`OVERFLOW_DISK_RESERVE`] of it (at least 1 GiB), at most the range an engine can hold
    /// ([`range_bytes`](crate::range_bytes)). Disk space is used only as regions grow; when the
    /// disk fills first, the [`policy`](Self::policy) decides.
    pub capacity: Option<Size>,
    /// What happens when a region cannot take an allocation.
    pub policy: nodedb_mem_alloc::ctl::overflow::OverflowPolicy,
    /// Accept a tmpfs directory.
    pub allow_tmpfs: bool,
}

impl Default for OverflowConfig {
    fn default() -> Self {
        OverflowConfig {
            dir: std::env::temp_dir(),
            capacity: None,
            policy: nodedb_mem_alloc::ctl::overflow::OverflowPolicy::FallBack,
            allow_tmpfs: false,
        }
    }
}

impl OverflowConfig {
    /// The defaults, with the backing files in `dir`.
    pub fn in_dir(dir: impl Into<PathBuf>) -> OverflowConfig {
        OverflowConfig {
            dir: dir.into(),
            ..OverflowConfig::default()
        }
    }
}

/// Default split of the assignable ceiling, in percent, by [`EngineId::index`].
const DEFAULT_WEIGHTS: [u64; EngineId::COUNT] = [30, 10, 10, 20, 25, 5];

/// How the rebalancer decides who lends and who borrows.
///
/// An engine is *busy* when its pressure is at least [`PressureLevel::Warning`](crate::PressureLevel::Warning), and *idle* when
/// its highest usage over the last window (the time since the previous rebalance step) stayed
/// below `idle_utilisation` of its limit. An idle engine lends down to what keeps its window
/// peak at `target_utilisation` (never below its floor); a busy engine borrows up to what brings
/// its usage to `target_utilisation` (never above its cap). A busy engine whose limit is below
/// its configured budget first takes back what it lent.
///
/// ```
/// use nodedb_mem::RebalanceConfig;
/// let c = RebalanceConfig::default();
/// assert_eq!((c.idle_utilisation, c.target_utilisation, c.min_move), (0.5, 0.6, 64 << 10));
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RebalanceConfig {
    /// Window-peak utilisation below which an engine lends, in `(0, target_utilisation)`.
    pub idle_utilisation: f64,
    /// Utilisation that lenders keep and borrowers aim for, below the warning threshold.
    pub target_utilisation: f64,
    /// Moves smaller than this are not worth making.
    pub min_move: u64,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        RebalanceConfig {
            idle_utilisation: 0.5,
            target_utilisation: 0.6,
            min_move: 64 << 10,
        }
    }
}

impl RebalanceConfig {
    fn validate(&self, thresholds: &PressureThresholds) -> Result<()> {
        let t = self.target_utilisation;
        if !(t > 0.0 && t < thresholds.warning) {
            return Err(MemError::config(
                "rebalance.target_utilisation",
                t,
                format!(
                    "must be above 0 and below thresholds.warning ({})",
                    thresholds.warning
                ),
            ));
        }
        let i = self.idle_utilisation;
        if !(i > 0.0 && i < t) {
            return Err(MemError::config(
                "rebalance.idle_utilisation",
                i,
                format!("must be above 0 and below rebalance.target_utilisation ({t})"),
            ));
        }
        if self.min_move == 0 {
            return Err(MemError::config(
                "rebalance.min_move",
                0,
                "must be above zero",
            ));
        }
        Ok(())
    }
}

/// The heap-profile sampling interval `install` sets unless told otherwise
/// ([`GovernorBuilder::heap_profile_interval`]): a sample per 4 MiB allocated per thread on
/// average, cheap enough to stay on (measured in `docs/benchmarks.md`).
pub const DEFAULT_HEAP_PROFILE_INTERVAL: u64 =
    nodedb_mem_alloc::ctl::profile::DEFAULT_SAMPLE_INTERVAL;

/// Builds a [`MemoryGovernor`](crate::MemoryGovernor). Every setting has a working default;
/// [`build`](Self::build) rejects any inconsistent combination with an error naming the setting
/// and its value.
///
/// ```
/// use nodedb_mem::{EngineId, MemoryGovernor, Size};
///
/// let gov = MemoryGovernor::builder()
///     .global_ceiling(1 << 30)
///     .budget(EngineId::Query, Size::parse("256MiB").expect("a valid size"))
///     .budget(EngineId::Vector, Size::Fraction(0.4))
///     .floor(EngineId::Vector, 128u64 << 20)
///     .build()?;
/// assert_eq!(gov.limit(EngineId::Query), 256 << 20);
/// assert_eq!(gov.budget(EngineId::Vector).floor(), 128 << 20);
/// # Ok::<(), nodedb_mem::MemError>(())
/// ```
#[derive(Clone, Debug)]
pub struct GovernorBuilder {
    ceiling: Option<u64>,
    overhead: f64,
    budgets: [Option<Size>; EngineId::COUNT],
    page_cache: [Option<Size>; EngineId::COUNT],
    floors: [Option<Size>; EngineId::COUNT],
    caps: [Option<Size>; EngineId::COUNT],
    thresholds: PressureThresholds,
    rebalance: RebalanceConfig,
    env: EnvSource,
    rss_margin: Size,
    cgroup_margin: Size,
    proc_status: PathBuf,
    overflow: Option<OverflowConfig>,
    numa_policy: nodedb_mem_alloc::ctl::numa::NumaPolicy,
    cap_to_node_memory: bool,
    allow_unattributed: bool,
    huge_pages: bool,
    heap_profile_interval: Option<u64>,
    inflight_bound: Option<u64>,
    background: Option<std::time::Duration>,
    background_stretch: u32,
    sweep_budget: u64,
}

#[derive(Clone, Debug)]
enum EnvSource {
    Process,
    Fixed {
        limit: Option<String>,
        root: PathBuf,
    },
}

/// A fully validated configuration, consumed by the governor.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) ceiling: u64,
    pub(crate) ceiling_source: CeilingSource,
    pub(crate) budgets: [EngineLimits; EngineId::COUNT],
    /// Per engine, the page cache its governed I/O may leave behind.
    pub(crate) page_cache: [u64; EngineId::COUNT],
    pub(crate) thresholds: PressureThresholds,
    pub(crate) rebalance: RebalanceConfig,
    pub(crate) rss_margin: u64,
    /// How far below the cgroup's limit the ceiling sits (when it comes from the cgroup).
    pub(crate) cgroup_margin: Size,
    pub(crate) proc_status: PathBuf,
    /// The process's memory cgroup, if it is in one (read for the kernel's figures).
    pub(crate) cgroup: Option<crate::cgroup::Cgroup>,
    /// Physical memory, where it can be read.
    pub(crate) physical: Option<u64>,
    /// Overflow settings, the capacity in bytes (`None`: from the disk at install), and whether
    /// they were given explicitly (a default that cannot be honoured disables overflow with a
    /// warning; an explicit one is an error).
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models never install a governor")
    )]
    pub(crate) overflow: Option<(OverflowConfig, Option<u64>, bool)>,
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models never install a governor")
    )]
    pub(crate) numa_policy: nodedb_mem_alloc::ctl::numa::NumaPolicy,
    /// Whether `install` may go on when the engine arenas cannot be created.
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models never install a governor")
    )]
    pub(crate) allow_unattributed: bool,
    /// Whether the engines' arenas may get transparent huge pages.
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models never install a governor")
    )]
    pub(crate) huge_pages: bool,
    /// The heap-profile sampling interval `install` sets (`None`: left as it is).
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models never install a governor")
    )]
    pub(crate) heap_profile_interval: Option<u64>,
    /// The in-flight bound the caller expects (checked against the process's at install).
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models never install a governor")
    )]
    pub(crate) inflight_bound: Option<u64>,
    /// The interval of the background thread `install` starts (`None`: none).
    #[cfg_attr(
        nodedb_mem_loom,
        expect(dead_code, reason = "loom models never install a governor")
    )]
    pub(crate) background: Option<std::time::Duration>,
    /// The longest sleep of the background thread while quiet, in intervals.
    pub(crate) background_stretch: u32,
    /// Bytes of file data one sweep of a governed directory examines.
    pub(crate) sweep_budget: u64,
}

/// The ceiling for a cgroup limit of `limit` bytes: the limit less `margin` (a fraction of it,
/// or bytes); `None` if nothing is left.
pub(crate) fn cgroup_ceiling(limit: u64, margin: Size) -> Option<u64> {
    Some(limit.saturating_sub(margin.resolve(limit))).filter(|&c| c > 0)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct EngineLimits {
    pub(crate) base: u64,
    pub(crate) floor: u64,
    pub(crate) cap: u64,
}

impl Default for GovernorBuilder {
    fn default() -> Self {
        GovernorBuilder {
            ceiling: None,
            overhead: DEFAULT_OVERHEAD_RESERVE,
            budgets: [None; EngineId::COUNT],
            page_cache: [None; EngineId::COUNT],
            floors: [None; EngineId::COUNT],
            caps: [None; EngineId::COUNT],
            thresholds: PressureThresholds::default(),
            rebalance: RebalanceConfig::default(),
            env: EnvSource::Process,
            rss_margin: Size::Fraction(DEFAULT_RSS_MARGIN),
            cgroup_margin: Size::Fraction(DEFAULT_CGROUP_MARGIN),
            proc_status: PathBuf::from("/proc/self/status"),
            overflow: None,
            numa_policy: nodedb_mem_alloc::ctl::numa::NumaPolicy::Preferred,
            cap_to_node_memory: false,
            allow_unattributed: false,
            huge_pages: true,
            heap_profile_interval: Some(DEFAULT_HEAP_PROFILE_INTERVAL),
            inflight_bound: None,
            background: Some(DEFAULT_BACKGROUND_INTERVAL),
            background_stretch: BACKGROUND_STRETCH_MAX,
            sweep_budget: DEFAULT_SWEEP_BUDGET,
        }
    }
}

impl GovernorBuilder {
    /// Sets the process-wide ceiling in bytes. Without it, the ceiling is
    /// `NODEDB_MEMORY_LIMIT` when set, else the cgroup memory limit, else 80 % of physical
    /// memory (see [`CeilingSource`]).
    pub fn global_ceiling(mut self, bytes: u64) -> Self {
        self.ceiling = Some(bytes);
        self
    }

    /// Sets an engine's budget (its initial limit), in bytes or as a fraction of the ceiling.
    /// Engines without one share what the explicit budgets leave of the assignable ceiling,
    /// in the default proportions (vector 30, sparse 10, crdt 10, timeseries 20, query 25,
    /// unattributed 5).
    pub fn budget(mut self, engine: EngineId, size: impl Into<Size>) -> Self {
        self.budgets[engine.index()] = Some(size.into());
        self
    }

    /// Sets the floor below which rebalancing never lends this engine's limit (default: half
    /// its budget).
    pub fn floor(mut self, engine: EngineId, size: impl Into<Size>) -> Self {
        self.floors[engine.index()] = Some(size.into());
        self
    }

    /// Sets the cap above which rebalancing never raises this engine's limit (default: the
    /// assignable ceiling, or the engine's budget if that is larger).
    pub fn cap(mut self, engine: EngineId, size: impl Into<Size>) -> Self {
        self.caps[engine.index()] = Some(size.into());
        self
    }

    /// Sets the share of the ceiling kept out of the default budgets for allocator overhead,
    /// in `[0, 0.9]` (default 0.10).
    pub fn overhead_reserve(mut self, fraction: f64) -> Self {
        self.overhead = fraction;
        self
    }

    /// Sets the pressure thresholds (default 70 / 85 / 95 %, hysteresis 5 points).
    pub fn thresholds(mut self, thresholds: PressureThresholds) -> Self {
        self.thresholds = thresholds;
        self
    }

    /// Sets how rebalancing chooses lenders and borrowers.
    pub fn rebalance(mut self, config: RebalanceConfig) -> Self {
        self.rebalance = config;
        self
    }

    /// Sets the margin kept between resident memory and the ceiling (default 5 % of the
    /// ceiling); see
    /// [`MemoryGovernor::check_resident`](crate::MemoryGovernor::check_resident).
    pub fn rss_margin(mut self, margin: impl Into<Size>) -> Self {
        self.rss_margin = margin.into();
        self
    }

    /// Sets how far below the cgroup's limit the ceiling sits when it comes from the cgroup
    /// (default [`DEFAULT_CGROUP_MARGIN`] of the limit): room for what the kernel charges to
    /// the cgroup beyond the process's governed memory — page cache, kernel memory (page
    /// tables, slab), code and stacks — so that the governor, not the kernel's reclaim or
    /// OOM killer, holds the line. A fraction (of the limit, at most 0.5) or bytes (below
    /// the limit). Kept as the limit moves.
    pub fn cgroup_margin(mut self, margin: impl Into<Size>) -> Self {
        self.cgroup_margin = margin.into();
        self
    }

    /// Configures overflow (see [`OverflowConfig`]); `install` enables it. Without this call,
    /// `install` enables overflow with [`OverflowConfig::default`] when it can (and logs a
    /// warning and goes without when the temp directory is on tmpfs).
    pub fn overflow(mut self, config: OverflowConfig) -> Self {
        self.overflow = Some(config);
        self
    }

    /// Sets how engine memory is bound to its NUMA node (default: preferred, so a full node
    /// spills to others; strict binds it to the node). Takes effect at `install`.
    pub fn numa_policy(mut self, policy: nodedb_mem_alloc::ctl::numa::NumaPolicy) -> Self {
        self.numa_policy = policy;
        self
    }

    /// Caps every engine's limit at the memory of the largest NUMA node (for thread-per-core
    /// deployments with strict binding, where an engine's memory sits on one node): caps and
    /// default budgets are lowered to it, and an explicit budget above it is refused. No effect
    /// where the topology is unknown.
    pub fn cap_to_node_memory(mut self, on: bool) -> Self {
        self.cap_to_node_memory = on;
        self
    }

    /// Sets the page cache `engine`'s governed I/O ([`MemoryGovernor::writer`],
    /// [`MemoryGovernor::reader`]) may leave behind before it writes back and drops pages behind
    /// itself (default: an eighth of the engine's budget, at least 4 MiB). Bytes or a fraction
    /// of the ceiling; above zero and at most the ceiling.
    ///
    /// [`MemoryGovernor::writer`]: crate::MemoryGovernor::writer
    /// [`MemoryGovernor::reader`]: crate::MemoryGovernor::reader
    pub fn page_cache_budget(mut self, engine: EngineId, size: impl Into<Size>) -> Self {
        self.page_cache[engine.index()] = Some(size.into());
        self
    }

    /// Sets the interval of the background thread that [`install`](Self::install) starts
    /// (default [`DEFAULT_BACKGROUND_INTERVAL`], 100 ms): at each tick it samples resident
    /// memory and purges or pushes out what passes the margin
    /// ([`check_resident`](crate::MemoryGovernor::check_resident)), sweeps the governed
    /// directories out of the page cache ([`govern_dir`](crate::MemoryGovernor::govern_dir)),
    /// rebalances, and emits pending events. While nothing moves it sleeps longer, up to
    /// [`BACKGROUND_STRETCH_MAX`] intervals, and whatever moves wakes it at once (see
    /// [`Snapshot::background_sleep`](crate::Snapshot::background_sleep)). `None` starts no
    /// thread: call those yourself, or
    /// [`spawn_rebalancer`](crate::MemoryGovernor::spawn_rebalancer) at your own cadence. The
    /// inline push-out that holds resident memory under the ceiling while overflow grows does
    /// not depend on it. A zero interval is refused.
    pub fn background(mut self, interval: Option<std::time::Duration>) -> Self {
        self.background = interval;
        self
    }

    /// Sets the longest the background thread sleeps while nothing moves, in intervals
    /// (default [`BACKGROUND_STRETCH_MAX`], 20; `1`: never past the interval). Allocations
    /// and the governor's own events wake it at once whatever this is; what a longer sleep
    /// delays while the process is quiet is the answer to resident memory the governor does not
    /// hand out and to a moved cgroup limit. On a virtual machine each wake-up costs more than
    /// the tick (`docs/benchmarks.md`), so a longer sleep is what lowers the idle cost there.
    /// Between 1 and 1000.
    ///
    /// ```
    /// use nodedb_mem::MemoryGovernor;
    ///
    /// let err = MemoryGovernor::builder().background_stretch(0).build().unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "invalid configuration `background_stretch` = 0: must be between 1 (never sleep past the interval) and 1000 intervals"
    /// );
    /// # Ok::<(), nodedb_mem::MemError>(())
    /// ```
    pub fn background_stretch(mut self, intervals: u32) -> Self {
        self.background_stretch = intervals;
        self
    }

    /// Sets how much file data (bytes the files hold, holes left out) one sweep of a governed
    /// directory examines ([`govern_dir`](crate::MemoryGovernor::govern_dir); default
    /// [`DEFAULT_SWEEP_BUDGET`], 4 GiB): the next sweep resumes where the last one stopped, so a
    /// directory of any size costs each tick a bounded time and every file is reached in turn.
    /// Zero is refused.
    pub fn sweep_budget(mut self, bytes: u64) -> Self {
        self.sweep_budget = bytes;
        self
    }

    /// Whether the engines' memory may be backed by transparent huge pages (default yes: the
    /// kernel's setting decides). `false` keeps them out of the engines' ranges at
    /// [`install`](Self::install) (`MADV_NOHUGEPAGE`): under the kernel's `always` setting,
    /// huge pages leave the process resident beyond what its blocks hold (measured: 924 MiB
    /// resident for 812 MiB of blocks, 881 MiB without them in the engines' ranges), at the
    /// price of TLB misses (random reads over those 812 MiB took 1.45× as long, medians of
    /// six runs; see `docs/benchmarks.md`). Either way the excess is resident memory, which
    /// the governor counts against the ceiling.
    pub fn huge_pages(mut self, allow: bool) -> Self {
        self.huge_pages = allow;
        self
    }

    /// Samples heap allocations for per-engine profiles
    /// ([`MemoryGovernor::heap_profile`](crate::MemoryGovernor::heap_profile)) at a mean
    /// interval of `bytes` allocated per thread once [`install`](Self::install) has run; `0`
    /// leaves sampling off. The default, [`DEFAULT_HEAP_PROFILE_INTERVAL`], keeps profiling on
    /// at a cost measured in `docs/benchmarks.md`; change it at run time with
    /// [`MemoryGovernor::set_heap_profiling`](crate::MemoryGovernor::set_heap_profiling).
    /// `build` leaves the process's sampling as it is (the sampler is the process's, as the
    /// allocator is).
    pub fn heap_profile_interval(mut self, bytes: u64) -> Self {
        self.heap_profile_interval = Some(bytes);
        self
    }

    /// The per-thread in-flight bound this program expects (see
    /// [`inflight_bound`](crate::inflight_bound)): a power of two from 64 KiB (the default:
    /// the ledger is exact to 64 KiB per thread) to 4 MiB (fewer settlements, a cheaper hot
    /// path; `docs/benchmarks.md` has the cost of each). The bound is the process's and is
    /// fixed at its first allocation, before `main`, from the environment variable
    /// [`INFLIGHT_BOUND_ENV`](crate::INFLIGHT_BOUND_ENV) (`NODEDB_MEM_INFLIGHT_BOUND=1MiB`);
    /// this setting does not change it but makes [`install`](Self::install) refuse to run
    /// under another one, so a deployment that lost the variable fails at start rather than
    /// running with other bounds than tested. Checked at `build` too.
    ///
    /// ```
    /// use nodedb_mem::MemoryGovernor;
    ///
    /// let err = MemoryGovernor::builder().inflight_bound(96 << 10).build().unwrap_err();
    /// assert_eq!(
    ///     err.to_string(),
    ///     "invalid configuration `inflight_bound` = 96 KiB: must be a power of two"
    /// );
    /// # Ok::<(), nodedb_mem::MemError>(())
    /// ```
    pub fn inflight_bound(mut self, bytes: u64) -> Self {
        self.inflight_bound = Some(bytes);
        self
    }

    /// Lets [`install`](Self::install) succeed where the engine arenas cannot be created (too
    /// little address space even for [`MIN_RANGE_BYTES`](crate::MIN_RANGE_BYTES) per engine,
    /// say): every allocation is then served, and counted, as `Unattributed`'s, and only
    /// explicit reservations limit the engines. Off by default: `install` then fails with
    /// [`MemError::ArenasUnavailable`], which says why.
    pub fn allow_unattributed(mut self, allow: bool) -> Self {
        self.allow_unattributed = allow;
        self
    }

    /// Reads resident memory from this `/proc/<pid>/status`-format file instead of
    /// `/proc/self/status`. For tests.
    pub fn proc_status_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.proc_status = path.into();
        self
    }

    /// Decides the default ceiling from the given `NODEDB_MEMORY_LIMIT` value and a root
    /// directory holding `proc/self/cgroup`, `sys/fs/cgroup/...` and `proc/meminfo`, instead of
    /// the real environment and `/`; the cgroup figures of the snapshot are read under the
    /// same root. For tests and for embedding in a sandbox.
    pub fn ceiling_environment(
        mut self,
        memory_limit: Option<&str>,
        root: impl Into<PathBuf>,
    ) -> Self {
        self.env = EnvSource::Fixed {
            limit: memory_limit.map(str::to_owned),
            root: root.into(),
        };
        self
    }

    pub(crate) fn validate(self) -> Result<Config> {
        let (mut ceiling, ceiling_source) = match (self.ceiling, &self.env) {
            (Some(c), _) => (c, CeilingSource::Explicit),
            (None, EnvSource::Fixed { limit, root }) => ceiling::detect(limit.as_deref(), root)?,
            (None, EnvSource::Process) => {
                let value = match std::env::var(MEMORY_LIMIT_ENV) {
                    Ok(v) => Some(v),
                    Err(std::env::VarError::NotPresent) => None,
                    Err(std::env::VarError::NotUnicode(raw)) => {
                        return Err(MemError::config(
                            MEMORY_LIMIT_ENV,
                            format!("{raw:?}"),
                            "not valid UTF-8",
                        ));
                    }
                };
                ceiling::detect(value.as_deref(), std::path::Path::new("/"))?
            }
        };
        let root = match &self.env {
            EnvSource::Fixed { root, .. } => root.as_path(),
            EnvSource::Process => std::path::Path::new("/"),
        };
        let cgroup = crate::cgroup::Cgroup::find(root);
        let physical = ceiling::physical_memory(root);
        if let Size::Fraction(f) = self.cgroup_margin
            && !(0.0..=0.5).contains(&f)
        {
            return Err(MemError::config(
                "cgroup_margin",
                f,
                "a fraction of the cgroup's limit must be between 0 and 0.5",
            ));
        }
        if let CeilingSource::Cgroup { limit, .. } = ceiling_source {
            ceiling = cgroup_ceiling(limit, self.cgroup_margin).ok_or_else(|| {
                MemError::config(
                    "cgroup_margin",
                    self.cgroup_margin,
                    format!(
                        "leaves nothing of the cgroup's limit of {}",
                        ByteSize(limit)
                    ),
                )
            })?;
        }
        let field = match ceiling_source {
            CeilingSource::Environment => MEMORY_LIMIT_ENV,
            CeilingSource::Cgroup { .. } => "cgroup limit less cgroup_margin",
            _ => "global_ceiling",
        };
        if !(MIN_CEILING..=MAX_CEILING).contains(&ceiling) {
            return Err(MemError::config(
                field,
                ByteSize(ceiling),
                format!(
                    "must be between {} and {}",
                    ByteSize(MIN_CEILING),
                    ByteSize(MAX_CEILING)
                ),
            ));
        }
        if !(0.0..=0.9).contains(&self.overhead) {
            return Err(MemError::config(
                "overhead_reserve",
                self.overhead,
                "must be between 0 and 0.9",
            ));
        }
        if self.background.is_some_and(|d| d.is_zero()) {
            return Err(MemError::config("background", "0 s", "must be above zero"));
        }
        if let Some(b) = self.inflight_bound {
            let text = b.to_string();
            nodedb_mem_alloc::ctl::ledger::parse_bound(text.as_bytes())
                .map_err(|why| MemError::config("inflight_bound", crate::size::ByteSize(b), why))?;
        }
        if !(1..=1000).contains(&self.background_stretch) {
            return Err(MemError::config(
                "background_stretch",
                self.background_stretch,
                "must be between 1 (never sleep past the interval) and 1000 intervals",
            ));
        }
        if self.sweep_budget == 0 {
            return Err(MemError::config(
                "sweep_budget",
                "0 B",
                "must be above zero",
            ));
        }
        self.thresholds.validate()?;
        self.rebalance.validate(&self.thresholds)?;

        let resolve = |kind: &str, e: EngineId, s: Option<Size>| -> Result<Option<u64>> {
            let Some(s) = s else { return Ok(None) };
            let field = format!("{kind}.{e}");
            match s {
                Size::Bytes(0) => Err(MemError::config(field, "0 B", "must be above zero")),
                Size::Fraction(f) if !(f > 0.0 && f <= 1.0) => Err(MemError::config(
                    field,
                    f,
                    "a fraction of the ceiling must be above 0 and at most 1",
                )),
                Size::Bytes(b) if b > ceiling => Err(MemError::config(
                    field,
                    ByteSize(b),
                    format!("above the global ceiling of {}", ByteSize(ceiling)),
                )),
                s => match s.resolve(ceiling) {
                    0 => Err(MemError::config(field, s, "rounds down to zero bytes")),
                    b => Ok(Some(b)),
                },
            }
        };

        let rss_margin = match self.rss_margin {
            Size::Fraction(f) if !(f > 0.0 && f < 1.0) => {
                return Err(MemError::config(
                    "rss_margin",
                    f,
                    "a fraction of the ceiling must be above 0 and below 1",
                ));
            }
            s => s.resolve(ceiling),
        };
        if rss_margin == 0 || rss_margin >= ceiling {
            return Err(MemError::config(
                "rss_margin",
                ByteSize(rss_margin),
                format!(
                    "must be above zero and below the ceiling ({})",
                    ByteSize(ceiling)
                ),
            ));
        }
        let overflow = {
            let explicit = self.overflow.is_some();
            let c = self.overflow.unwrap_or_default();
            let capacity = match c.capacity {
                None => None,
                Some(Size::Bytes(0)) => {
                    return Err(MemError::config(
                        "overflow.capacity",
                        "0 B",
                        "must be above zero",
                    ));
                }
                Some(Size::Fraction(f)) if !(f > 0.0 && f <= 1.0) => {
                    return Err(MemError::config(
                        "overflow.capacity",
                        f,
                        "a fraction of the ceiling must be above 0 and at most 1",
                    ));
                }
                Some(s) => Some(s.resolve(ceiling)),
            };
            if let Some(capacity) = capacity
                && capacity > MAX_OVERFLOW_CAPACITY
            {
                return Err(MemError::config(
                    "overflow.capacity",
                    ByteSize(capacity),
                    format!(
                        "above the {} an engine's overflow range holds",
                        ByteSize(MAX_OVERFLOW_CAPACITY)
                    ),
                ));
            }
            if explicit && !c.dir.is_dir() {
                return Err(MemError::config(
                    "overflow.dir",
                    c.dir.display(),
                    "not a directory",
                ));
            }
            Some((c, capacity, explicit))
        };
        let node_memory = self.cap_to_node_memory.then(|| {
            let root = match &self.env {
                EnvSource::Fixed { root, .. } => root.clone(),
                EnvSource::Process => PathBuf::from("/"),
            };
            let topo =
                nodedb_mem_alloc::ctl::numa::Topology::read(root.as_os_str().as_encoded_bytes());
            (0..nodedb_mem_alloc::ctl::numa::MAX_NODES)
                .filter(|&n| topo.has_node(n))
                .map(|n| topo.node_memory(n))
                .max()
                .unwrap_or(u64::MAX)
        });
        let node_memory = node_memory.filter(|&m| m != u64::MAX);
        let assignable = ceiling - fraction_of(ceiling, self.overhead);
        let mut explicit = [None; EngineId::COUNT];
        for e in EngineId::ALL {
            explicit[e.index()] = resolve("budget", e, self.budgets[e.index()])?;
        }
        let explicit_total: u64 = explicit.iter().flatten().sum();
        if explicit_total > ceiling {
            return Err(MemError::BudgetsExceedCeiling {
                total: explicit_total,
                ceiling,
            });
        }
        let remainder = assignable.saturating_sub(explicit_total);
        let open_weight: u64 = EngineId::ALL
            .iter()
            .filter(|e| explicit[e.index()].is_none())
            .map(|e| DEFAULT_WEIGHTS[e.index()])
            .sum();
        // The last engine without an explicit budget takes the rounding remainder, so the
        // default budgets add up to the assignable ceiling exactly.
        let last_open = EngineId::ALL
            .iter()
            .rposition(|e| explicit[e.index()].is_none());
        let mut handed_out = 0u64;
        let mut budgets = [EngineLimits {
            base: 0,
            floor: 0,
            cap: 0,
        }; EngineId::COUNT];
        for e in EngineId::ALL {
            let i = e.index();
            let base = match explicit[i] {
                Some(b) => b,
                None => {
                    let share = if Some(i) == last_open {
                        remainder - handed_out
                    } else {
                        (u128::from(remainder) * u128::from(DEFAULT_WEIGHTS[i])
                            / u128::from(open_weight)) as u64
                    };
                    handed_out += share;
                    if share == 0 {
                        return Err(MemError::config(
                            format!("budget.{e}"),
                            "default",
                            format!(
                                "nothing is left for it: explicit budgets take {} of the {} assignable",
                                ByteSize(explicit_total),
                                ByteSize(assignable)
                            ),
                        ));
                    }
                    share
                }
            };
            // A default budget is lowered to what a node holds; an explicit one is refused below.
            let base = match node_memory {
                Some(node) if explicit[i].is_none() => base.min(node),
                _ => base,
            };
            let floor = resolve("floor", e, self.floors[i])?.unwrap_or(base / 2);
            let cap = resolve("cap", e, self.caps[i])?.unwrap_or(assignable.max(base));
            let cap = match node_memory {
                Some(node) if base > node => {
                    return Err(MemError::config(
                        format!("budget.{e}"),
                        ByteSize(base),
                        format!("above the largest NUMA node's memory ({})", ByteSize(node)),
                    ));
                }
                Some(node) => cap.min(node),
                None => cap,
            };
            if floor > cap {
                return Err(MemError::config(
                    format!("floor.{e}"),
                    ByteSize(floor),
                    format!("above cap.{e} ({})", ByteSize(cap)),
                ));
            }
            if floor > base {
                return Err(MemError::config(
                    format!("floor.{e}"),
                    ByteSize(floor),
                    format!("above budget.{e} ({})", ByteSize(base)),
                ));
            }
            if base > cap {
                return Err(MemError::config(
                    format!("cap.{e}"),
                    ByteSize(cap),
                    format!("below budget.{e} ({})", ByteSize(base)),
                ));
            }
            budgets[i] = EngineLimits { base, floor, cap };
        }
        let mut page_cache = [0u64; EngineId::COUNT];
        for (i, e) in EngineId::ALL.into_iter().enumerate() {
            page_cache[i] = match resolve("page_cache", e, self.page_cache[i])? {
                Some(b) => b,
                None => (budgets[i].base / 8)
                    .max(DEFAULT_MIN_PAGE_CACHE)
                    .min(ceiling),
            };
        }
        Ok(Config {
            ceiling,
            ceiling_source,
            budgets,
            page_cache,
            thresholds: self.thresholds,
            rebalance: self.rebalance,
            rss_margin,
            cgroup_margin: self.cgroup_margin,
            proc_status: self.proc_status,
            cgroup,
            physical,
            overflow,
            numa_policy: self.numa_policy,
            allow_unattributed: self.allow_unattributed,
            huge_pages: self.huge_pages,
            heap_profile_interval: self.heap_profile_interval,
            inflight_bound: self.inflight_bound,
            background: self.background,
            background_stretch: self.background_stretch,
            sweep_budget: self.sweep_budget,
        })
    }
}

#[cfg(all(test, not(nodedb_mem_loom)))]
mod tests {
    use super::*;
    use EngineId::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn err(b: GovernorBuilder) -> String {
        b.validate().unwrap_err().to_string()
    }

    fn ceiling(bytes: u64) -> GovernorBuilder {
        GovernorBuilder::default().global_ceiling(bytes)
    }

    #[test]
    fn defaults_budget_every_engine_and_keep_overhead() {
        let c = ceiling(10 * GIB).validate().unwrap();
        let total: u64 = c.budgets.iter().map(|b| b.base).sum();
        assert_eq!(total, 9 * GIB);
        let frac = |e: EngineId| c.budgets[e.index()].base as f64 / (9 * GIB) as f64;
        assert!((frac(Vector) - 0.30).abs() < 1e-9);
        assert!((frac(Query) - 0.25).abs() < 1e-9);
        assert!((frac(Unattributed) - 0.05).abs() < 1e-8);
        for b in c.budgets {
            assert!(b.base > 0);
            assert_eq!(b.floor, b.base / 2);
            assert_eq!(b.cap, 9 * GIB);
        }
        assert_eq!(c.ceiling_source, CeilingSource::Explicit);
    }

    #[test]
    fn explicit_budgets_and_the_rest_shared() {
        let c = ceiling(GIB)
            .overhead_reserve(0.0)
            .budget(Query, 512 * MIB)
            .budget(Vector, Size::Fraction(0.25))
            .validate()
            .unwrap();
        assert_eq!(c.budgets[Query.index()].base, 512 * MIB);
        assert_eq!(c.budgets[Vector.index()].base, 256 * MIB);
        // 256 MiB left for sparse 10, crdt 10, timeseries 20, unattributed 5 (of 45).
        let rest = 256 * MIB;
        assert_eq!(c.budgets[Timeseries.index()].base, rest * 20 / 45);
        assert_eq!(c.budgets[Sparse.index()].base, rest * 10 / 45);
    }

    #[test]
    fn ceilings_out_of_range_are_refused() {
        assert_eq!(
            err(ceiling(0)),
            "invalid configuration `global_ceiling` = 0 B: must be between 1 MiB and 1024 TiB"
        );
        assert_eq!(
            err(ceiling(u64::MAX)),
            "invalid configuration `global_ceiling` = 16777216.0 TiB (18446744073709551615 B): must be between 1 MiB and 1024 TiB"
        );
        assert_eq!(
            err(GovernorBuilder::default().ceiling_environment(Some("512KiB"), "/nonexistent")),
            "invalid configuration `NODEDB_MEMORY_LIMIT` = 512 KiB: must be between 1 MiB and 1024 TiB"
        );
    }

    #[test]
    fn budgets_above_the_ceiling_are_refused() {
        assert_eq!(
            err(ceiling(GIB)
                .budget(Query, 768 * MIB)
                .budget(Vector, 512 * MIB)),
            "the engine budgets total 1.2 GiB (1342177280 B), above the global ceiling of 1 GiB"
        );
        assert_eq!(
            err(ceiling(GIB).budget(Query, 2 * GIB)),
            "invalid configuration `budget.query` = 2 GiB: above the global ceiling of 1 GiB"
        );
        assert_eq!(
            err(ceiling(GIB).budget(Query, Size::Fraction(1.0))),
            "invalid configuration `budget.vector` = default: nothing is left for it: explicit budgets take 1 GiB of the 921.6 MiB (966367642 B) assignable"
        );
    }

    #[test]
    fn zero_and_bad_fractions_are_refused() {
        assert_eq!(
            err(ceiling(GIB).budget(Crdt, 0)),
            "invalid configuration `budget.crdt` = 0 B: must be above zero"
        );
        assert_eq!(
            err(ceiling(GIB).floor(Crdt, Size::Fraction(1.5))),
            "invalid configuration `floor.crdt` = 1.5: a fraction of the ceiling must be above 0 and at most 1"
        );
        assert_eq!(
            err(ceiling(GIB).cap(Crdt, Size::Fraction(f64::NAN))),
            "invalid configuration `cap.crdt` = NaN: a fraction of the ceiling must be above 0 and at most 1"
        );
        assert_eq!(
            err(ceiling(GIB).budget(Crdt, Size::Fraction(1e-12))),
            "invalid configuration `budget.crdt` = 0.0000000001% of the ceiling: rounds down to zero bytes"
        );
    }

    #[test]
    fn floors_and_caps_must_bracket_the_budget() {
        assert_eq!(
            err(ceiling(GIB)
                .budget(Query, 100 * MIB)
                .floor(Query, 300 * MIB)
                .cap(Query, 200 * MIB)),
            "invalid configuration `floor.query` = 300 MiB: above cap.query (200 MiB)"
        );
        assert_eq!(
            err(ceiling(GIB)
                .budget(Query, 100 * MIB)
                .floor(Query, 150 * MIB)),
            "invalid configuration `floor.query` = 150 MiB: above budget.query (100 MiB)"
        );
        assert_eq!(
            err(ceiling(GIB).budget(Query, 100 * MIB).cap(Query, 50 * MIB)),
            "invalid configuration `cap.query` = 50 MiB: below budget.query (100 MiB)"
        );
    }

    #[test]
    fn other_settings_are_checked() {
        assert_eq!(
            err(ceiling(GIB).overhead_reserve(0.95)),
            "invalid configuration `overhead_reserve` = 0.95: must be between 0 and 0.9"
        );
        let bad = PressureThresholds {
            warning: 0.9,
            ..Default::default()
        };
        assert_eq!(
            err(ceiling(GIB).thresholds(bad)),
            "invalid configuration `thresholds.critical` = 0.85: must be above thresholds.warning (0.9)"
        );
        let r = RebalanceConfig {
            target_utilisation: 0.8,
            ..Default::default()
        };
        assert_eq!(
            err(ceiling(GIB).rebalance(r)),
            "invalid configuration `rebalance.target_utilisation` = 0.8: must be above 0 and below thresholds.warning (0.7)"
        );
        let r = RebalanceConfig {
            idle_utilisation: 0.6,
            ..Default::default()
        };
        assert_eq!(
            err(ceiling(GIB).rebalance(r)),
            "invalid configuration `rebalance.idle_utilisation` = 0.6: must be above 0 and below rebalance.target_utilisation (0.6)"
        );
        let r = RebalanceConfig {
            min_move: 0,
            ..Default::default()
        };
        assert_eq!(
            err(ceiling(GIB).rebalance(r)),
            "invalid configuration `rebalance.min_move` = 0: must be above zero"
        );
    }

    #[test]
    fn node_memory_caps_the_limits_when_asked() {
        let root = tempfile::tempdir().unwrap();
        for (n, kib) in [(0, 1 << 20), (1, 2 << 20)] {
            let dir = root.path().join(format!("sys/devices/system/node/node{n}"));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("cpulist"), format!("{n}\n")).unwrap();
            std::fs::write(
                dir.join("meminfo"),
                format!("Node {n} MemTotal: {kib} kB\n"),
            )
            .unwrap();
        }
        let b = || {
            GovernorBuilder::default()
                .global_ceiling(8 * GIB)
                .ceiling_environment(None, root.path())
                .cap_to_node_memory(true)
        };
        let c = b().budget(Query, GIB).validate().unwrap();
        assert_eq!(
            c.budgets[Query.index()].cap,
            2 * GIB,
            "the largest node holds 2 GiB"
        );
        assert!(c.budgets.iter().all(|l| l.cap <= 2 * GIB));
        assert_eq!(
            err(b().budget(Query, 3 * GIB)),
            "invalid configuration `budget.query` = 3 GiB: above the largest NUMA node's memory (2 GiB)"
        );
        // Without the option, or without a topology, nothing changes.
        let c = ceiling(8 * GIB).budget(Query, 3 * GIB).validate().unwrap();
        assert!(c.budgets[Query.index()].cap > 2 * GIB);
    }

    #[test]
    fn environment_sets_the_default_ceiling() {
        let c = GovernorBuilder::default()
            .ceiling_environment(Some("2GiB"), "/nonexistent")
            .validate()
            .unwrap();
        assert_eq!(
            (c.ceiling, c.ceiling_source),
            (2 * GIB, CeilingSource::Environment)
        );
        assert_eq!(
            err(GovernorBuilder::default().ceiling_environment(Some("two"), "/nonexistent")),
            "invalid size for `NODEDB_MEMORY_LIMIT`: \"two\": the size does not start with a number"
        );
        // An explicit ceiling wins over the environment.
        let c = ceiling(GIB)
            .ceiling_environment(Some("nonsense"), "/nonexistent")
            .validate()
            .unwrap();
        assert_eq!(c.ceiling, GIB);
    }
}
