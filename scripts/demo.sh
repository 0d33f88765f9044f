#!/usr/bin/env bash
# The demo on the embedded default target (SmolLM2-135M-Instruct, CPU). It grows with the pipeline.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/specforge-rs
echo "== SmolLM2-135M-Instruct answers the bundled prompts (greedy, KV cache, batched)"
"$BIN" generate --target smollm2-135m --prompts data/prompts.jsonl --limit 8 --max-new-tokens 48 --batch-size 8
