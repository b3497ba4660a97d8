#!/usr/bin/env bash
# Heap allocations per frame of every benchmarked layer case, counted by valgrind (the crate forbids
# unsafe code, so no counting global allocator). For each case, runs one request of N1 and of N2 frames
# and prints (allocs(N2) - allocs(N1)) / (N2 - N1): 0.000 means the per-frame path allocates nothing.
# A control wrapper that allocates once per frame is measured first and must read 1.000.
#
#   benches/layers/alloc_probe.sh            # every case
#   benches/layers/alloc_probe.sh flush cancel
#
# Needs valgrind. Builds the bench binary (bench profile) if needed.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/../.."
N1=${N1:-1000}
N2=${N2:-5000}
command -v valgrind >/dev/null || { echo "valgrind is required (apt-get install valgrind)" >&2; exit 2; }
bin=$(cargo bench --bench layers --no-run --message-format=json 2>/dev/null \
    | jq -r 'select(.reason == "compiler-artifact" and .target.name == "layers" and .executable != null) | .executable' \
    | tail -n 1)
[ -x "$bin" ] || { echo "could not build the layers bench binary" >&2; exit 2; }
unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
if [ $# -gt 0 ]; then cases=("$@"); else mapfile -t cases < <(STREAMGATE_ALLOC_PROBE=list "$bin"); fi
log=$(mktemp)
out=$(mktemp)
trap 'rm -f "$log" "$out"' EXIT
allocs() { # case frames -> total allocations of the whole run
    if ! STREAMGATE_ALLOC_PROBE="$1:$2" valgrind --tool=memcheck --leak-check=no --log-file="$log" "$bin" >"$out" 2>&1; then
        echo "probe $1:$2 failed:" >&2; cat "$out" >&2; exit 1
    fi
    sed -n 's/.*total heap usage: \([0-9,]*\) allocs.*/\1/p' "$log" | tr -d ,
}
per_frame() { # case -> "allocs@N1 allocs@N2 allocs/frame"
    local a1 a2
    a1=$(allocs "$1" "$N1")
    a2=$(allocs "$1" "$N2")
    echo "$a1 $a2 $(echo "scale=3; ($a2 - $a1) / ($N2 - $N1)" | bc -l)"
}
control=control_one_alloc_per_frame
r=$(per_frame "$control")
read -r c1 c2 cpf <<<"$r"
if [ "$(echo "$cpf >= 0.99 && $cpf <= 1.01" | bc -l)" != 1 ]; then
    echo "the control case reads $cpf allocations per frame, not 1: the counting is broken" >&2
    exit 1
fi
printf '%-34s %12s %12s %14s\n' case "allocs@$N1" "allocs@$N2" "allocs/frame"
printf '%-34s %12d %12d %14.3f\n' "$control" "$c1" "$c2" "$cpf"
for c in "${cases[@]}"; do
    r=$(per_frame "$c")
    read -r a1 a2 pf <<<"$r"
    printf '%-34s %12d %12d %14.3f\n' "$c" "$a1" "$a2" "$pf"
done
