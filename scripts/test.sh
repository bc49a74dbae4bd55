#!/usr/bin/env bash
# Every check of the workspace, in the order a failure is cheapest to find:
# formatting, clippy (all targets, benches included, -D warnings), the tests (nextest),
# attribution under `ulimit -v` and valgrind, the doc tests, rustdoc with warnings denied, and the loom models (built with --cfg nodedb_mem_loom in their own target
# directory so the normal build cache is not invalidated).
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
step() { printf '\n==> %s\n' "$*"; }

step "rustfmt"
cargo fmt --all -- --check

step "clippy -D warnings (all targets, benches included)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests"
cargo nextest run --workspace --locked --no-fail-fast

step "attribution and an installed governor under an address-space limit (ulimit -v 8000000) and under valgrind"
cargo build -p nodedb-mem-alloc --example attribution_check --locked
cargo build -p nodedb-mem --example installed_check --locked
for check in "$target_dir/debug/examples/attribution_check" "$target_dir/debug/examples/installed_check"; do
    (ulimit -v 8000000 && "$check")
    if command -v valgrind >/dev/null; then
        # Bounded: a process that cannot finish exiting under valgrind fails the run instead of
        # holding it (about 10 s each here).
        timeout 600 valgrind --quiet "$check"
    else
        echo "valgrind not installed: skipped"
    fi
done

step "doc tests"
cargo test --workspace --doc --locked

step "rustdoc -D warnings (no broken links)"
# The validation binary has no public items to document, and documenting it would check all of
# DataFusion once more (about 3 minutes cold).
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --exclude nodedb-mem-validation --no-deps --locked

step "loom models (preemption bound ${LOOM_MAX_PREEMPTIONS:-2})"
RUSTFLAGS="--cfg nodedb_mem_loom -C debug-assertions" \
    LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-2}" \
    LOOM_MAX_BRANCHES="${LOOM_MAX_BRANCHES:-10000}" \
    CARGO_TARGET_DIR="$target_dir/loom" \
    cargo test -p nodedb-mem-loom-tests --release --locked --test ledger --test allocator --test scopes

step "all checks passed"
