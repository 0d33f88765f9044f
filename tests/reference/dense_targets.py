#!/usr/bin/env python3
"""Golden outputs of transformers' dense targets (Llama, Qwen2, Qwen3) on tiny random configs.

Every parameter is random, norm weights and biases included, so no term can hide behind a zero or
a one. Writes, per architecture, OUT/<name>/{config.json, model.safetensors, golden.safetensors}:
  input_ids [B, T], attention_mask [B, T] (right padding: unequal lengths),
  hidden_{k} [B, T, H] for k = 0..L-1 (transformers' hidden_states[k] = input of layer k),
  hidden_{L} [B, T, H] (output of the last layer before the final norm, via a forward hook),
  last_hidden [B, T, H] (post-norm, transformers' hidden_states[L]), logits [B, T, V].
Run: python dense_targets.py OUT
"""
import sys
import pathlib

import torch
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CASES = {
    # Llama with every bias on, llama3 rope scaling and tied embeddings.
    "llama": (LlamaConfig, LlamaForCausalLM, dict(
        attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64))),
    # Qwen2: q/k/v bias (hard-wired), untied lm_head, legacy rope spelling written by save_pretrained.
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False, rope_theta=1000000.0)),
    # Qwen3: q/k norm, explicit head_dim that differs from hidden / heads, tied.
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=24, tie_word_embeddings=True, rope_theta=1000000.0)),
}


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "norm" in name else 0.08) + (1.0 if "norm" in name else 0.0))


def main(out):
    out = pathlib.Path(out)
    torch.manual_seed(0)
    for i, (name, (cfg_cls, model_cls, extra)) in enumerate(CASES.items()):
        cfg = cfg_cls(**COMMON, **extra)
        model = model_cls(cfg).eval()
        randomise(model, 100 + i)
        d = out / name
        model.save_pretrained(d, safe_serialization=True)
        lengths = [13, 7, 10]
        B, T = len(lengths), max(lengths)
        g = torch.Generator().manual_seed(7 + i)
        ids = torch.randint(3, cfg.vocab_size, (B, T), generator=g)
        mask = torch.zeros(B, T, dtype=torch.long)
        for b, n in enumerate(lengths):
            mask[b, :n] = 1
            ids[b, n:] = 0
        captured = {}
        hook = model.model.layers[-1].register_forward_hook(
            lambda mod, inp, outp: captured.__setitem__("last", outp[0] if isinstance(outp, tuple) else outp))
        with torch.no_grad():
            o = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hook.remove()
        L = cfg.num_hidden_layers
        golden = {"input_ids": ids, "attention_mask": mask, "logits": o.logits.contiguous(),
                  "last_hidden": o.hidden_states[L].contiguous(), f"hidden_{L}": captured["last"].contiguous()}
        for k in range(L):
            golden[f"hidden_{k}"] = o.hidden_states[k].contiguous()
        save_file(golden, str(d / "golden.safetensors"))
        if name == "qwen2":
            # Published Qwen2.5 configs use the legacy spelling; make sure we read it too.
            import json
            c = json.loads((d / "config.json").read_text())
            c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
            c["rope_scaling"] = None
            (d / "config.json").write_text(json.dumps(c, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
