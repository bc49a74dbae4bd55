//! The policy layer's error type. Every message is built here, from the fields, so the text a
//! user sees is pinned by the tests in this module.

use std::fmt;

use crate::EngineId;
use crate::size::{ByteSize, SizeError};

/// The result type of the policy layer.
pub type Result<T, E = MemError> = std::result::Result<T, E>;

/// What went wrong, with the numbers that explain it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemError {
    /// A reservation did not fit the engine's current limit.
    #[error(
        "cannot reserve {} for engine {engine}: {} already used of its {} limit, {} available",
        ByteSize(*requested), ByteSize(*used), ByteSize(*limit), ByteSize(*available)
    )]
    BudgetExceeded {
        /// The engine asked for memory.
        engine: EngineId,
        /// Bytes asked for.
        requested: u64,
        /// The engine's usage (live bytes + outstanding reservations) when it was refused.
        used: u64,
        /// The engine's limit when it was refused.
        limit: u64,
        /// `limit - used`, or zero when usage is already above the limit.
        available: u64,
    },
    /// A reservation fit the engine's limit but not the process-wide ceiling.
    #[error(
        "cannot reserve {} for engine {engine}: the process already uses {} of its {} global ceiling, {} available",
        ByteSize(*requested), ByteSize(*used), ByteSize(*ceiling), ByteSize(*available)
    )]
    CeilingExceeded {
        /// The engine asked for memory.
        engine: EngineId,
        /// Bytes asked for.
        requested: u64,
        /// The process's governed usage when it was refused.
        used: u64,
        /// The global ceiling.
        ceiling: u64,
        /// `ceiling - used`, or zero when usage is already above the ceiling.
        available: u64,
    },
    /// A scoped reservation fit the engine's limit but not the limit of a scope on its path
    /// (the scope named, or one above it).
    #[error(
        "cannot reserve {} for engine {engine} in scope {scope}: {} already used of its {} limit, {} available",
        ByteSize(*requested), ByteSize(*used), ByteSize(*limit), ByteSize(*available)
    )]
    ScopeExceeded {
        /// The path of the scope that refused (`sales/acme`).
        scope: String,
        /// The engine asked for memory.
        engine: EngineId,
        /// Bytes asked for.
        requested: u64,
        /// The scope's usage (its reservations and those below it) when it refused.
        used: u64,
        /// The scope's limit when it refused.
        limit: u64,
        /// `limit - used`, or zero when usage is already above the limit.
        available: u64,
    },
    /// `remove_scope` found reservations or child scopes alive in the scope; nothing changed.
    #[error(
        "cannot remove scope {scope}: {reservations} reservation(s) holding {} and {children} child scope(s) are alive in it; drop them first (a limit of 0 refuses new reservations meanwhile)",
        ByteSize(*bytes)
    )]
    ScopeInUse {
        /// The scope's path.
        scope: String,
        /// Live reservations made in it.
        reservations: u64,
        /// Bytes reserved in it and below it.
        bytes: u64,
        /// Live child scopes.
        children: u64,
    },
    /// The scope was removed: nothing can be reserved in it, created under it or changed.
    #[error("scope {scope} was removed")]
    ScopeRemoved {
        /// The scope's path.
        scope: String,
    },
    /// A waiting request reached its deadline behind earlier requests still waiting at a limit
    /// on its path: it was not tried, so that it could not take memory they wait for (first
    /// come first served holds at deadlines too).
    #[error(
        "{ahead} earlier request(s), waiting for {} at {limit}, were ahead of this one for \
         engine {engine}",
        ByteSize(*ahead_bytes)
    )]
    QueuedBehind {
        /// The engine the request was for.
        engine: EngineId,
        /// The limit the earlier requests wait at (one on this request's path).
        limit: Limit,
        /// Requests ahead of it still waiting at that limit.
        ahead: u64,
        /// The bytes they wait for.
        ahead_bytes: u64,
    },
    /// A waiting request larger than a limit on its path: no release can admit it while that
    /// limit stands, so it is refused at once rather than held in the queue, where it would
    /// hold back the requests behind it until its deadline (and a waiting request is refused
    /// so when a limit is lowered under it).
    #[error(
        "{} for engine {engine} can never be reserved while {limit} is {}",
        ByteSize(*requested), ByteSize(*max)
    )]
    NeverFits {
        /// The engine asked for memory.
        engine: EngineId,
        /// Bytes asked for.
        requested: u64,
        /// The limit it is larger than.
        limit: Limit,
        /// That limit's value.
        max: u64,
    },
    /// A waiting reservation's time ran out; `refusal` is what admission answered at the
    /// deadline (a [`BudgetExceeded`](MemError::BudgetExceeded),
    /// [`ScopeExceeded`](MemError::ScopeExceeded) or
    /// [`CeilingExceeded`](MemError::CeilingExceeded)), or
    /// [`QueuedBehind`](MemError::QueuedBehind) where earlier requests still waited.
    #[error("waited {} ms for memory: {refusal}", waited.as_millis())]
    WaitTimedOut {
        /// How long the request waited.
        waited: std::time::Duration,
        /// The refusal at the deadline.
        refusal: Box<MemError>,
    },
    /// A release or free of more bytes than the engine was charged: an accounting bug in the
    /// caller. Nothing was changed.
    #[error(
        "engine {engine}: cannot release {}, only {} is charged to it",
        ByteSize(*requested), ByteSize(*charged)
    )]
    OverRelease {
        /// The engine whose ledger was asked to give back bytes.
        engine: EngineId,
        /// Bytes asked to release.
        requested: u64,
        /// Bytes that were charged at the time.
        charged: u64,
    },
    /// `shrink` or `split` asked for more than the reservation holds.
    #[error(
        "cannot take {} from a reservation of {} for engine {engine}",
        ByteSize(*requested), ByteSize(*reserved)
    )]
    ReservationTooSmall {
        /// The reservation's engine.
        engine: EngineId,
        /// Bytes asked for.
        requested: u64,
        /// Bytes the reservation holds.
        reserved: u64,
    },
    /// The per-engine budgets do not fit under the global ceiling.
    #[error("the engine budgets total {}, above the global ceiling of {}", ByteSize(*total), ByteSize(*ceiling))]
    BudgetsExceedCeiling {
        /// Sum of the engine budgets.
        total: u64,
        /// The global ceiling.
        ceiling: u64,
    },
    /// A configuration value is out of range or inconsistent with another one.
    #[error("invalid configuration `{field}` = {value}: {reason}")]
    InvalidConfig {
        /// The setting, e.g. `floor.query` or `thresholds.warning`.
        field: String,
        /// The value it was given, as a person would write it.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A size string (from the environment or a configuration file) could not be parsed.
    #[error("invalid size for `{field}`: {input:?}: {reason}")]
    InvalidSize {
        /// Where the string came from, e.g. `NODEDB_MEMORY_LIMIT`.
        field: String,
        /// The string as given.
        input: String,
        /// Why it was refused.
        reason: SizeError,
    },
    /// `install` was called a second time in this process.
    #[error("a memory governor is already installed in this process")]
    AlreadyInstalled,
    /// `install` found that `GovernedAlloc` is not the process's global allocator, so no heap
    /// allocation would be attributed or limited.
    #[error(
        "GovernedAlloc is not the global allocator: declare `#[global_allocator] static ALLOC: nodedb_mem::GovernedAlloc = nodedb_mem::GovernedAlloc::new();`"
    )]
    AllocatorNotGlobal,
    /// `install` found that the engine arenas could not be created, so every allocation would
    /// be served unattributed and no engine's heap would be limited.
    #[error(
        "the engine arenas could not be created: {0}; every allocation would be unattributed. \
         Raise the limit, set NODEDB_MEM_RANGE_BYTES to a size the process can reserve (eleven \
         ranges of it), or call GovernorBuilder::allow_unattributed(true) to run without \
         attribution"
    )]
    ArenasUnavailable(nodedb_mem_alloc::ctl::arenas::ArenaFailure),
    /// The overflow regions could not be set up.
    #[error("overflow: {0}")]
    Overflow(#[from] nodedb_mem_alloc::ctl::overflow::OverflowError),
    /// An operating-system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A limit admission checks, as named by [`MemError::QueuedBehind`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Limit {
    /// An engine's budget (its current limit).
    Budget(EngineId),
    /// An engine's cap: the most rebalancing can lend it.
    Cap(EngineId),
    /// A scope's limit; the scope's path.
    Scope(String),
    /// The global ceiling.
    Ceiling,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Budget(e) => write!(f, "engine {e}'s limit"),
            Limit::Cap(e) => write!(f, "engine {e}'s cap"),
            Limit::Scope(path) => write!(f, "scope {path}'s limit"),
            Limit::Ceiling => f.write_str("the ceiling"),
        }
    }
}

impl MemError {
    pub(crate) fn budget_exceeded(engine: EngineId, requested: u64, used: u64, limit: u64) -> Self {
        MemError::BudgetExceeded {
            engine,
            requested,
            used,
            limit,
            available: limit.saturating_sub(used),
        }
    }

    pub(crate) fn ceiling_exceeded(
        engine: EngineId,
        requested: u64,
        used: u64,
        ceiling: u64,
    ) -> Self {
        MemError::CeilingExceeded {
            engine,
            requested,
            used,
            ceiling,
            available: ceiling.saturating_sub(used),
        }
    }

    pub(crate) fn scope_exceeded(
        scope: &str,
        engine: EngineId,
        requested: u64,
        used: u64,
        limit: u64,
    ) -> Self {
        MemError::ScopeExceeded {
            scope: scope.to_owned(),
            engine,
            requested,
            used,
            limit,
            available: limit.saturating_sub(used),
        }
    }

    /// A scope handle from another governor, passed to this one.
    pub(crate) fn foreign_scope(path: &str) -> Self {
        MemError::config("scope", path, "belongs to another governor")
    }

    pub(crate) fn config(
        field: impl Into<String>,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        MemError::InvalidConfig {
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// True for the admission refusals ([`MemError::BudgetExceeded`],
    /// [`MemError::ScopeExceeded`], [`MemError::CeilingExceeded`],
    /// [`MemError::QueuedBehind`], [`MemError::NeverFits`], and a
    /// [`MemError::WaitTimedOut`] that ended in one): the caller should spill or apply
    /// backpressure.
    pub fn is_over_budget(&self) -> bool {
        match self {
            MemError::BudgetExceeded { .. }
            | MemError::ScopeExceeded { .. }
            | MemError::CeilingExceeded { .. }
            | MemError::QueuedBehind { .. }
            | MemError::NeverFits { .. } => true,
            MemError::WaitTimedOut { refusal, .. } => refusal.is_over_budget(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejection_messages_name_engine_request_usage_limit_and_remainder() {
        let e = MemError::budget_exceeded(EngineId::Query, 64 << 20, 200 << 20, 256 << 20);
        assert_eq!(
            e.to_string(),
            "cannot reserve 64 MiB for engine query: 200 MiB already used of its 256 MiB limit, 56 MiB available"
        );
        assert!(e.is_over_budget());
        let e = MemError::budget_exceeded(EngineId::Vector, 1, 300, 256);
        assert_eq!(
            e.to_string(),
            "cannot reserve 1 B for engine vector: 300 B already used of its 256 B limit, 0 B available"
        );
        let e = MemError::ceiling_exceeded(EngineId::Crdt, 3 << 30, 1 << 30, 2 << 30);
        assert_eq!(
            e.to_string(),
            "cannot reserve 3 GiB for engine crdt: the process already uses 1 GiB of its 2 GiB global ceiling, 1 GiB available"
        );
        assert!(e.is_over_budget());
    }

    #[test]
    fn waiting_messages_name_the_limit() {
        let cases = [
            (Limit::Budget(EngineId::Query), "engine query's limit"),
            (Limit::Cap(EngineId::Vector), "engine vector's cap"),
            (
                Limit::Scope("sales/acme".into()),
                "scope sales/acme's limit",
            ),
            (Limit::Ceiling, "the ceiling"),
        ];
        for (limit, text) in cases {
            let e = MemError::QueuedBehind {
                engine: EngineId::Query,
                limit: limit.clone(),
                ahead: 2,
                ahead_bytes: 3 << 20,
            };
            assert_eq!(
                e.to_string(),
                format!(
                    "2 earlier request(s), waiting for 3 MiB at {text}, were ahead of this one \
                     for engine query"
                )
            );
            assert!(e.is_over_budget());
            let e = MemError::NeverFits {
                engine: EngineId::Sparse,
                requested: 5 << 20,
                limit,
                max: 4 << 20,
            };
            assert_eq!(
                e.to_string(),
                format!("5 MiB for engine sparse can never be reserved while {text} is 4 MiB")
            );
            let e = MemError::WaitTimedOut {
                waited: std::time::Duration::from_millis(12),
                refusal: Box::new(e),
            };
            assert!(e.is_over_budget());
            assert!(e.to_string().starts_with("waited 12 ms for memory: 5 MiB"));
        }
    }

    #[test]
    fn other_messages() {
        let e = MemError::OverRelease {
            engine: EngineId::Timeseries,
            requested: 2048,
            charged: 1024,
        };
        assert_eq!(
            e.to_string(),
            "engine timeseries: cannot release 2 KiB, only 1 KiB is charged to it"
        );
        assert!(!e.is_over_budget());
        let e = MemError::config("floor.query", "600 MiB", "above the cap of 500 MiB");
        assert_eq!(
            e.to_string(),
            "invalid configuration `floor.query` = 600 MiB: above the cap of 500 MiB"
        );
        let e = MemError::InvalidSize {
            field: "NODEDB_MEMORY_LIMIT".into(),
            input: "lots".into(),
            reason: SizeError::NotANumber,
        };
        assert_eq!(
            e.to_string(),
            "invalid size for `NODEDB_MEMORY_LIMIT`: \"lots\": the size does not start with a number"
        );
        let e = MemError::BudgetsExceedCeiling {
            total: 3 << 30,
            ceiling: 2 << 30,
        };
        assert_eq!(
            e.to_string(),
            "the engine budgets total 3 GiB, above the global ceiling of 2 GiB"
        );
    }
}
