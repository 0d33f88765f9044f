#!/usr/bin/env python3
"""Qwen3.5 target benchmark: our tch forward vs transformers' pure-torch path, and the chunked vs
the recurrent delta rule, side by side in one run on the same machine, model and inputs.

Builds a tiny-but-not-trivial random Qwen3.5 text model (8 layers: 6 Gated DeltaNet + 2 gated
attention, hidden 512, 8 value heads of 64), times transformers (fp32, no cache, the torch
fallbacks because fla / causal_conv1d are not installed) and then `examples/qwen35_bench.rs`
(release build) on the same checkpoint and inputs, and prints a markdown table with the ratios.

Run from the repository root:  .venv/bin/python scripts/bench_qwen35.py [--forward-t 2048]
    [--kernel-t 4096] [--repeats 5] [--rounds 3]   (OMP_NUM_THREADS=1 for one thread on both sides)
"""
import argparse
import pathlib
import statistics
import subprocess
import tempfile
import time

import torch
from safetensors.torch import save_file
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig
from transformers.models.qwen3_5 import modeling_qwen3_5 as mq

ROOT = pathlib.Path(__file__).resolve().parent.parent

CONFIG = dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
              num_attention_heads=8, num_key_value_heads=2, head_dim=64, linear_num_key_heads=4,
              linear_key_head_dim=64, linear_num_value_heads=8, linear_value_head_dim=64,
              linear_conv_kernel_dim=4, max_position_embeddings=8192, tie_word_embeddings=False,
              rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25))


def median(repeats, fn):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--forward-t", type=int, default=2048)
    ap.add_argument("--kernel-t", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    subprocess.run(["cargo", "build", "--release", "--example", "qwen35_bench"], cwd=ROOT, check=True)
    torch.manual_seed(0)
    cfg = Qwen3_5TextConfig(**CONFIG)
    model = Qwen3_5ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(0.05, 2.0, generator=g).log())
            elif "norm" in name and "linear_attn" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "conv1d" in name else 0.05) +
                        (1.0 if "linear_attn.norm" in name else 0.0))

    H, dk, dv = cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    T = args.kernel_t
    inputs = {
        "input_ids": torch.randint(0, cfg.vocab_size, (1, args.forward_t), generator=g),
        "q": torch.randn(1, T, H, dk, generator=g), "k": torch.randn(1, T, H, dk, generator=g),
        "v": torch.randn(1, T, H, dv, generator=g),
        "g": -torch.nn.functional.softplus(torch.randn(1, T, H, generator=g)),
        "beta": torch.randn(1, T, H, generator=g).sigmoid(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        model.save_pretrained(tmp / "model", safe_serialization=True)
        save_file(inputs, str(tmp / "inputs.safetensors"))
        ids = inputs["input_ids"]
        kw = dict(g=inputs["g"], beta=inputs["beta"], use_qk_l2norm_in_kernel=True)
        qkv = (inputs["q"], inputs["k"], inputs["v"])
        exe = ROOT / "target/release/examples/qwen35_bench"
        # Alternate the two implementations round by round, so that a change in machine load
        # during the run hits both alike; report per-quantity medians over the rounds.
        rounds = []
        for _ in range(args.rounds):
            hf = {}
            with torch.no_grad():
                hf["forward"] = median(args.repeats, lambda: model(input_ids=ids, use_cache=False,
                                                                    output_hidden_states=True))
                hf["chunk"] = median(args.repeats, lambda: mq.torch_chunk_gated_delta_rule(*qkv, **kw))
                hf["recurrent"] = median(min(args.repeats, 3),
                                         lambda: mq.torch_recurrent_gated_delta_rule(*qkv, **kw))
            out = subprocess.run([str(exe), str(tmp / "model"), str(args.forward_t), str(T), str(args.repeats),
                                  str(tmp / "inputs.safetensors")], check=True, capture_output=True, text=True).stdout
            ours = {k: float(v) for k, v in (line.split() for line in out.strip().splitlines())}
            rounds.append((ours, hf, open("/proc/loadavg").read().split()[0]))

    def med(side, key):
        return statistics.median(r[side][key] for r in rounds)

    def ratio(key):
        return statistics.median(r[0][key] / r[1][key] for r in rounds)

    print(f"torch threads: {torch.get_num_threads()}, forward T={args.forward_t}, kernel T={T}, "
          f"{args.rounds} alternating rounds of median-of-{args.repeats} (recurrent: {min(args.repeats, 3)}), "
          f"1-min load average after each round: {', '.join(r[2] for r in rounds)}\n")
    print("| measurement | ours (s) | transformers (s) | ours / transformers |")
    print("|---|---|---|---|")
    for key, label in [("forward", f"full forward, 8 layers, T={args.forward_t}"),
                       ("chunk", f"chunked delta rule, T={T}"), ("recurrent", f"recurrent delta rule, T={T}")]:
        print(f"| {label} | {med(0, key):.3f} | {med(1, key):.3f} | {ratio(key):.2f} |")
    rec_chunk = lambda side: statistics.median(r[side]["recurrent"] / r[side]["chunk"] for r in rounds)
    print(f"\nrecurrent / chunked: ours {rec_chunk(0):.1f}x, transformers {rec_chunk(1):.1f}x")


if __name__ == "__main__":
    main()
