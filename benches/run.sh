#!/usr/bin/env bash
# The benchmark, against the production (static, release) agentd.
#
#   benches/run.sh            full sizes, median of 3 runs, table to BENCHMARKS.md's
#                             "Latest run" section and to stdout
#   benches/run.sh --quick    small sizes, one run, stdout only (what CI runs)
#
# Numbers are never asserted: the machine is shared and noisy. Each measure
# is a ratio against a native baseline taken in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
[ "${1:-}" = "--quick" ] && quick=1

target=x86_64-unknown-linux-gnu
static=target/static/$target/release/agentd
echo "building the static agentd ($static)" >&2
RUSTFLAGS='-C target-feature=+crt-static' cargo build -q --release \
    --target "$target" --target-dir target/static --bin agentd

machine() {
    printf -- '- %s cores, %s\n' "$(nproc)" "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    printf -- '- kernel %s\n' "$(uname -r)"
    printf -- '- %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
}

if [ $quick = 1 ]; then
    cargo bench -q --bench agent -- --quick --runs 1 --agent "$static" --static "$static"
    exit 0
fi

table=$(cargo bench -q --bench agent -- --runs 3 --agent "$static" --static "$static")
report=$(printf '%s\n\n%s\n' "$(machine)" "$table")
printf '%s\n' "$report"
if [ -f BENCHMARKS.md ]; then
    # Replace everything after the "## Latest run" heading.
    awk '/^## Latest run/{print; exit} {print}' BENCHMARKS.md > BENCHMARKS.md.new
    printf '\n%s\n' "$report" >> BENCHMARKS.md.new
    mv BENCHMARKS.md.new BENCHMARKS.md
fi
