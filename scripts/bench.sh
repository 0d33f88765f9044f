#!/usr/bin/env bash
# Benchmarks, each run side by side with its reference in one invocation; prints machine-readable
# lines and the ratios recorded in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DIR=.cache/smollm2-135m-instruct
cargo build --release --example bench_target -q
for shape in "1 512" "4 256"; do
    set -- $shape
    ours=$(target/release/examples/bench_target "$DIR" "$1" "$2" 5)
    theirs=$($PY tests/reference/bench_target.py "$DIR" "$1" "$2" 5 2>/dev/null | grep '^bench_target')
    echo "$ours"; echo "$theirs"
    awk -v a="$ours" -v b="$theirs" 'BEGIN { split(a, x, "tokens_per_s="); split(b, y, "tokens_per_s="); printf "bench_target ratio specforge-rs/transformers = %.2f\n", x[2] / y[2] }'
done
