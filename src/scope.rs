//! Scopes: named budgets in a tree under the global ceiling (a database, a tenant inside it, any
//! depth), beside the engines' budgets.
//!
//! # Rules
//!
//! * A scoped reservation is admitted only if its engine, every scope from its own up to the
//!   root, and the ceiling all have room. Each level is one compare-and-swap on its headroom
//!   word that refuses to go below zero, taken engine first, then the scopes from the leaf up,
//!   then the ceiling; a refusal gives back every level already taken before it returns, so a
//!   refused reservation leaves nothing charged anywhere (and a concurrent reservation may be
//!   refused in that instant — conservative, never over-admitting).
//! * A scope's usage counts the reservations made in it and in every scope below it. Scopes
//!   count reservations only: the global allocator attributes heap bytes to engines, not to
//!   scopes.
//! * Limits are independent: a child may be given more than its parent (overcommitting tenants
//!   is common); the parent's limit still holds for all of them together. A limit can be
//!   changed while reservations are live; lowering it below usage leaves the headroom negative
//!   (the scope's pressure rises and new reservations are refused) and never wraps.
//! * A scope is open while reservations made in it or child scopes under it are alive: its
//!   live count and a closed bit share one word, so removal (a compare-and-swap from exactly
//!   zero to closed) and a new reservation (an increment refused once closed) cannot both
//!   succeed.

use std::fmt;

use crate::budget::{checked_sub, raise_max, update_level};
use crate::headroom::Headroom;
use crate::pressure::{PressureLevel, ThresholdsPpm};
use crate::sync::{Arc, AtomicU8, AtomicU64, Mutex, Ordering, lock};

/// A scope's number, unique within its governor, in creation order from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ScopeId(pub(crate) u64);

impl ScopeId {
    /// The number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ScopeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Where a scope's pressure change is reported: (scope, from, to). The governor records it as
/// an event.
pub(crate) type PressureSink =
    dyn Fn(ScopeId, PressureLevel, PressureLevel) + Send + Sync + std::panic::RefUnwindSafe;

/// What every scope of one tree shares: the thresholds its pressure is judged by (the
/// engines'), and where a change is reported.
pub(crate) struct TreeShared {
    ppm: ThresholdsPpm,
    on_change: Box<PressureSink>,
}

/// The closed bit of a scope's `open` word; the bits below count what keeps it open.
const CLOSED: u64 = 1 << 63;

/// The longest scope name accepted, in bytes.
pub const MAX_SCOPE_NAME: usize = 128;

pub(crate) struct ScopeNode {
    pub(crate) id: ScopeId,
    /// The names from the root down, joined by `/`.
    pub(crate) path: String,
    pub(crate) name: String,
    pub(crate) parent: Option<Arc<ScopeNode>>,
    /// The tree this scope belongs to (to refuse another governor's scope).
    tree: u64,
    /// The thresholds its pressure is judged by, and where a change is reported.
    shared: std::sync::Arc<TreeShared>,
    /// The limit and `limit - usage`, the admission word.
    headroom: Headroom,
    /// Bytes reserved in this scope and every scope below it.
    usage: AtomicU64,
    peak: AtomicU64,
    rejections: AtomicU64,
    /// Live reservations made in this scope, plus live child scopes; `CLOSED` once removed.
    open: AtomicU64,
    children: AtomicU64,
    level: AtomicU8,
    transitions: AtomicU64,
}

impl ScopeNode {
    /// This scope and its ancestors, leaf first.
    pub(crate) fn path_up(&self) -> impl Iterator<Item = &ScopeNode> {
        std::iter::successors(Some(self), |n| n.parent.as_deref())
    }

    pub(crate) fn limit(&self) -> u64 {
        self.headroom.limit()
    }

    pub(crate) fn usage(&self) -> u64 {
        self.usage.load(Ordering::Acquire)
    }

    /// `headroom` as stored, for consistency checks.
    pub(crate) fn raw_headroom(&self) -> i64 {
        self.headroom.raw()
    }

    /// Takes `bytes` of headroom, or reports the usage the refused compare-and-swap saw.
    pub(crate) fn try_take(&self, bytes: u64) -> std::result::Result<(), u64> {
        self.headroom
            .take(bytes, 0)
            .map_err(|refused| refused.usage)
    }

    /// Gives back headroom taken by [`try_take`](Self::try_take) and not committed.
    pub(crate) fn untake(&self, bytes: u64) {
        self.headroom.give(bytes);
    }

    pub(crate) fn commit(&self, bytes: u64) {
        let now = self.usage.fetch_add(bytes, Ordering::AcqRel) + bytes;
        raise_max(&self.peak, now);
    }

    /// Gives back `bytes` of committed usage. Cannot underflow: a reservation releases what it
    /// committed at every level on its path.
    pub(crate) fn release(&self, bytes: u64) {
        let lowered = checked_sub(&self.usage, bytes);
        debug_assert!(lowered.is_ok(), "scope usage below a reservation's");
        self.headroom.give(bytes);
    }

    pub(crate) fn count_rejection(&self) {
        self.rejections.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one more thing keeping the scope open (a reservation or a child), unless it is
    /// removed already.
    fn hold_open(&self) -> bool {
        let mut cur = self.open.load(Ordering::Acquire);
        loop {
            if cur & CLOSED != 0 {
                return false;
            }
            match self
                .open
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }

    fn let_close(&self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }

    /// Counts a new reservation in this scope; false if the scope is removed.
    pub(crate) fn enter(&self) -> bool {
        self.hold_open()
    }

    /// Counts a reservation's end.
    pub(crate) fn leave(&self) {
        self.let_close();
    }

    /// Live reservations made in this scope: what keeps it open, less its children.
    fn reservations(&self) -> u64 {
        let open = self.open.load(Ordering::Acquire) & !CLOSED;
        open.saturating_sub(self.children.load(Ordering::Acquire))
    }

    pub(crate) fn is_removed(&self) -> bool {
        self.open.load(Ordering::Acquire) & CLOSED != 0
    }

    /// The pressure level now (the engines' thresholds and hysteresis); a change is
    /// reported to the governor's event log.
    pub(crate) fn pressure(&self) -> PressureLevel {
        let (level, changed) = update_level(
            &self.level,
            &self.transitions,
            &self.shared.ppm,
            self.usage(),
            self.limit(),
        );
        if let Some(from) = changed {
            (self.shared.on_change)(self.id, from, level);
        }
        level
    }

    /// The scope's figures now, with its pressure level and the requests waiting in it.
    pub(crate) fn snapshot(&self, pressure: PressureLevel, waiters: u64) -> ScopeSnapshot {
        let (limit, usage) = (self.limit(), self.usage());
        ScopeSnapshot {
            id: self.id,
            path: self.path.clone(),
            parent: self.parent.as_ref().map(|p| p.id),
            limit,
            usage,
            available: limit.saturating_sub(usage),
            peak: self.peak.load(Ordering::Acquire),
            rejections: self.rejections.load(Ordering::Relaxed),
            reservations: self.reservations(),
            children: self.children.load(Ordering::Relaxed),
            waiters,
            pressure,
            pressure_transitions: self.transitions.load(Ordering::Relaxed),
        }
    }
}

/// One scope's figures at the moment of a [`Snapshot`](crate::Snapshot).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScopeSnapshot {
    /// The scope's number.
    pub id: ScopeId,
    /// Its path (`sales/acme`).
    pub path: String,
    /// Its parent's number, `None` directly under the ceiling.
    pub parent: Option<ScopeId>,
    /// Its limit.
    pub limit: u64,
    /// Bytes reserved in it and below it.
    pub usage: u64,
    /// `limit - usage`, or zero.
    pub available: u64,
    /// The highest usage seen.
    pub peak: u64,
    /// Reservations it refused.
    pub rejections: u64,
    /// Live reservations made in it.
    pub reservations: u64,
    /// Live child scopes.
    pub children: u64,
    /// Requests waiting for memory in it (not counting those in scopes below it).
    pub waiters: u64,
    /// Its pressure level.
    pub pressure: PressureLevel,
    /// Changes of its pressure level so far.
    pub pressure_transitions: u64,
}

/// A handle on one scope of a governor: pass it to
/// [`MemoryGovernor::reserve_in`](crate::MemoryGovernor::reserve_in). Clones name the same
/// scope; a handle outlives the scope's removal (reservations through it are then refused with
/// [`MemError::ScopeRemoved`](crate::MemError::ScopeRemoved)).
///
/// ```
/// use nodedb_mem::{EngineId, MemoryGovernor};
///
/// let gov = MemoryGovernor::builder().global_ceiling(64 << 20).build()?;
/// let db = gov.create_scope("sales", None, 16 << 20)?;
/// let tenant = gov.create_scope("acme", Some(&db), 4 << 20)?;
/// assert_eq!(tenant.path(), "sales/acme");
///
/// let r = gov.reserve_in(EngineId::Query, &tenant, 3 << 20)?;
/// assert_eq!((tenant.usage(), db.usage()), (3 << 20, 3 << 20));
/// let err = gov.reserve_in(EngineId::Query, &tenant, 2 << 20).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "cannot reserve 2 MiB for engine query in scope sales/acme: 3 MiB already used of its \
///      4 MiB limit, 1 MiB available"
/// );
/// drop(r);
/// assert_eq!(db.usage(), 0);
/// # Ok::<(), nodedb_mem::MemError>(())
/// ```
#[derive(Clone)]
pub struct Scope {
    pub(crate) node: Arc<ScopeNode>,
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Scope")
            .field("id", &self.node.id)
            .field("path", &self.node.path)
            .field("limit", &self.limit())
            .field("usage", &self.usage())
            .finish()
    }
}

impl Scope {
    /// The scope's number.
    pub fn id(&self) -> ScopeId {
        self.node.id
    }

    /// Its own name.
    pub fn name(&self) -> &str {
        &self.node.name
    }

    /// The names from the root down, joined by `/` (`sales/acme`).
    pub fn path(&self) -> &str {
        &self.node.path
    }

    /// The parent scope's number, `None` for a scope directly under the ceiling.
    pub fn parent(&self) -> Option<ScopeId> {
        self.node.parent.as_ref().map(|p| p.id)
    }

    /// Its current limit.
    pub fn limit(&self) -> u64 {
        self.node.limit()
    }

    /// Bytes reserved in it and every scope below it.
    pub fn usage(&self) -> u64 {
        self.node.usage()
    }

    /// What a reservation could still get from this scope alone (`limit - usage`, or zero).
    pub fn available(&self) -> u64 {
        self.limit().saturating_sub(self.usage())
    }

    /// The highest usage seen.
    pub fn peak(&self) -> u64 {
        self.node.peak.load(Ordering::Acquire)
    }

    /// Reservations this scope refused.
    pub fn rejections(&self) -> u64 {
        self.node.rejections.load(Ordering::Relaxed)
    }

    /// Live reservations made in this scope (not counting those in scopes below it).
    pub fn reservations(&self) -> u64 {
        self.node.reservations()
    }

    /// Whether [`MemoryGovernor::remove_scope`](crate::MemoryGovernor::remove_scope) removed it.
    pub fn is_removed(&self) -> bool {
        self.node.is_removed()
    }

    /// Its pressure level: usage against limit, with the engines' thresholds and hysteresis.
    /// O(1), lock-free, allocation-free; a change is recorded as an event, as by
    /// [`MemoryGovernor::scope_pressure`](crate::MemoryGovernor::scope_pressure).
    pub fn pressure(&self) -> PressureLevel {
        self.node.pressure()
    }

    /// Changes of its pressure level so far.
    pub fn pressure_transitions(&self) -> u64 {
        self.node.transitions.load(Ordering::Relaxed)
    }

    /// Live child scopes.
    pub fn children(&self) -> u64 {
        self.node.children.load(Ordering::Relaxed)
    }
}

/// Why a scope could not be created, removed or used; the caller turns it into a `MemError`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TreeError {
    /// The name is empty, too long, holds `/` or a control character, or is taken.
    Name(&'static str),
    /// The limit is above the largest ceiling.
    Limit,
    /// The scope (or the parent) is another governor's.
    Foreign,
    /// The scope (or the parent) was removed.
    Removed,
    /// Live reservations or child scopes keep it open: (reservations, usage, children).
    InUse(u64, u64, u64),
}

/// Every live scope of one governor.
pub(crate) struct ScopeTree {
    id: u64,
    shared: std::sync::Arc<TreeShared>,
    /// Live scopes in creation order; the lock also serialises limit changes.
    live: Mutex<Vec<Arc<ScopeNode>>>,
    next: AtomicU64,
}

/// Tells governors' trees apart (a scope handle must not be used with another governor).
static TREES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl ScopeTree {
    /// A tree whose scopes judge pressure by `ppm` and report changes to `on_change`.
    pub(crate) fn new(ppm: ThresholdsPpm, on_change: Box<PressureSink>) -> ScopeTree {
        ScopeTree {
            id: TREES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            shared: std::sync::Arc::new(TreeShared { ppm, on_change }),
            live: Mutex::new(Vec::new()),
            next: AtomicU64::new(1),
        }
    }

    /// Whether `scope` belongs to this tree.
    pub(crate) fn owns(&self, scope: &Scope) -> bool {
        scope.node.tree == self.id
    }

    pub(crate) fn create(
        &self,
        name: &str,
        parent: Option<&Scope>,
        limit: u64,
        max_limit: u64,
    ) -> std::result::Result<Scope, TreeError> {
        if name.is_empty() {
            return Err(TreeError::Name("must not be empty"));
        }
        if name.len() > MAX_SCOPE_NAME {
            return Err(TreeError::Name("must be at most 128 bytes"));
        }
        if name.contains('/') || name.chars().any(char::is_control) {
            return Err(TreeError::Name(
                "must not hold `/` (it joins the names of a path) or control characters",
            ));
        }
        if limit > max_limit {
            return Err(TreeError::Limit);
        }
        if parent.is_some_and(|p| !self.owns(p)) {
            return Err(TreeError::Foreign);
        }
        let mut live = lock(&self.live);
        let parent = parent.map(|p| Arc::clone(&p.node));
        let taken = live.iter().any(|n| {
            n.name == name && n.parent.as_ref().map(|p| p.id) == parent.as_ref().map(|p| p.id)
        });
        if taken {
            return Err(TreeError::Name("is taken by a sibling"));
        }
        // Children are counted before they hold the parent open, and stop holding it before
        // they are uncounted, so `reservations` (open less children) never counts a child.
        if let Some(p) = &parent {
            p.children.fetch_add(1, Ordering::AcqRel);
            if !p.hold_open() {
                p.children.fetch_sub(1, Ordering::AcqRel);
                return Err(TreeError::Removed);
            }
        }
        let path = match &parent {
            Some(p) => format!("{}/{name}", p.path),
            None => name.to_owned(),
        };
        let node = Arc::new(ScopeNode {
            id: ScopeId(self.next.fetch_add(1, Ordering::Relaxed)),
            path,
            name: name.to_owned(),
            parent,
            tree: self.id,
            shared: std::sync::Arc::clone(&self.shared),
            headroom: Headroom::new(limit),
            usage: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            rejections: AtomicU64::new(0),
            open: AtomicU64::new(0),
            children: AtomicU64::new(0),
            level: AtomicU8::new(PressureLevel::Normal as u8),
            transitions: AtomicU64::new(0),
        });
        live.push(Arc::clone(&node));
        Ok(Scope { node })
    }

    pub(crate) fn remove(&self, scope: &Scope) -> std::result::Result<(), TreeError> {
        if !self.owns(scope) {
            return Err(TreeError::Foreign);
        }
        let n = &scope.node;
        let mut live = lock(&self.live);
        match n
            .open
            .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {}
            Err(seen) if seen & CLOSED != 0 => return Err(TreeError::Removed),
            Err(_) => {
                return Err(TreeError::InUse(
                    n.reservations(),
                    n.usage(),
                    n.children.load(Ordering::Relaxed),
                ));
            }
        }
        live.retain(|l| l.id != n.id);
        if let Some(p) = &n.parent {
            p.let_close();
            p.children.fetch_sub(1, Ordering::AcqRel);
        }
        Ok(())
    }

    /// Sets `scope`'s limit; returns the old one.
    pub(crate) fn set_limit(
        &self,
        scope: &Scope,
        limit: u64,
        max_limit: u64,
    ) -> std::result::Result<u64, TreeError> {
        if !self.owns(scope) {
            return Err(TreeError::Foreign);
        }
        if limit > max_limit {
            return Err(TreeError::Limit);
        }
        let _serial = lock(&self.live);
        let n = &scope.node;
        if n.is_removed() {
            return Err(TreeError::Removed);
        }
        // The word may go negative: usage above the new limit is kept and refuses until it
        // falls.
        Ok(n.headroom.set_limit(limit))
    }

    /// Every live scope, in creation order.
    pub(crate) fn live(&self) -> Vec<Arc<ScopeNode>> {
        lock(&self.live).clone()
    }

    /// The live scope that `pick` chooses, if any.
    pub(crate) fn find(&self, pick: impl Fn(&ScopeNode) -> bool) -> Option<Scope> {
        lock(&self.live).iter().find(|n| pick(n)).map(|n| Scope {
            node: Arc::clone(n),
        })
    }
}
