# Sourced by cpu-overhead.sh and profiling-share.sh, with `secs` set: builds the release
# validation binary (`bin`), makes a scratch directory removed at exit (`out`), and gives the
# settings under which each engine runs alone with room for everything — no budget refuses,
# nothing spills or overflows (`common`, to which the caller adds `--engines`).
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -p nodedb-mem-validation --locked
bin="$target_dir/release/nodedb-mem-validation"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
common=(--ceiling 8GiB --vector-budget 1536MiB --timeseries-budget 1536MiB --query-budget 2560MiB
    --expect-spill false --documents 0 --duration "$secs")
