//! Loom models of nodedb-mem's lock-free accounting live in `tests/`. They only compile their
//! models when built with `RUSTFLAGS="--cfg nodedb_mem_loom"`; see `docs/testing.md`.

/// Runs `f` under loom, through every interleaving up to `LOOM_MAX_PREEMPTIONS` preemptions
/// (2 where the variable is not set: what CI runs).
#[cfg(nodedb_mem_loom)]
pub fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    builder.check(f);
}
