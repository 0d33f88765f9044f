#!/usr/bin/env python3
"""transformers' side of the target-forward benchmark: same model, same ids, same aux capture.
Usage: bench_target.py DIR BATCH SEQ ITERS; prints `bench_target impl=transformers ... tokens_per_s=X`."""
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main(d, b, t, iters):
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    v = model.config.vocab_size
    ids = (torch.arange(b * t) * 7919 + 13) % v
    ids = ids.view(b, t)
    run = lambda: model.model(input_ids=ids, output_hidden_states=True)  # backbone + all hidden states, no logits
    with torch.no_grad():
        run()
        start = time.perf_counter()
        for _ in range(iters):
            o = run()
            o.last_hidden_state.sum().item()
        secs = time.perf_counter() - start
    print(f"bench_target impl=transformers batch={b} seq={t} iters={iters} threads={torch.get_num_threads()} tokens_per_s={b * t * iters / secs:.1f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
