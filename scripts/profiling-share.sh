#!/usr/bin/env bash
# The share of the process's CPU time that heap-profile sampling takes, for each engine of the
# main job alone at the default sampling interval, found by `perf record` (CPU-clock samples
# with call chains; no hardware counters needed) rather than by comparing two runs' totals,
# which move by several percent from run to run on a small VM.
#
#   bash scripts/profiling-share.sh [seconds per run, default 15] [engines]
#
# engines: a space-separated subset of "vector timeseries query" (default all three).
#
# A CPU sample counts as sampling when its call chain passes through the sampler: the clock
# (`thread::sampling`), taking or placing a chosen block (`route::sample`), recording it with
# its stack (`profile::record`, the unwinder under it) — the kernel's page faults and zeroing
# those cause included, which a flat profile would put elsewhere. Reported apart: resolving
# symbols (`backtrace::symbolize`), which the validation binary does after its run is
# measured, and its own scans of the sampler's table at each engine's new high
# (`profile::table::collect`). Needs `perf` and python3, and a kernel that lets this user
# sample CPU clocks (`kernel.perf_event_paranoid` <= 2).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-15}"
engines="${2:-vector timeseries query}"
command -v perf >/dev/null || { echo "perf is not installed" >&2; exit 1; }
# The release binary, a scratch directory and the settings of an engine alone.
source scripts/engine-alone.sh

for engine in $engines; do
    perf record -q --call-graph dwarf,8192 -F 499 -o "$out/perf.data" -- "$bin" "${common[@]}" \
        --engines "$engine" --out "$out/run" >/dev/null 2>"$out/record.log"
    perf script -i "$out/perf.data" 2>/dev/null | ENGINE="$engine" python3 -c '
import os, re, sys
kinds = {
    "sampling": re.compile(r"nodedb_mem_alloc::(route::sample::|profile::record|thread::sampling)"),
    "resolving after the run": re.compile(r"backtrace::symbolize"),
    "peak scans": re.compile(r"nodedb_mem_alloc::(profile::table::collect|ctl::profile::live_samples)"),
}
total, hits, chain = 0, dict.fromkeys(kinds, 0), []
def flush():
    global total, chain
    if chain:
        total += 1
        for k, p in kinds.items():
            if any(p.search(l) for l in chain):
                hits[k] += 1
    chain = []
for line in sys.stdin:
    if not line.strip():
        flush()
    elif line[0] not in " \t":
        flush()
        chain = [line]
    else:
        chain.append(line)
flush()
shares = ", ".join(f"{k} {100 * v / max(total, 1):.2f} %" for k, v in hits.items())
engine = os.environ["ENGINE"]
print(f"{engine}: {total} CPU samples; {shares}")
'
done
