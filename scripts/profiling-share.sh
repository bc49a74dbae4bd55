#!/usr/bin/env bash
# The share of the process's CPU time that heap-profile sampling takes, for each engine of the
# main job alone at the default sampling interval, found by `perf record` (CPU-clock samples,
# no hardware counters needed) rather than by comparing two runs' totals, which move by several
# percent from run to run on a small VM.
#
#   bash scripts/profiling-share.sh [seconds per run, default 10] [engines]
#
# engines: a space-separated subset of "vector timeseries query" (default all three).
#
# Counted as sampling: the unwinder (libgcc_s, `_dl_find_object`), the stack walk
# (`backtrace::backtrace`), the sampler's clock, tables and the move of a chosen block
# (`nodedb_mem_alloc::{profile, thread::sampling, route::sample}`). Reported apart: resolving
# symbols (`gimli`, `addr2line`, `backtrace::symbolize`), which the validation binary does
# after its run is measured, and the validation binary's own scans of the sampler's table
# (`profile::table::collect`) at each engine's new high. Needs `perf` and a kernel that lets
# this user sample CPU clocks (`kernel.perf_event_paranoid` <= 2).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
engines="${2:-vector timeseries query}"
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
command -v perf >/dev/null || { echo "perf is not installed" >&2; exit 1; }
cargo build --release -p nodedb-mem-validation --locked
bin="$target_dir/release/nodedb-mem-validation"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
common=(--ceiling 8GiB --vector-budget 1536MiB --timeseries-budget 1536MiB --query-budget 2560MiB
    --expect-spill false --documents 0 --duration "$secs")

for engine in $engines; do
    perf record -q -F 499 -o "$out/perf.data" -- "$bin" "${common[@]}" --engines "$engine" \
        --out "$out/run" >/dev/null 2>"$out/record.log"
    perf report -i "$out/perf.data" --no-children --sort dso,symbol --stdio 2>/dev/null |
        awk -v engine="$engine" '
            /^#/ || NF < 3 { next }
            {
                pct = $1; sub(/%/, "", pct); total += pct
                line = $0
                if (line ~ /nodedb_mem_alloc::profile::table::collect/) { scan += pct }
                else if (line ~ /gimli::|addr2line::|backtrace::symbolize/) { resolve += pct }
                else if (line ~ /libgcc_s|_dl_find_object|backtrace::backtrace|nodedb_mem_alloc::profile::|nodedb_mem_alloc::thread::sampling|nodedb_mem_alloc::route::sample/) { sampling += pct }
            }
            END {
                printf "%s: sampling %.2f %% of CPU samples; resolving after the run %.2f %%; peak scans %.2f %% (of %.1f %% seen)\n",
                    engine, sampling, resolve, scan, total
            }'
done
