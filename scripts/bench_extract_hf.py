#!/usr/bin/env python3
"""transformers' side of the extraction benchmark (scripts/bench_extract.sh).

Reads the samples of a chunk that `specforge-rs extract` wrote (so both sides forward exactly the
same token ids), forms the same forward batches (inside each shard: longest first, ties by
dataset order, packed while rows * longest <= batch_tokens and rows <= max_batch_size; right
padding with the config's pad id), runs `model.model(..., output_hidden_states=True)`, keeps
hidden_states[k] for the aux ids plus the post-norm last hidden, casts them to bf16 and copies the
real tokens out, and reports the forward time. Also checks our features against transformers'
(max relative error, bf16).
Prints one JSON line.
Run: python bench_extract_hf.py CHUNK_DIR MODEL_DIR BATCH_TOKENS MAX_BATCH_SIZE
"""
import json
import pathlib
import sys
import time

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def batches(lengths, batch_tokens, max_bs):
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out, cur, longest = [], [], 0
    for i in order:
        t = max(longest, lengths[i])
        if cur and ((len(cur) + 1) * t > batch_tokens or len(cur) >= max_bs):
            out.append(cur)
            cur, longest = [], 0
        longest = max(longest, lengths[i])
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def main(chunk, model_dir, batch_tokens, max_bs):
    chunk = pathlib.Path(chunk)
    man = json.loads((chunk / "manifest.json").read_text())
    aux_ids = man["aux_layer_ids"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad = model.config.pad_token_id or 0
    tokens, fwd, worst = 0, 0.0, 0.0
    wall = time.perf_counter()
    for entry in man["shards"]:
        shard = load_file(str(chunk / entry["file"]))
        off = shard["offsets"].tolist()
        ids = [shard["input_ids"][off[s]:off[s + 1]] for s in range(len(off) - 1)]
        lengths = [len(x) for x in ids]
        for batch in batches(lengths, batch_tokens, max_bs):
            t = max(lengths[i] for i in batch)
            x = torch.full((len(batch), t), pad, dtype=torch.long)
            m = torch.zeros((len(batch), t), dtype=torch.long)
            for r, i in enumerate(batch):
                x[r, :lengths[i]] = ids[i]
                m[r, :lengths[i]] = 1
            t0 = time.perf_counter()
            with torch.inference_mode():
                o = model.model(input_ids=x, attention_mask=m, output_hidden_states=True)
                aux = torch.cat([o.hidden_states[k] for k in aux_ids], -1).to(torch.bfloat16)
                last = o.last_hidden_state.to(torch.bfloat16)
                rows = [(aux[r, :lengths[i]].clone(), last[r, :lengths[i]].clone()) for r, i in enumerate(batch)]
            fwd += time.perf_counter() - t0
            tokens += sum(lengths[i] for i in batch)
            for (a, l), i in zip(rows, batch):
                ours = shard["last_hidden"][off[i]:off[i + 1]].float()
                worst = max(worst, ((ours - l.float()).abs().max() / l.float().abs().max()).item())
    wall = time.perf_counter() - wall
    print(json.dumps({"bench": "extract-transformers", "tokens": tokens, "forward_secs": fwd,
                      "forward_tokens_per_s": tokens / fwd, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "max_rel_err_last_hidden_vs_ours": worst}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
