#!/usr/bin/env python3
"""Golden outputs of transformers' Qwen3.5 text model (Gated DeltaNet + gated attention) on tiny
random configs, fp32 CPU, through transformers' pure-torch GDN path (no fla / causal_conv1d).

Every parameter is random: the (1+w) RMSNorm offsets, the plain-weight gated norm, A_log, dt_bias,
the depthwise conv, every projection (and bias where the config has one), so no term can hide
behind a zero or a one.

Cases (each 8 decoder layers), written to OUT/<case>/{config.json, model.safetensors, golden.safetensors}:
  interval     Qwen3_5ForCausalLM, `layer_types` removed from config.json so that
               `full_attention_interval: 4` decides (full attention at 3 and 7), untied lm_head,
               GVA (2 key heads -> 4 value heads), conv width 4.
  layer_types  Qwen3_5ForCausalLM with explicit, irregular layer_types (full at 1, 5, 6),
               attention_bias, tied embeddings, dk != dv, conv width 3, head_dim 64 with
               mrope_section [3, 3, 2]; also a 3-D (M-RoPE) position golden.
  vlm          Qwen3_5ForConditionalGeneration (tiny vision tower): `model.language_model.*` and
               `model.visual.*` tensors, tie_word_embeddings at the top level only, plus fake
               `mtp.*` tensors. Stored mixed-dtype like the published checkpoints: A_log and
               linear_attn.norm.weight F32, everything else BF16 (the fp32 goldens use exactly
               those values); bf16 goldens come from transformers loading it with dtype=bfloat16.

golden.safetensors keys, per case:
  ids_{n} [1, n] for n in 1, 63, 64, 65, 300 (prefixes of one sequence); h{n}_{k} [1, n, H] for
  k = 0..L (k < L: transformers' hidden_states[k] = input of layer k; k = L: the last layer's
  output before the final norm, via a forward hook); last_{n} (post-norm), logits_{n}.
  batch_ids [3, 300], batch_mask (right padding, lengths 65, 300, 1), batch_h_{k}, batch_last,
  batch_logits.
  cached{s}_last, cached{s}_h_{k} (k = 3, 7): transformers' cached decoding of ids_300[:, :150]
  along CACHE_SCHEDULES[s], pieces concatenated.
  gen_prompt_{i}, gen_out_{i} (i = 0..2): transformers' greedy generate, batch 1, 20 new tokens.
  layer_types only: mrope_ids [1, 40], mrope_pos [3, 1, 40], mrope_h_{k}, mrope_last, mrope_logits.
  vlm only: bf16_ids [1, 65], bf16_h_{k}, bf16_last, bf16_logits (from the bf16 load).
OUT/kernel.safetensors: transformers' torch_chunk_gated_delta_rule / torch_recurrent_gated_delta_rule
  on random q, k, v, g, beta with an initial state (outputs and final states).
Run: python qwen3_5_target.py OUT
"""
import json
import pathlib
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import (DynamicCache, Qwen3_5Config, Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration,
                          Qwen3_5TextConfig)
from transformers.models.qwen3_5 import modeling_qwen3_5 as mq

LENGTHS = [1, 63, 64, 65, 300]
BATCH_LENGTHS = [65, 300, 1]
GEN_PROMPTS = [5, 9, 12]
GEN_NEW = 20
# (start, length) steps of cached decoding over the first 150 tokens of ids_300: a prefill, a
# multi-token chunk on top of the cache, single tokens; and a prefill shorter than the conv window.
CACHE_SCHEDULES = [
    [(0, 70), (70, 67), (137, 1), (138, 1), (139, 1), (140, 1), (141, 9)],
    [(0, 2), (2, 1), (3, 1), (4, 66), (70, 1), (71, 79)],
]
CACHE_AUX = [3, 7]

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
              max_position_embeddings=4096, rms_norm_eps=1e-6, pad_token_id=0)

CASES = {
    "interval": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     linear_num_key_heads=2, linear_key_head_dim=16, linear_num_value_heads=4,
                     linear_value_head_dim=16, linear_conv_kernel_dim=4, tie_word_embeddings=False,
                     rope_parameters=dict(rope_type="default", rope_theta=1e6, partial_rotary_factor=0.25)),
    "layer_types": dict(num_attention_heads=2, num_key_value_heads=1, head_dim=64, attention_bias=True,
                        linear_num_key_heads=2, linear_key_head_dim=32, linear_num_value_heads=2,
                        linear_value_head_dim=24, linear_conv_kernel_dim=3, tie_word_embeddings=True,
                        layer_types=["linear_attention", "full_attention", "linear_attention",
                                     "linear_attention", "linear_attention", "full_attention",
                                     "full_attention", "linear_attention"],
                        rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                             mrope_section=[3, 3, 2], mrope_interleaved=True)),
    "vlm": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                linear_num_key_heads=1, linear_key_head_dim=16, linear_num_value_heads=4,
                linear_value_head_dim=16, linear_conv_kernel_dim=4,
                rope_parameters=dict(rope_type="default", rope_theta=1e7, partial_rotary_factor=0.25,
                                     mrope_section=[11, 11, 10], mrope_interleaved=True)),
}

KEEP_F32 = ("linear_attn.A_log", "linear_attn.norm.weight")


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                # A in (0.05, 2): decays that neither vanish within a chunk nor stay at 1.
                p.copy_(torch.empty(p.shape).uniform_(0.05, 2.0, generator=g).log())
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "linear_attn.norm" in name:  # plain-weight gated norm (init 1)
                p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.3)
            elif "norm" in name:  # zero-centred norms store offsets (init 0)
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "conv1d" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)


def run(text_model, lm_head, ids, mask=None, position_ids=None):
    """All hidden states (k = 0..L), the post-norm state and the logits of one forward."""
    captured = {}
    hook = text_model.layers[-1].register_forward_hook(
        lambda mod, inp, outp: captured.__setitem__("last", outp[0] if isinstance(outp, tuple) else outp))
    with torch.no_grad():
        o = text_model(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                       output_hidden_states=True, use_cache=False)
    hook.remove()
    L = len(text_model.layers)
    hs = {k: o.hidden_states[k].contiguous() for k in range(L)}
    hs[L] = captured["last"].contiguous()
    last = o.last_hidden_state.contiguous()
    assert torch.equal(last, o.hidden_states[L])
    with torch.no_grad():
        logits = lm_head(last).contiguous()
    return hs, last, logits


def goldens(text_model, lm_head, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(3, vocab, (1, max(LENGTHS)), generator=g)
    out = {}
    for n in LENGTHS:
        ids = seq[:, :n].clone()
        hs, last, logits = run(text_model, lm_head, ids)
        out[f"ids_{n}"] = ids
        out.update({f"h{n}_{k}": v for k, v in hs.items()})
        out[f"last_{n}"], out[f"logits_{n}"] = last, logits
    B, T = len(BATCH_LENGTHS), max(BATCH_LENGTHS)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(BATCH_LENGTHS):
        mask[b, :n] = 1
        ids[b, n:] = 0
    hs, last, logits = run(text_model, lm_head, ids, mask)
    out["batch_ids"], out["batch_mask"] = ids, mask
    out.update({f"batch_h_{k}": v for k, v in hs.items()})
    out["batch_last"], out["batch_logits"] = last, logits
    out.update(cached_goldens(text_model, seq))
    return out, g


def generations(model, vocab, g):
    # Greedy tokens do not depend on the thread count, and one thread is several times faster for
    # these tiny decode steps on a busy 2-core machine (no OpenMP wake-ups per op).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _generations(model, vocab, g)
    finally:
        torch.set_num_threads(threads)


def _generations(model, vocab, g):
    out = {}
    for i, n in enumerate(GEN_PROMPTS):
        prompt = torch.randint(3, vocab, (1, n), generator=g)
        with torch.no_grad():
            gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GEN_NEW,
                                 min_new_tokens=GEN_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        out[f"gen_prompt_{i}"] = prompt
        out[f"gen_out_{i}"] = gen[:, n:].contiguous()
        assert out[f"gen_out_{i}"].shape[1] == GEN_NEW
    return out


def cached_goldens(text_model, seq):
    """transformers' own cached decoding (DynamicCache) along CACHE_SCHEDULES."""
    out = {}
    for i, schedule in enumerate(CACHE_SCHEDULES):
        cache = DynamicCache(config=text_model.config)
        last, aux = [], {k: [] for k in CACHE_AUX}
        for start, n in schedule:
            with torch.no_grad():
                o = text_model(input_ids=seq[:, start:start + n], past_key_values=cache, use_cache=True,
                               output_hidden_states=True)
            last.append(o.last_hidden_state)
            for k in CACHE_AUX:
                aux[k].append(o.hidden_states[k])
        out[f"cached{i}_last"] = torch.cat(last, 1).contiguous()
        for k in CACHE_AUX:
            out[f"cached{i}_h_{k}"] = torch.cat(aux[k], 1).contiguous()
    return out


def mrope_positions(T=40):
    """Text, then a 4x4 'image' grid (t, h, w positions as get_rope_index builds them), then text."""
    pos = torch.zeros(3, 1, T, dtype=torch.long)
    pos[:, 0, :8] = torch.arange(8)
    for r in range(4):
        for c in range(4):
            j = 8 + 4 * r + c
            pos[0, 0, j], pos[1, 0, j], pos[2, 0, j] = 8, 8 + r, 8 + c
    pos[:, 0, 24:] = 12 + torch.arange(T - 24)
    return pos


def causal_lm_case(out, name, extra, seed):
    cfg = Qwen3_5TextConfig(**COMMON, **extra)
    model = Qwen3_5ForCausalLM(cfg).eval()
    randomise(model, seed)
    d = out / name
    model.save_pretrained(d, safe_serialization=True)
    gold, g = goldens(model.model, model.lm_head, cfg.vocab_size, seed + 1)
    gold.update(generations(model, cfg.vocab_size, g))
    if name == "layer_types":
        ids = torch.randint(3, cfg.vocab_size, (1, 40), generator=g)
        pos = mrope_positions(40)
        hs, last, logits = run(model.model, model.lm_head, ids, position_ids=pos)
        gold["mrope_ids"], gold["mrope_pos"] = ids, pos
        gold.update({f"mrope_h_{k}": v for k, v in hs.items()})
        gold["mrope_last"], gold["mrope_logits"] = last, logits
    save_file(gold, str(d / "golden.safetensors"))
    c = json.loads((d / "config.json").read_text())
    if name == "interval":
        # Published-style configs may carry only the interval; make sure that path is exercised.
        del c["layer_types"]
        c["full_attention_interval"] = 4
        (d / "config.json").write_text(json.dumps(c, indent=2))
        re = Qwen3_5ForCausalLM.from_pretrained(d).eval()
        assert re.config.layer_types == cfg.layer_types, re.config.layer_types
    assert not c["tie_word_embeddings"] or "lm_head.weight" not in load_file(str(d / "model.safetensors"))


def vlm_case(out, extra, seed):
    text = dict(COMMON, **extra)
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=COMMON["hidden_size"],
                  num_position_embeddings=16)
    cfg = Qwen3_5Config(text_config=text, vision_config=vision, tie_word_embeddings=True)
    model = Qwen3_5ForConditionalGeneration(cfg).eval()
    randomise(model, seed)
    # Round everything but A_log / the gated norm to bf16 values: the checkpoint stores them as BF16.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith(KEEP_F32):
                p.copy_(p.to(torch.bfloat16).float())
    d = out / "vlm"
    model.save_pretrained(d, safe_serialization=True)
    st = load_file(str(d / "model.safetensors"))
    assert "lm_head.weight" not in st and any(k.startswith("model.visual.") for k in st)
    st = {k: (v if k.endswith(KEEP_F32) else v.to(torch.bfloat16)) for k, v in st.items()}
    # A multi-token-prediction head like the published checkpoints carry (never used by us).
    g = torch.Generator().manual_seed(seed + 5)
    st["mtp.fc.weight"] = torch.randn(64, 128, generator=g).to(torch.bfloat16)
    st["mtp.layers.0.input_layernorm.weight"] = torch.randn(64, generator=g).to(torch.bfloat16)
    st["mtp.norm.weight"] = torch.randn(64, generator=g)
    save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})

    lm = model.model.language_model
    gold, g = goldens(lm, model.lm_head, text["vocab_size"], seed + 1)
    gold.update(generations(model, text["vocab_size"], g))
    # transformers' own load of the mixed-dtype file in fp32 must reproduce the in-memory model.
    re = Qwen3_5ForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
    _, _, logits = run(re.model.language_model, re.lm_head, gold["ids_65"])
    assert torch.equal(logits, gold["logits_65"])
    # bf16: transformers casts every tensor (A_log and the gated norm included) to the load dtype.
    bf = Qwen3_5ForConditionalGeneration.from_pretrained(d, dtype=torch.bfloat16).eval()
    la = bf.model.language_model.layers[0].linear_attn
    assert la.A_log.dtype == torch.bfloat16 and la.norm.weight.dtype == torch.bfloat16
    hs, last, logits = run(bf.model.language_model, bf.lm_head, gold["ids_65"])
    gold["bf16_ids"] = gold["ids_65"].clone()
    gold.update({f"bf16_h_{k}": v for k, v in hs.items()})
    gold["bf16_last"], gold["bf16_logits"] = last, logits
    save_file(gold, str(d / "golden.safetensors"))


def kernel_goldens(out):
    g = torch.Generator().manual_seed(11)
    B, T, H, dk, dv = 2, 150, 4, 16, 12
    q = torch.randn(B, T, H, dk, generator=g)
    k = torch.randn(B, T, H, dk, generator=g)
    v = torch.randn(B, T, H, dv, generator=g)
    gd = -torch.nn.functional.softplus(torch.randn(B, T, H, generator=g)) * 0.5
    beta = torch.randn(B, T, H, generator=g).sigmoid()
    s0 = torch.randn(B, H, dk, dv, generator=g) * 0.1
    co, cs = mq.torch_chunk_gated_delta_rule(q, k, v, g=gd, beta=beta, initial_state=s0, output_final_state=True,
                                             use_qk_l2norm_in_kernel=True)
    ro, rs = mq.torch_recurrent_gated_delta_rule(q, k, v, g=gd, beta=beta, initial_state=s0,
                                                 output_final_state=True, use_qk_l2norm_in_kernel=True)
    save_file({"q": q, "k": k, "v": v, "g": gd, "beta": beta, "initial_state": s0,
               "chunk_out": co.contiguous(), "chunk_state": cs.contiguous(),
               "recurrent_out": ro.contiguous(), "recurrent_state": rs.contiguous()},
              str(out / "kernel.safetensors"))


def main(out):
    out = pathlib.Path(out)
    torch.manual_seed(0)
    for i, (name, extra) in enumerate(CASES.items()):
        if name == "vlm":
            vlm_case(out, extra, 300 + 10 * i)
        else:
            causal_lm_case(out, name, extra, 300 + 10 * i)
    kernel_goldens(out)


if __name__ == "__main__":
    main(sys.argv[1])
