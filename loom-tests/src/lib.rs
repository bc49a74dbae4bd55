//! Loom models of nodedb-mem's lock-free accounting live in `tests/`. They only compile their
//! models when built with `RUSTFLAGS="--cfg nodedb_mem_loom"`; see `docs/testing.md`.
