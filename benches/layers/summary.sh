#!/usr/bin/env bash
# Per-frame overhead of every body_10k_frames case from the last `cargo bench --bench layers` run:
# criterion's estimate (slope, else mean: the value it prints) per 10,000 frames, the cost per frame,
# (case - baseline) / 10,000 and case / baseline. `paced_*` cases are compared with `paced_bare`, all
# others with `bare`.
#
#   cargo bench --bench layers -- --quick body_10k_frames && benches/layers/summary.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=${CRITERION_DIR:-target/criterion}/body_10k_frames
frames=10000
est() { jq '(.slope // .mean).point_estimate' "$dir/$1/new/estimates.json"; }
[ -f "$dir/bare/new/estimates.json" ] || { echo "no results in $dir: run the benchmarks first" >&2; exit 2; }
bare=$(est bare)
paced=$(est paced_bare 2>/dev/null || echo "")
printf '%-34s %12s %10s %14s %8s\n' case "µs/10k" "ns/frame" "+ns/frame" "x base"
for d in "$dir"/*/; do
    c=$(basename "$d")
    [ -f "$d/new/estimates.json" ] || continue
    t=$(est "$c")
    base=$bare
    case $c in paced_*) base=${paced:-$bare} ;; esac
    awk -v c="$c" -v t="$t" -v b="$base" -v n="$frames" \
        'BEGIN { printf "%-34s %12.1f %10.1f %14.1f %8.2f\n", c, t / 1000, t / n, (t - b) / n, t / b }'
done
