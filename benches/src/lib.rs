//! Criterion benchmarks of nodedb-mem live in `benches/`; run them with
//! `cargo bench -p nodedb-mem-benches`. Results are recorded in `docs/benchmarks.md`.
