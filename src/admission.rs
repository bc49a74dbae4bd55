//! Admission, the public face of the ledger: reservations (in scopes or not), direct charges,
//! and the scopes themselves.

use crate::EngineId;
use crate::config::MAX_CEILING;
use crate::error::{MemError, Result};
use crate::events::EventKind;
use crate::governor::MemoryGovernor;
use crate::ledger::{Admit, Ledger, Reservation, reserve};
use crate::pressure::PressureLevel;
use crate::scope::{Scope, ScopeId, TreeError};
use crate::size::ByteSize;

impl MemoryGovernor {
    /// Reserves `bytes` for `engine`, or refuses with a deterministic error.
    ///
    /// Admission is one compare-and-swap on the engine's headroom (`limit - usage`) and one on
    /// the global headroom (`ceiling - usage`): a reservation is admitted only if it fits both
    /// at that instant, whatever other threads do, so reservations alone can never take an
    /// engine past its limit or the process past its ceiling. If the ceiling refuses, the
    /// engine's admission is undone (a concurrent reservation of the same engine may be
    /// refused in that instant — conservative, never over-admitting).
    ///
    /// Two honest uses: hold the reservation across an allocation you are about to make and
    /// drop it once the allocator has charged the memory; or hold it for the lifetime of memory
    /// the allocator does not see (file mappings, I/O buffers, foreign allocators). Never keep
    /// a reservation for memory the allocator also charges, or the bytes count twice.
    ///
    /// Reserving zero bytes always succeeds and holds nothing. It never waits or queues; to
    /// wait for memory, see [`reserve_blocking`](Self::reserve_blocking) and
    /// [`reserve_async`](Self::reserve_async), and for database and tenant budgets,
    /// [`reserve_in`](Self::reserve_in).
    pub fn reserve(&self, engine: EngineId, bytes: u64) -> Result<Reservation> {
        reserve(&self.inner.ledger, engine, None, bytes, Admit::Commit)
    }

    /// Whether `bytes` more would be admitted for `engine` right now (its limit and the global
    /// ceiling, counting what the allocator has charged), the answer [`reserve`](Self::reserve)
    /// would give, without holding anything. Unlike a reservation taken and dropped at once,
    /// the question leaves no trace in the engine's usage or peak: for a pool that only asks
    /// and lets the allocator charge the memory when it is allocated (see
    /// `nodedb-mem-datafusion`). A refusal is counted and reported as `reserve`'s would be.
    pub fn check_admission(&self, engine: EngineId, bytes: u64) -> Result<()> {
        self.inner.ledger.admit(engine, None, bytes, Admit::Ask)
    }

    /// Charges `bytes` of live memory to `engine`, unconditionally: the global allocator's
    /// entry point, and for allocators of your own that the global allocator does not see.
    /// Usage may go above the limit this way; pressure rises and reservations are refused
    /// until it falls.
    pub fn charge(&self, engine: EngineId, bytes: u64) {
        self.inner.ledger.charge(engine, bytes);
    }

    /// Credits `bytes` of freed memory to `engine`. Crediting more than is charged is a bug in
    /// the caller: it is refused with [`MemError::OverRelease`] and changes nothing.
    pub fn credit(&self, engine: EngineId, bytes: u64) -> Result<()> {
        self.inner.ledger.credit(engine, bytes)?;
        Ledger::wake_waiters(&self.inner.ledger);
        Ok(())
    }

    /// Reserves `bytes` for `engine` in `scope`: admitted only if the engine's limit, the limit
    /// of `scope` and of every scope above it, and the ceiling all have room (see
    /// [`reserve`](Self::reserve) for the rules and honest uses). The reservation counts
    /// against every level until it is dropped, and keeps `scope` from being removed.
    ///
    /// Refusals: [`MemError::BudgetExceeded`], [`MemError::ScopeExceeded`] (naming the scope
    /// that refused, with its usage and limit) or [`MemError::CeilingExceeded`]; a removed
    /// scope gives [`MemError::ScopeRemoved`], another governor's scope
    /// [`MemError::InvalidConfig`].
    pub fn reserve_in(&self, engine: EngineId, scope: &Scope, bytes: u64) -> Result<Reservation> {
        reserve(
            &self.inner.ledger,
            engine,
            Some(scope),
            bytes,
            Admit::Commit,
        )
    }

    /// Creates a scope named `name` under `parent` (or directly under the ceiling) with
    /// `limit` bytes. Names are 1–128 bytes without `/` or control characters, unique among
    /// their siblings; a limit is at most [`MAX_CEILING`](crate::MAX_CEILING) and may exceed
    /// the parent's (the parent's limit still holds for its children together).
    pub fn create_scope(&self, name: &str, parent: Option<&Scope>, limit: u64) -> Result<Scope> {
        self.inner
            .ledger
            .scopes
            .create(name, parent, limit, MAX_CEILING)
            .map_err(|e| match (e, parent) {
                // The name refused, and where: under its parent, not the parent itself.
                (TreeError::Name(reason), Some(parent)) => MemError::config(
                    "scope name",
                    format!("{name:?} under {:?}", parent.path()),
                    reason,
                ),
                (e, _) => tree_error(e, parent.map_or(name, Scope::path), limit),
            })
    }

    /// Removes `scope`. Refused with [`MemError::ScopeInUse`] (saying how many reservations
    /// and child scopes keep it, and their bytes) while reservations made in it or scopes
    /// under it are alive; nothing changes then. To drain a scope, set its limit to 0 (new
    /// reservations are refused, live ones keep their bytes), and remove it once they are
    /// dropped. Once removed, reservations and new children through any handle on it are
    /// refused with [`MemError::ScopeRemoved`], and its name is free again.
    pub fn remove_scope(&self, scope: &Scope) -> Result<()> {
        self.inner
            .ledger
            .scopes
            .remove(scope)
            .map_err(|e| tree_error(e, scope.path(), scope.limit()))
    }

    /// Sets `scope`'s limit while reservations are live. Lowering it below the scope's usage
    /// keeps every reservation (the scope is then over its limit: its pressure rises and new
    /// reservations in it and below it are refused until usage falls). Recorded as an event.
    pub fn set_scope_limit(&self, scope: &Scope, limit: u64) -> Result<()> {
        let old = self
            .inner
            .ledger
            .scopes
            .set_limit(scope, limit, MAX_CEILING)
            .map_err(|e| tree_error(e, scope.path(), limit))?;
        self.inner.ledger.events.record_scope(
            EventKind::ScopeLimit {
                scope: scope.id(),
                from: old,
                to: limit,
                usage: scope.usage(),
            },
            scope.path(),
        );
        // Raised: waiters may fit now. Lowered: a waiter larger than the new limit is refused
        // when the queue is served, rather than holding back the requests behind it.
        if limit != old {
            Ledger::wake_waiters(&self.inner.ledger);
        }
        Ok(())
    }

    /// `scope`'s pressure level (its usage against its limit, with the engines' thresholds
    /// and hysteresis). O(1), lock-free, allocation-free; a change is recorded as an event.
    pub fn scope_pressure(&self, scope: &Scope) -> PressureLevel {
        scope.pressure()
    }

    /// The live scope at `path` (names from the root down, joined by `/`: `sales/acme`), if
    /// there is one.
    pub fn scope(&self, path: &str) -> Option<Scope> {
        self.inner.ledger.scopes.find(|n| n.path == path)
    }

    /// The live scope numbered `id`, if there is one.
    pub fn scope_by_id(&self, id: ScopeId) -> Option<Scope> {
        self.inner.ledger.scopes.find(|n| n.id == id)
    }

    /// Every live scope, in creation order.
    pub fn scopes(&self) -> Vec<Scope> {
        self.inner
            .ledger
            .scopes
            .live()
            .into_iter()
            .map(|node| Scope { node })
            .collect()
    }
}

/// The error for a scope operation refused by the tree.
fn tree_error(e: TreeError, path: &str, limit: u64) -> MemError {
    match e {
        TreeError::Name(reason) => MemError::config("scope name", format!("{path:?}"), reason),
        TreeError::Limit => MemError::config(
            "scope limit",
            ByteSize(limit),
            format!("must be at most {}", ByteSize(MAX_CEILING)),
        ),
        TreeError::Foreign => MemError::foreign_scope(path),
        TreeError::Removed => MemError::ScopeRemoved {
            scope: path.to_owned(),
        },
        TreeError::InUse(reservations, bytes, children) => MemError::ScopeInUse {
            scope: path.to_owned(),
            reservations,
            bytes,
            children,
        },
    }
}
