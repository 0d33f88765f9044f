#!/usr/bin/env python3
"""A tiny random Llama target with SmolLM2's tokenizer and chat template, for extraction tests.

Every parameter is random (norm weights included). The vocabulary is SmolLM2's (49152) so that
real chat data tokenises; everything else is tiny (H 64, 4 layers, GQA 4/2), so a forward is
milliseconds. Writes OUT/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
chat_template.jinja}.
Run: python tiny_target.py OUT SMOLLM2_DIR
"""
import pathlib
import shutil
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main(out, smol):
    out = pathlib.Path(out)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      tie_word_embeddings=True, rope_theta=10000.0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale, shift = (0.3, 1.0) if "norm" in name else (0.1, 0.0)
            p.copy_(torch.randn(p.shape, generator=g) * scale + shift)
    model.save_pretrained(out, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
        shutil.copy(pathlib.Path(smol) / f, out / f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
