#!/usr/bin/env bash
# CPU benchmarks run side by side with their PyTorch references in one invocation, alternating
# round by round so both see the same machine load; prints every machine-readable line and the
# median ratios recorded in docs/benchmarks.md. ROUNDS (default 3) sets the number of rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
BIN=target/release/specforge-rs
DIR=.cache/smollm2-135m-instruct
ROUNDS=${ROUNDS:-3}
cargo build --release -q
cargo build --release --example bench_target -q
BT=$(mktemp -d)
trap 'rm -rf "$BT"' EXIT
$PY tests/reference/bench_ttt.py make "$BT" >/dev/null

ratio() { # median of ours/theirs over the collected pairs
    python3 -c 'import sys,statistics; p=[tuple(map(float,l.split())) for l in sys.stdin if l.strip()]; r=[a/b for a,b in p]; print(f"median ratio {statistics.median(r):.2f} (min {min(r):.2f}, max {max(r):.2f}, {len(r)} rounds)")'
}
tps() { sed -n 's/.*tokens_per_s=\([0-9.]*\).*/\1/p'; }

echo "== target forward, SmolLM2-135M f32, batch 1 x 512 tokens, aux capture [2,15,27]"
pairs=""
for _ in $(seq "$ROUNDS"); do
    a=$(target/release/examples/bench_target "$DIR" 1 512 5); echo "$a"
    b=$($PY tests/reference/bench_target.py "$DIR" 1 512 5 2>/dev/null | grep '^bench_target'); echo "$b"
    pairs+="$(echo "$a" | tps) $(echo "$b" | tps)"$'\n'
done
echo -n "bench_target: specforge-rs / transformers: "; echo -n "$pairs" | ratio

echo "== TTT-7 training step (forward + backward), SmolLM2-sized EAGLE-3.1 head, Vd 8192, 4 x 512 tokens"
pairs=""; dpairs=""
for _ in $(seq "$ROUNDS"); do
    a=$($BIN train-step --draft "$BT/draft" --target "$BT/target" --features "$BT/features" --ttt 7 --json "$BT/step.json" --repeat 2 | grep '^bench_ttt'); echo "$a"
    b=$($PY tests/reference/bench_ttt.py time --dir "$BT" --ttt 7 --repeat 2 --attention cachelist); echo "$b"
    c=$($PY tests/reference/bench_ttt.py time --dir "$BT" --ttt 7 --repeat 2 --attention dense); echo "$c"
    pairs+="$(echo "$a" | tps) $(echo "$b" | tps)"$'\n'
    dpairs+="$(echo "$a" | tps) $(echo "$c" | tps)"$'\n'
done
echo -n "bench_ttt: specforge-rs / PyTorch (SpecForge's cache-list attention): "; echo -n "$pairs" | ratio
echo -n "bench_ttt: specforge-rs / PyTorch (dense-mask attention): "; echo -n "$dpairs" | ratio
