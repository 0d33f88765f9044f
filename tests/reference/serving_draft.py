#!/usr/bin/env python3
"""Independent reference of the SERVING-side EAGLE-3 / EAGLE-3.1 draft forward.

What vLLM (`vllm/model_executor/models/llama_eagle3.py`, `Eagle3LlamaForCausalLM`) and SGLang
(`python/sglang/srt/models/llama_eagle3.py`, `LlamaForCausalLMEagle3`) compute for an exported
single-layer draft head, written from /work/shared/reference/serving-contract.md (§0-§6) only —
not from the trainer's code — so that exported heads can be checked against what the servers do.
Plain torch, float32 on CPU (bf16 weights are cast to float32 after loading); no transformers.

CLI
---
  serving_draft.py --head DIR --embed FILE.safetensors --inputs FILE.safetensors --out FILE.safetensors

  --head DIR     an exported head (§0, §2, §3.1): DIR/config.json (flat HF-Llama EAGLE-3 config) and
                 DIR/model.safetensors (or sharded model-*.safetensors + model.safetensors.index.json)
                 with keys fc.weight, [fc_norm.{i}.weight], [input_norm.weight], midlayer.*,
                 norm.weight, lm_head.weight, d2t (int64), t2d (bool); no embedding.
  --embed FILE   safetensors holding `embed_tokens.weight` [V, H]: the TARGET's embedding, which both
                 servers use for the draft (§0.6).
  --inputs FILE  safetensors holding
                   aux          [T, A*Ht]  target aux hidden states of context positions 0..T-1,
                                           concatenated in ascending aux-layer order (§1, §4);
                   input_ids    [T] int64  ids of sequence positions 1..T: row t pairs the features
                                           of position t with the embedding of the NEXT token (§6);
                   draft_tokens [k] int64  (optional, k may be 0) target-vocabulary ids fed to k
                                           further chained draft steps after the context.
  --out FILE     safetensors (float32) with
                   context_logits      [T, V]  draft logits at every context row, scattered to the
                                               full target vocab as vLLM's compute_logits does (§5):
                                               draft id i -> target id i + d2t[i]; other ids -inf;
                   step_logits         [k, V]  logits of the k chained draft steps (same scatter);
                   context_hidden_post [T, H]  the context rows after the final `norm`.

Forward (serving-contract.md §1; symbols: H draft hidden, Ht target hidden, A aux layers)
------------------------------------------------------------------------------------------
  first pass over the T context rows (positions 0..T-1, causal attention among them):
    a  = aux                                        [T, A*Ht]
    a  = input_norm(a)                  if norm_before_fc      (one RMSNorm over A*Ht)
    a  = cat_i fc_norm[i](a chunk i)    if fc_norm (EAGLE-3.1)  (chunk i = i-th smallest aux layer)
    g  = a @ fc.weight^T                                        ("combine_hidden_states")
    e  = embed_tokens[input_ids]
    z  = layer0(e, g, positions 0..T-1)
  layer0(e, g):   (§1.2)
    x_in     = cat(input_layernorm(e), hidden_norm(g))   [.., 2H], embedding half FIRST
    residual = g  (norm_before_residual=false)  |  hidden_norm(g)  (true; vLLM only)
    y        = o_proj(attn(x_in)) + residual      attn: q/k/v from 2H, NeoX RoPE over full head_dim,
                                                   GQA, scale head_dim^-1/2, causal over the KV cache
    z        = down(silu(gate(n)) * up(n)) + y,  n = post_attention_layernorm(y)
  outputs (§1.3):  z_post = norm(z);  draft logits = lm_head(z_post) [.., Vd];  scatter via d2t.
                   hidden fed forward = z_post if norm_output (EAGLE-3.1) else z (EAGLE-3).
  step j = 1..k (§1.4, §6): position T-1+j; e = embed_tokens[draft_tokens[j-1]];
                   g = hidden fed forward by the previous step (step 1: by the last context row),
                   NOT passed through fc / fc_norm / input_norm; the step's K/V are appended to the
                   cache, and it attends to all T context rows plus steps 1..j.
  RMSNorm(x) = x * rsqrt(mean(x^2) + eps) * w  (plain Llama weight, fp32, eps = rms_norm_eps).

Resolved ambiguities (see also the comments at each site)
---------------------------------------------------------
  * norm_before_fc and fc_norm together: speculators forbids it; vLLM's combine_hidden_states order
    is input_norm -> per-chunk fc_norm -> fc, so both are applied in that order (with a warning).
  * norm_before_fc is read from eagle_config first, then top level (vLLM #42143); if both are given
    and disagree we refuse (the servers may read different keys).
  * A missing flag takes the vLLM flat-path default (false for all four) with a warning (§3.2);
    the contract requires them to be written explicitly (§0.8).
  * norm_before_residual=true is computed as vLLM does (residual = hidden_norm(g)) with a warning:
    SGLang cannot do it (§0.8), so such a head has no single serving semantics.
  * Positions start at 0 (vLLM/SGLang: features and positions are NOT shifted, only tokens, §6).
  * Head properties that make the servers compute different things (more than one layer,
    rope_scaling / M-RoPE / partial rotary, non-SiLU, biases, tie_word_embeddings, a stored
    embed_tokens that differs from the target's, unknown weight keys) are refused, not guessed.
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

F32 = torch.float32


def warn(msg):
    print(f"serving_draft.py: warning: {msg}", file=sys.stderr)


def fail(msg):
    raise SystemExit(f"serving_draft.py: error: {msg}")


# ----------------------------------------------------------------------------------------------
# config.json  (serving-contract.md §3.1, §3.2)
# ----------------------------------------------------------------------------------------------


def read_flag(cfg, key):
    """A boolean EAGLE flag; absent -> vLLM flat-path default false (§3.2), with a warning."""
    if key not in cfg or cfg[key] is None:
        warn(f"config.json has no `{key}`; using the vLLM flat-path default false (§0.8: write it)")
        return False
    return bool(cfg[key])


def load_config(head_dir):
    with open(os.path.join(head_dir, "config.json")) as f:
        cfg = json.load(f)
    eagle = cfg.get("eagle_config") or {}
    c = {}

    # Plain Llama geometry.
    c["H"] = int(cfg["hidden_size"])
    c["nh"] = int(cfg["num_attention_heads"])
    c["nkv"] = int(cfg.get("num_key_value_heads") or c["nh"])
    if cfg.get("head_dim") is None:
        # §2.1: both servers honour head_dim; HF's fallback is hidden_size // heads.
        warn("config.json has no `head_dim`; using hidden_size // num_attention_heads")
        c["d"] = c["H"] // c["nh"]
    else:
        c["d"] = int(cfg["head_dim"])
    if c["nh"] % c["nkv"] != 0:
        fail(f"num_attention_heads {c['nh']} is not a multiple of num_key_value_heads {c['nkv']}")
    if c["d"] % 2 != 0:
        fail(f"head_dim {c['d']} must be even for rotate_half RoPE")
    c["I"] = int(cfg["intermediate_size"])
    c["eps"] = float(cfg["rms_norm_eps"])
    c["V"] = int(cfg["vocab_size"])  # = target vocab = width of the scattered logits (§3.2)
    if cfg.get("draft_vocab_size") is None:
        # vLLM would use Vd = V but SGLang would load lm_head from the target (§3.2, §9).
        fail("config.json has no `draft_vocab_size` (vLLM and SGLang disagree on that; §3.2)")
    c["Vd"] = int(cfg["draft_vocab_size"])

    # Single decoder layer only (§0.3, §3.4: layers >= 1 differ between vLLM and SGLang).
    if int(cfg.get("num_hidden_layers", 1)) != 1:
        fail("num_hidden_layers must be 1 (§0.3, §3.4)")
    # SwiGLU with SiLU, no biases, untied lm_head (§0.7, §1.2).
    if cfg.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act {cfg.get('hidden_act')!r} != 'silu'")
    if cfg.get("attention_bias") or cfg.get("mlp_bias") or cfg.get("bias"):
        fail("biases are not part of the serving contract (§0.7)")
    if cfg.get("tie_word_embeddings"):
        fail("tie_word_embeddings must be false (SGLang would tie lm_head to the embedding; §0.7)")

    # RoPE: 1-D NeoX over the full head_dim (§0.11, §1.2). M-RoPE / scaling are out of scope.
    rope_params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", rope_params.get("rope_theta"))
    if theta is None:
        fail("config.json has no `rope_theta`")
    c["theta"] = float(theta)
    if cfg.get("rope_scaling") not in (None, {}):
        fail(f"rope_scaling {cfg['rope_scaling']!r} is not supported (only null; §6 M-RoPE is out of scope)")
    if rope_params.get("rope_type", "default") != "default":
        fail(f"rope_parameters.rope_type {rope_params.get('rope_type')!r} is not supported")
    if float(cfg.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0))) != 1.0:
        fail("partial_rotary_factor must be 1 (§0.11)")

    # EAGLE-3 specific keys (§3.2).
    c["Ht"] = int(cfg.get("target_hidden_size") or c["H"])  # vLLM: getattr(..., hidden_size)
    if cfg.get("num_aux_hidden_states") is not None:
        c["A"] = int(cfg["num_aux_hidden_states"])
    elif eagle.get("eagle_aux_hidden_state_layer_ids") is not None:
        c["A"] = len(eagle["eagle_aux_hidden_state_layer_ids"])
    else:
        c["A"] = 3
    for ids_key, ids in (("eagle_aux_hidden_state_layer_ids", cfg.get("eagle_aux_hidden_state_layer_ids")),
                         ("eagle_config.eagle_aux_hidden_state_layer_ids", eagle.get("eagle_aux_hidden_state_layer_ids"))):
        if ids is not None and len(ids) != c["A"]:
            fail(f"{ids_key} has {len(ids)} ids but num_aux_hidden_states is {c['A']}")

    # norm_before_fc: vLLM reads eagle_config.norm_before_fc, else top level (#42143).
    nbf_nested, nbf_top = eagle.get("norm_before_fc"), cfg.get("norm_before_fc")
    if nbf_nested is not None and nbf_top is not None and bool(nbf_nested) != bool(nbf_top):
        fail("eagle_config.norm_before_fc and top-level norm_before_fc disagree")
    c["norm_before_fc"] = bool(nbf_nested) if nbf_nested is not None else read_flag(cfg, "norm_before_fc")
    c["fc_norm"] = read_flag(cfg, "fc_norm")
    c["norm_output"] = read_flag(cfg, "norm_output")
    c["norm_before_residual"] = read_flag(cfg, "norm_before_residual")
    if c["norm_before_residual"]:
        warn("norm_before_residual=true: computed as vLLM does; SGLang cannot serve this head (§0.8)")
    if c["norm_before_fc"] and c["fc_norm"]:
        # Mutually exclusive in speculators (§1.1); vLLM's order is input_norm -> fc_norm -> fc.
        warn("norm_before_fc and fc_norm are both true; applying input_norm then fc_norm (vLLM order)")
    return c


# ----------------------------------------------------------------------------------------------
# model.safetensors  (serving-contract.md §2)
# ----------------------------------------------------------------------------------------------


def load_head_tensors(head_dir):
    single = os.path.join(head_dir, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    index = os.path.join(head_dir, "model.safetensors.index.json")  # sharded export (§0.1)
    if not os.path.exists(index):
        fail(f"{head_dir} has neither model.safetensors nor model.safetensors.index.json")
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
        tensors.update(load_file(os.path.join(head_dir, shard)))
    return tensors


def load_weights(head_dir, c, target_embed):
    raw = load_head_tensors(head_dir)
    H, Ht, A, I, Vd, V = c["H"], c["Ht"], c["A"], c["I"], c["Vd"], c["V"]
    qd, kvd = c["nh"] * c["d"], c["nkv"] * c["d"]

    # Expected keys and shapes exactly as in the §2 manifest.
    shapes = {
        "fc.weight": (H, A * Ht),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (qd, 2 * H),
        "midlayer.self_attn.k_proj.weight": (kvd, 2 * H),
        "midlayer.self_attn.v_proj.weight": (kvd, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, qd),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.mlp.gate_proj.weight": (I, H),
        "midlayer.mlp.up_proj.weight": (I, H),
        "midlayer.mlp.down_proj.weight": (H, I),
        "norm.weight": (H,),
        "lm_head.weight": (Vd, H),
    }
    if c["fc_norm"]:
        for i in range(A):
            shapes[f"fc_norm.{i}.weight"] = (Ht,)
    if c["norm_before_fc"]:
        shapes["input_norm.weight"] = (A * Ht,)
    optional = {"d2t", "t2d", "embed_tokens.weight"}

    missing = sorted(set(shapes) - set(raw))
    unknown = sorted(set(raw) - set(shapes) - optional)
    if missing:
        fail(f"head is missing tensors {missing}")
    if unknown:
        # SGLang silently skips unknown keys (a typo = random weights) and vLLM fails to load a
        # `model.`-prefixed key (§2 name rules), so any unknown key is an export bug.
        fail(f"head has tensors that are not in the serving contract: {unknown}")
    for k, shape in shapes.items():
        if tuple(raw[k].shape) != shape:
            fail(f"{k} has shape {tuple(raw[k].shape)}, expected {shape}")
        if not raw[k].is_floating_point():
            fail(f"{k} has dtype {raw[k].dtype}, expected a float type (bf16)")

    # A stored embedding is only consistent across servers if it equals the target's (§0.6, §8).
    if "embed_tokens.weight" in raw and not torch.equal(raw["embed_tokens.weight"].to(target_embed.dtype),
                                                        target_embed):
        fail("head stores an embed_tokens.weight that differs from the target's (SGLang overwrites it, "
             "vLLM keeps it; §0.6)")

    # d2t: target_id = draft_id + d2t[draft_id] (§0.5, §5). Absent only allowed when Vd == V.
    if "d2t" in raw:
        d2t = raw["d2t"]
        if d2t.dtype != torch.int64 or tuple(d2t.shape) != (Vd,):
            fail(f"d2t must be int64 [{Vd}], got {d2t.dtype} {tuple(d2t.shape)}")
    else:
        if Vd != V:
            fail("head has no d2t but draft_vocab_size != vocab_size (§5)")
        d2t = torch.zeros(Vd, dtype=torch.int64)
    target_ids = torch.arange(Vd, dtype=torch.int64) + d2t
    if target_ids.min() < 0 or target_ids.max() >= V:
        fail("d2t maps a draft id outside the target vocabulary")
    if torch.unique(target_ids).numel() != Vd:
        fail("d2t maps two draft ids to the same target id")

    # t2d is ignored by both servers (§0.5); only checked for consistency, warning-only.
    if "t2d" in raw:
        t2d = raw["t2d"]
        if t2d.dtype != torch.bool or tuple(t2d.shape) != (V,):
            warn(f"t2d should be bool [{V}], got {t2d.dtype} {tuple(t2d.shape)} (servers ignore it)")
        elif int(t2d.sum()) != Vd or not bool(t2d[target_ids].all()):
            warn("t2d is not the mask of d2t's target ids (servers ignore it; tooling may not)")

    # Compute in float32 from the stored (bf16) weights.
    w = {k: raw[k].to(F32) for k in shapes}
    w["target_ids"] = target_ids
    return w


# ----------------------------------------------------------------------------------------------
# Building blocks  (serving-contract.md §1)
# ----------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps):
    """Llama RMSNorm with a plain weight (§1 notation; NOT the (1+w) Gemma/Qwen3.5 form)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def rope_cos_sin(positions, head_dim, theta):
    """NeoX / rotate_half RoPE tables over the full head_dim (§1.2), fp32 like the servers' cache."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=F32) / head_dim))  # [d/2]
    angles = positions.to(F32)[:, None] * inv_freq[None, :]                          # [n, d/2]
    angles = torch.cat([angles, angles], dim=-1)                                      # [n, d]
    return angles.cos(), angles.sin()


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x, cos, sin):
    """x [n, heads, d]; cos/sin [n, d]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


class KVCache:
    """The draft's KV cache: context rows first (positions 0..T-1), then one row per draft step.

    Cache index == position here, so "causal" means: a query at cache index i sees indices <= i.
    """

    def __init__(self):
        self.k = None  # [n, nkv, d] (RoPE already applied)
        self.v = None

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=0)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=0)

    def __len__(self):
        return 0 if self.k is None else self.k.shape[0]


class ServingDraft:
    def __init__(self, c, w, embed):
        self.c, self.w, self.embed = c, w, embed

    # §1.1 "combine_hidden_states": runs once on the target features, never on recurrent hidden.
    def combine_hidden_states(self, aux):
        c, w = self.c, self.w
        a = aux
        if c["norm_before_fc"]:
            a = rms_norm(a, w["input_norm.weight"], c["eps"])       # one RMSNorm over A*Ht
        if c["fc_norm"]:
            chunks = a.split(c["Ht"], dim=-1)                       # chunk i = i-th smallest aux layer
            a = torch.cat([rms_norm(ch, w[f"fc_norm.{i}.weight"], c["eps"])
                           for i, ch in enumerate(chunks)], dim=-1)
        return a @ w["fc.weight"].T                                  # [n, H]

    # §1.2 decoder layer 0 (the only layer).
    def layer(self, token_ids, hidden, positions, cache):
        """token_ids [n], hidden [n, H] (fused target features or the previous step's hidden),
        positions [n]; the n rows' K/V are appended to `cache` and the rows attend causally."""
        c, w = self.c, self.w
        n, nh, nkv, d = hidden.shape[0], c["nh"], c["nkv"], c["d"]

        e = self.embed[token_ids].to(F32)                           # target's embedding (§0.6)
        e_n = rms_norm(e, w["midlayer.input_layernorm.weight"], c["eps"])
        g_n = rms_norm(hidden, w["midlayer.hidden_norm.weight"], c["eps"])
        residual = g_n if c["norm_before_residual"] else hidden     # §1.2: raw hidden when false
        x = torch.cat([e_n, g_n], dim=-1)                           # [n, 2H], embedding half first

        q = (x @ w["midlayer.self_attn.q_proj.weight"].T).view(n, nh, d)
        k = (x @ w["midlayer.self_attn.k_proj.weight"].T).view(n, nkv, d)
        v = (x @ w["midlayer.self_attn.v_proj.weight"].T).view(n, nkv, d)
        cos, sin = rope_cos_sin(positions, d, c["theta"])
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        first = len(cache)                                          # cache index of row 0
        cache.append(k, v)
        keys, vals = cache.k, cache.v                               # [S, nkv, d]
        group = nh // nkv                                           # GQA: head h uses kv head h // group
        keys = keys.repeat_interleave(group, dim=1)                 # [S, nh, d]
        vals = vals.repeat_interleave(group, dim=1)

        scores = torch.einsum("qhd,shd->hqs", q, keys) * (d ** -0.5)  # [nh, n, S]
        query_index = torch.arange(first, first + n)[:, None]
        key_index = torch.arange(keys.shape[0])[None, :]
        scores = scores.masked_fill(key_index > query_index, float("-inf"))  # causal
        probs = torch.softmax(scores, dim=-1)
        attn = torch.einsum("hqs,shd->qhd", probs, vals).reshape(n, nh * d)

        y = attn @ w["midlayer.self_attn.o_proj.weight"].T + residual
        m = rms_norm(y, w["midlayer.post_attention_layernorm.weight"], c["eps"])
        mlp = (torch.nn.functional.silu(m @ w["midlayer.mlp.gate_proj.weight"].T)
               * (m @ w["midlayer.mlp.up_proj.weight"].T)) @ w["midlayer.mlp.down_proj.weight"].T
        return mlp + y                                              # z (pre-norm)

    # §1.3 outputs.
    def outputs(self, z):
        """Returns (full-vocab logits [n, V], z_post [n, H], hidden fed to the next step [n, H])."""
        c, w = self.c, self.w
        z_post = rms_norm(z, w["norm.weight"], c["eps"])
        draft_logits = z_post @ w["lm_head.weight"].T               # [n, Vd]
        # vLLM compute_logits (§5): full-V tensor of -inf, draft logits scattered to arange(Vd)+d2t.
        full = torch.full((z.shape[0], c["V"]), float("-inf"), dtype=F32)
        full[:, w["target_ids"]] = draft_logits
        fed_forward = z_post if c["norm_output"] else z             # vLLM/SGLang `aux_output`
        return full, z_post, fed_forward

    def run(self, aux, input_ids, draft_tokens):
        T = aux.shape[0]
        cache = KVCache()

        # First pass over the context (§6): row t = (features of position t, token t+1, position t).
        g = self.combine_hidden_states(aux)
        z = self.layer(input_ids, g, torch.arange(T), cache)
        context_logits, context_hidden_post, fed = self.outputs(z)

        # Chained draft steps (§1.4, §6): step j at position T-1+j, hidden = previous step's
        # fed-forward hidden, token = draft_tokens[j-1] (a target id, embedded with the target's
        # embedding), attending to the whole context cache plus the earlier steps.
        hidden = fed[-1:]
        step_logits = []
        for j in range(1, draft_tokens.shape[0] + 1):
            z = self.layer(draft_tokens[j - 1:j], hidden, torch.tensor([T - 1 + j]), cache)
            logits, _, hidden = self.outputs(z)
            step_logits.append(logits)
        if step_logits:
            step_logits = torch.cat(step_logits, dim=0)
        else:
            step_logits = torch.empty((0, self.c["V"]), dtype=F32)
        return context_logits, step_logits, context_hidden_post


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--head", required=True, help="exported head directory (config.json + model.safetensors)")
    p.add_argument("--embed", required=True, help="safetensors with the target's embed_tokens.weight [V, H]")
    p.add_argument("--inputs", required=True, help="safetensors with aux [T, A*Ht], input_ids [T], draft_tokens [k]")
    p.add_argument("--out", required=True, help="output safetensors")
    args = p.parse_args(argv)

    torch.set_grad_enabled(False)
    c = load_config(args.head)

    emb_file = load_file(args.embed)
    if "embed_tokens.weight" not in emb_file:
        fail(f"{args.embed} has no `embed_tokens.weight` (keys: {sorted(emb_file)})")
    embed = emb_file["embed_tokens.weight"]  # kept in its stored dtype; looked-up rows are cast to fp32
    if not embed.is_floating_point():
        fail(f"embed_tokens.weight has dtype {embed.dtype}, expected a float type")
    if tuple(embed.shape) != (c["V"], c["H"]):
        fail(f"embed_tokens.weight has shape {tuple(embed.shape)}, expected ({c['V']}, {c['H']})")

    w = load_weights(args.head, c, embed)

    inp = load_file(args.inputs)
    for key in ("aux", "input_ids"):
        if key not in inp:
            fail(f"{args.inputs} has no `{key}`")
    aux = inp["aux"].to(F32)
    input_ids = inp["input_ids"]
    draft_tokens = inp.get("draft_tokens", torch.empty(0, dtype=torch.int64))
    if aux.dim() != 2 or aux.shape[0] < 1 or aux.shape[1] != c["A"] * c["Ht"]:
        fail(f"aux has shape {tuple(aux.shape)}, expected [T>=1, {c['A'] * c['Ht']}]")
    T = aux.shape[0]
    for name, ids, n in (("input_ids", input_ids, T), ("draft_tokens", draft_tokens, None)):
        if ids.dtype != torch.int64 or ids.dim() != 1 or (n is not None and ids.shape[0] != n):
            fail(f"{name} must be int64 [{n if n is not None else 'k'}], got {ids.dtype} {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= c["V"]):
            fail(f"{name} has ids outside the target vocabulary [0, {c['V']})")

    model = ServingDraft(c, w, embed)
    context_logits, step_logits, context_hidden_post = model.run(aux, input_ids, draft_tokens)

    save_file(
        {
            "context_logits": context_logits.contiguous(),
            "step_logits": step_logits.contiguous(),
            "context_hidden_post": context_hidden_post.contiguous(),
        },
        args.out,
        metadata={
            "generator": "tests/reference/serving_draft.py",
            "T": str(T),
            "k": str(draft_tokens.shape[0]),
            "norm_before_fc": str(c["norm_before_fc"]).lower(),
            "fc_norm": str(c["fc_norm"]).lower(),
            "norm_output": str(c["norm_output"]).lower(),
            "norm_before_residual": str(c["norm_before_residual"]).lower(),
        },
    )
    print(f"serving_draft.py: T={T} k={draft_tokens.shape[0]} V={c['V']} Vd={c['Vd']} "
          f"fc_norm={c['fc_norm']} norm_before_fc={c['norm_before_fc']} norm_output={c['norm_output']} "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
