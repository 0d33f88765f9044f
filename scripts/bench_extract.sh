#!/usr/bin/env bash
# Extraction throughput: `specforge-rs extract` against transformers on the same model (SmolLM2-135M,
# f32 on the CPU), the same samples (the bundled prompts answered by SmolLM2 itself) and the same
# forward batches, in the same run, alternating REPEAT times; prints each run's JSON line and a
# summary line with the medians and their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/specforge-rs}
OUT=${OUT:-target/bench-extract}
NEW=${NEW:-128}
REPEAT=${REPEAT:-3}
BT=${BATCH_TOKENS:-4096}
BS=${MAX_BATCH_SIZE:-16}
MODEL=.cache/smollm2-135m-instruct
mkdir -p "$OUT"
# On-policy data once (resumable; a rerun reuses it).
"$BIN" regenerate --target smollm2-135m --data data/prompts.jsonl --out "$OUT/regen.jsonl" \
    --max-new-tokens "$NEW" --batch-size 16 >&2
: > "$OUT/runs.jsonl"
for i in $(seq "$REPEAT"); do
    rm -rf "$OUT/feats"
    "$BIN" extract --target smollm2-135m --data "$OUT/regen.jsonl" --out "$OUT/feats" \
        --dtype f32 --batch-tokens "$BT" --max-batch-size "$BS" | grep '"bench"' | tee -a "$OUT/runs.jsonl"
    .venv/bin/python scripts/bench_extract_hf.py "$OUT/feats" "$MODEL" "$BT" "$BS" | tee -a "$OUT/runs.jsonl"
done
.venv/bin/python - "$OUT/runs.jsonl" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
ours = [r["forward_tokens_per_s"] for r in runs if r["bench"] == "extract"]
wall = [r["tokens_per_s"] for r in runs if r["bench"] == "extract"]
hf = [r["forward_tokens_per_s"] for r in runs if r["bench"] == "extract-transformers"]
err = max(r["max_rel_err_last_hidden_vs_ours"] for r in runs if r["bench"] == "extract-transformers")
print(json.dumps({"bench": "extract-vs-transformers", "tokens": runs[0]["tokens"],
                  "ours_forward_tokens_per_s": statistics.median(ours),
                  "ours_end_to_end_tokens_per_s": statistics.median(wall),
                  "transformers_forward_tokens_per_s": statistics.median(hf),
                  "ratio": statistics.median(ours) / statistics.median(hf),
                  "max_rel_err_last_hidden": err}))
PY
