#!/usr/bin/env bash
# The demo on the embedded default target (SmolLM2-135M-Instruct, CPU): the whole pipeline from
# recipes/smollm2-135m.toml. SmolLM2 answers the training prompts itself, a draft vocabulary is
# counted, an EAGLE-3.1 head trains on rolling chunks of its features (extract, train, delete),
# is exported for vLLM / SGLang with a model card, and its acceptance length on the held-out
# prompts of data/prompts.jsonl is measured against an untrained head's. A rerun resumes; to start
# over, delete the run directory.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/specforge-rs
OUT=${DEMO_OUT:-runs/demo}
start=$(date +%s)
"$BIN" run recipes/smollm2-135m.toml --out "$OUT"
echo "demo: done in $(( $(date +%s) - start )) s; the head: $OUT/export (model card $OUT/export/README.md), the report: $OUT/summary.json"
