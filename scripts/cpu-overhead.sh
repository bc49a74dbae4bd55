#!/usr/bin/env bash
# CPU time per unit of work (user + system, the whole process) for each engine of the main job
# alone, at a ceiling where nothing spills, with the governor and on plain jemalloc
# (--no-governor), runs alternated so the machine's drift touches both alike.
#
#   bash scripts/cpu-overhead.sh [runs per side, default 3] [seconds per run, default 15] [engines]
#
# engines: a space-separated subset of "vector timeseries query" (default all three).
#
# With CPU_OVERHEAD_OF=profiling the two sides are the governor with heap profiling at its
# default interval and the governor with profiling off (--heap-profile-interval 0).
#
# Prints one line per run and the median of each side per engine with their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
secs="${2:-15}"
engines="${3:-vector timeseries query}"
# The release binary, a scratch directory and the settings of an engine alone.
source scripts/engine-alone.sh

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

for engine in $engines; do
    : >"$out/$engine.on"
    : >"$out/$engine.off"
    for ((i = 1; i <= runs; i++)); do
        for side in on off; do
            flags=()
            if [[ $side == off ]]; then
                if [[ ${CPU_OVERHEAD_OF:-governor} == profiling ]]; then
                    flags=(--heap-profile-interval 0)
                else
                    flags=(--no-governor)
                fi
            fi
            "$bin" "${common[@]}" --engines "$engine" "${flags[@]}" --out "$out/run" >"$out/log" 2>&1 || {
                echo "run failed ($engine, governor $side):"
                tail -20 "$out/log"
                exit 1
            }
            ns=$(sed -n 's/.*"cpu_ns_per_unit": *\([0-9.e+-]*\).*/\1/p' "$out/run/report.json")
            echo "$ns" >>"$out/$engine.$side"
            echo "$engine run $i governor $side: $ns ns per unit"
        done
    done
    on=$(median <"$out/$engine.on")
    off=$(median <"$out/$engine.off")
    awk -v e="$engine" -v a="$on" -v b="$off" \
        -v of="${CPU_OVERHEAD_OF:-governor}" \
        'BEGIN { printf "%s (%s on/off): median %.1f ns per unit on, %.1f off, ratio %.3f\n", e, of, a, b, a / b }' |
        tee -a "$out/summary"
done
echo
cat "$out/summary"
