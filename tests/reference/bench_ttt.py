#!/usr/bin/env python3
"""Training-step benchmark, PyTorch side: the independent TTT step of ttt_reference.py timed on a
SmolLM2-sized head, beside `specforge-rs train-step --repeat` on the same files (scripts/bench.sh).

  bench_ttt.py make OUT [--hidden 576 --heads 9 --kv-heads 3 --head-dim 64 --inter 1536
                         --vocab 49152 --draft-vocab 8192 --samples 4 --len 512]
  bench_ttt.py time --dir OUT --ttt 7 --repeat 3
Prints `bench_ttt impl=pytorch ... tokens_per_s=X` (forward + backward of one TTT step).
"""
import argparse
import json
import pathlib
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import ttt_reference as R  # noqa: E402


def make(a):
    out = pathlib.Path(a.out)
    R.H, R.V, R.VD, R.NH, R.NKV, R.HD, R.INTER = a.hidden, a.vocab, a.draft_vocab, a.heads, a.kv_heads, a.head_dim, a.inter
    g = torch.Generator().manual_seed(0)
    draft = R.random_draft(g, True)
    (out / "draft").mkdir(parents=True, exist_ok=True)
    (out / "draft" / "config.json").write_text(json.dumps(R.draft_config(True), indent=2))
    save_file(draft, str(out / "draft" / "model.safetensors"))
    # The target: only its embedding and lm_head are read by a training step.
    tcfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": a.vocab, "hidden_size": a.hidden,
            "intermediate_size": a.inter, "num_hidden_layers": 4, "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads, "head_dim": a.head_dim, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "tie_word_embeddings": False}
    (out / "target").mkdir(parents=True, exist_ok=True)
    text = json.dumps(tcfg, indent=2)
    (out / "target" / "config.json").write_text(text)
    save_file({"model.embed_tokens.weight": torch.randn(a.vocab, a.hidden, generator=g),
               "lm_head.weight": torch.randn(a.vocab, a.hidden, generator=g) * 0.1}, str(out / "target" / "model.safetensors"))
    samples = [dict(input_ids=torch.randint(0, a.vocab, (a.len,), generator=g),
                    loss_mask=R.random_loss_mask(a.len, g),
                    aux=torch.randn(a.len, 3 * a.hidden, generator=g).to(torch.bfloat16),
                    last_hidden=torch.randn(a.len, a.hidden, generator=g).to(torch.bfloat16)) for _ in range(a.samples)]
    R.write_chunk(out / "features", samples, a.hidden, [1, 2, 3], text, sample_index=list(range(a.samples)))


def timing(a):
    d = pathlib.Path(a.dir)
    cfg, P, t2d, _ = R.load_draft(d / "draft", torch.float32)
    embed, lm_head = R.load_target_head(d / "target", torch.float32)
    _, samples = R.load_features(d / "features")
    batch = R.collate(samples, torch.float32)
    tokens = sum(batch["lengths"])
    # dense: one (k+1)T-wide masked softmax; cachelist: SpecForge's formulation (causal scores
    # against step 0's keys plus one diagonal score per earlier step, one softmax).
    attention = {"dense": R.ttt_attention_dense, "cachelist": R.ttt_attention_cachelist}[a.attention]

    def once():
        for p in P.values():
            p.grad = None
        loss, _, _ = R.ttt_step(P, cfg, t2d, embed, lm_head, batch, a.ttt, 0.8, attention)
        loss.backward()

    once()  # warm-up
    start = time.perf_counter()
    for _ in range(a.repeat):
        once()
    secs = (time.perf_counter() - start) / a.repeat
    print(f"bench_ttt impl=pytorch-{a.attention} ttt={a.ttt} tokens={tokens} threads={torch.get_num_threads()} "
          f"step_s={secs:.3f} tokens_per_s={tokens / secs:.1f}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out")
    for k, v in dict(hidden=576, heads=9, kv_heads=3, head_dim=64, inter=1536, vocab=49152, draft_vocab=8192,
                     samples=4, len=512).items():
        m.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    t = sub.add_parser("time")
    t.add_argument("--dir", required=True)
    t.add_argument("--ttt", type=int, default=7)
    t.add_argument("--repeat", type=int, default=3)
    t.add_argument("--attention", choices=["dense", "cachelist"], default="cachelist")
    a = ap.parse_args()
    make(a) if a.cmd == "make" else timing(a)


if __name__ == "__main__":
    main()
