#!/usr/bin/env python3
"""Independent PyTorch reference of ONE EAGLE-3 / EAGLE-3.1 training-time-test (TTT) step.

Written from the specification only (training-semantics.md §A.4-A.7, serving-contract.md §0-§3,
docs/shard-format.md), in plain torch (no transformers model classes for the draft), so that the
Rust trainer can be checked against it. Everything runs in fp32 on CPU (float64 in `selfcheck`).

Subcommands
-----------
  ttt_reference.py make OUT [--eagle31] [--seed S]
      Writes a tiny random fixture: OUT/target (transformers Llama, save_pretrained),
      OUT/draft (flat export config.json + fp32 model.safetensors, every tensor random),
      OUT/features (one shard-format-v1 chunk: manifest.json + shard-00000-00000.safetensors).

  ttt_reference.py step --draft DIR --target DIR --features DIR --ttt K [--decay 0.8]
                        --json OUT.json --grads OUT.safetensors
      One TTT step over the whole chunk (B = all samples, manifest/shard order, right-padded to
      the longest). Writes the losses/metrics JSON and the gradients of weighted_loss w.r.t. every
      trainable draft tensor (same key names as the draft's model.safetensors, minus d2t/t2d).

  ttt_reference.py selfcheck [--eagle31] [--seed S]
      Internal consistency checks of this file (see `selfcheck` below): dense-mask attention vs
      SpecForge's cache-list attention vs a serving-style per-anchor decode loop; RMSNorm/RoPE vs
      transformers; batch padding independence; autograd vs finite differences in float64.

Semantics (per batch row; T = padded length, n_b = valid length, positions >= n_b are padding)
-----------------------------------------------------------------------------------------------
  Padding: input_ids, loss_mask, aux, last_hidden are ZERO at padding positions, so the target
  logits there are exactly 0 (same as the zero row the shift appends).
  z_t  = last_hidden_t . target_lm_head^T                      (full vocab V, fp32)
  shift(v)[t] = v[t+1] (t < T-1), 0 at T-1                     (along time)
  ids' = shift(input_ids);  Z' = shift(z);  loss_mask is NOT shifted, and is forced to 0 at each
  sample's last valid position (no next-token target there; SpecForge's offline loader does it).
  Teacher:  a_t = argmax_v Z'[t]  (full vocab; ties -> lowest id, torch convention)
            position_mask[t] = t2d[a_t] * loss_mask[t]
            p[t] = softmax(Z'[t][t2d])  (draft-vocab columns in ascending target id = draft id order)
            p is extended past T with rows of 1/Vd (SpecForge's p_padded).
  Draft step k = 0..K-1:
     h_in  = fc(fcnorm(aux)) at k = 0, else the previous step's next-hidden
             fcnorm: norm_before_fc -> RMSNorm over 3H with input_norm.weight; then
                     fc_norm (EAGLE-3.1) -> split into 3 chunks of H, RMSNorm chunk i with fc_norm.i
     ids_k = shift^k(ids')  (teacher forcing with ground-truth tokens), emb = target_embed(ids_k)
     x     = cat(input_layernorm(emb), hidden_norm(h_in))      [.., 2H], embedding half first
     q,k,v = x Wq^T, x Wk^T, x Wv^T (no bias) -> heads; RoPE (NeoX rotate_half) at positions t + k
     attn  : query (step k, pos p) attends to K_0[p'] for p' <= p and K_j[p] for j = 1..k;
             scores * head_dim^-1/2; ONE softmax over the T causal + k diagonal scores; GQA by
             repeating kv heads (query head i uses kv head i // (nh/nkv)).
     h     = h_in + o_proj(attn);  out = h + down(silu(gate(n)) * up(n)),  n = post_attention_layernorm(h)
     post  = norm(out);  logits_k = lm_head(post)  [.., Vd]
     next hidden = post if norm_output (EAGLE-3.1) else out (EAGLE-3)
  RMSNorm(x) = w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)  (Llama style, plain weight)
  Loss:  p_k[t] = p[t+k],  position_mask_k = shift^k(position_mask),  logq = log_softmax(logits_k)
         loss_k = -(1/(B*T)) sum_{b,t} position_mask_k[b,t] * sum_v p_k[b,t,v] * logq[b,t,v]
         weighted_loss = sum_k decay^k * loss_k   (gradients = autograd of weighted_loss)
  Metrics: correct_k = [argmax logits_k == argmax p_k] * position_mask_k
           acc_correct_k = sum correct_k;  acc_denominator_k = sum shift^k(loss_mask)
           acc_k = acc_correct_k / max(acc_denominator_k, 1)
           prefix_k = prod_{j<=k} correct_j   (same row position t: chain anchored at t)
           cond_correct_k = sum prefix_k;  cond_denominator_k = sum prefix_{k-1} * position_mask_k
           (prefix_{-1} = 1);  cond_acc_k = cond_correct_k / max(cond_denominator_k, 1)
           sim_accept_len = 1 + sum_k prod_{i<=k} cond_acc_i
           positions = sum position_mask_0
"""
import argparse
import json
import math
import os
import pathlib
import sys
import tempfile

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

try:  # optional: shard checksums (docs/shard-format.md); absent -> "" (the lead aligns them later)
    import xxhash
except ImportError:  # pragma: no cover
    xxhash = None


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

NON_TRAINABLE = ("d2t", "t2d", "embed_tokens.weight")


def load_safetensors_dir(d):
    """All tensors of DIR/model.safetensors, or of the shards listed in model.safetensors.index.json."""
    d = pathlib.Path(d)
    if (d / "model.safetensors").exists():
        return load_file(str(d / "model.safetensors"))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(d / f)))
    return out


class DraftConfig:
    """The draft fields the TTT step needs, from the flat export config (serving-contract §3.1)."""

    def __init__(self, cfg):
        self.raw = cfg
        self.H = cfg["hidden_size"]
        self.nh = cfg["num_attention_heads"]
        self.nkv = cfg.get("num_key_value_heads") or self.nh
        self.d = cfg.get("head_dim") or self.H // self.nh
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        rope = cfg.get("rope_parameters") or {}
        self.theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
        scaling = cfg.get("rope_scaling") or rope
        rtype = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
        if rtype != "default":
            raise SystemExit(f"rope type {rtype!r} is outside this reference (default RoPE only)")
        self.V = cfg["vocab_size"]
        self.Vd = cfg.get("draft_vocab_size") or self.V
        self.Ht = cfg.get("target_hidden_size") or self.H
        self.A = cfg.get("num_aux_hidden_states", 3)
        self.fc_norm = bool(cfg.get("fc_norm", False))
        self.norm_output = bool(cfg.get("norm_output", False))
        self.norm_before_fc = bool(cfg.get("norm_before_fc", False))
        if cfg.get("norm_before_residual", False):
            raise SystemExit("norm_before_residual=true is outside the specified TTT semantics")
        if cfg.get("num_hidden_layers", 1) != 1:
            raise SystemExit("the draft must have exactly one decoder layer")


def load_draft(d, dtype):
    d = pathlib.Path(d)
    cfg = DraftConfig(json.loads((d / "config.json").read_text()))
    tensors = load_safetensors_dir(d)
    t2d = tensors["t2d"].to(torch.bool)
    d2t = tensors["d2t"].to(torch.int64)
    # d2t and t2d must describe the same draft vocabulary: draft id i <-> target id i + d2t[i],
    # in ascending target-id order (so t2d's column selection is draft-id order).
    used = torch.nonzero(t2d).flatten()
    assert used.numel() == cfg.Vd == d2t.numel(), (used.numel(), cfg.Vd, d2t.numel())
    assert torch.equal(used, torch.arange(cfg.Vd) + d2t), "d2t and t2d disagree"
    params = {k: v.to(dtype).clone().requires_grad_(True)
              for k, v in tensors.items() if k not in NON_TRAINABLE}
    return cfg, params, t2d, d2t


def load_target_head(d, dtype):
    """The frozen target pieces the step uses: embed_tokens [V, H] and lm_head [V, H]."""
    d = pathlib.Path(d)
    tcfg = json.loads((d / "config.json").read_text())
    t = load_safetensors_dir(d)
    embed = next(t[k] for k in ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                                "embed_tokens.weight") if k in t)
    if "lm_head.weight" in t and not tcfg.get("tie_word_embeddings", False):
        lm_head = t["lm_head.weight"]
    else:
        lm_head = embed
    return embed.to(dtype), lm_head.to(dtype)


def load_features(d):
    """Samples of one chunk, in manifest shard order then offsets order: list of dicts."""
    d = pathlib.Path(d)
    man = json.loads((d / "manifest.json").read_text())
    assert man["format"] == "specforge-shards" and man["version"] == 1, man
    samples = []
    for sh in man["shards"]:
        path = d / sh["file"]
        if xxhash is not None and sh.get("xxh3"):
            assert xxhash.xxh3_64_hexdigest(path.read_bytes()) == sh["xxh3"], f"checksum {path}"
        t = load_file(str(path))
        off = t["offsets"].tolist()
        for s in range(len(off) - 1):
            a, b = off[s], off[s + 1]
            samples.append(dict(input_ids=t["input_ids"][a:b].to(torch.int64),
                                loss_mask=t["loss_mask"][a:b].to(torch.int64),
                                aux=t["aux"][a:b], last_hidden=t["last_hidden"][a:b],
                                sample_index=int(t["sample_index"][s])))
    return man, samples


def collate(samples, dtype):
    """Right-pad to the longest sample with zeros (ids 0, loss_mask 0, features 0)."""
    B, T = len(samples), max(s["input_ids"].numel() for s in samples)
    ids = torch.zeros(B, T, dtype=torch.int64)
    lm = torch.zeros(B, T, dtype=torch.int64)
    aux = torch.zeros(B, T, samples[0]["aux"].shape[1], dtype=dtype)
    last = torch.zeros(B, T, samples[0]["last_hidden"].shape[1], dtype=dtype)
    lens = []
    for b, s in enumerate(samples):
        n = s["input_ids"].numel()
        lens.append(n)
        ids[b, :n] = s["input_ids"]
        lm[b, :n] = s["loss_mask"]
        # The last token has no next-token target (its shifted teacher row would be padding or
        # the zero row), so it is never supervised; SpecForge's offline loader does the same.
        lm[b, n - 1] = 0
        aux[b, :n] = s["aux"].to(dtype)  # stored bf16 -> fp32 exactly
        last[b, :n] = s["last_hidden"].to(dtype)
    return dict(input_ids=ids, loss_mask=lm, aux=aux, last_hidden=last, lengths=lens)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def shift_left(v, k=1, fill=0):
    """shift(v)[t] = v[t+k] along dim 1 (time), `fill` for the last k rows."""
    if k == 0:
        return v
    pad = torch.full_like(v[:, :k], fill)
    return torch.cat([v[:, k:], pad], dim=1)


def rms_norm(x, w, eps):
    x32 = x if x.dtype == torch.float64 else x.to(torch.float32)  # fp32 statistics (fp64 in selfcheck)
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * y.to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """transformers' Llama default RoPE: inv_freq over even dims, emb = cat(freqs, freqs), in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [..., T, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """x [B, heads, T, d], cos/sin [B, T, d]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def repeat_kv(x, n_rep):
    """[B, nkv, S, d] -> [B, nkv*n_rep, S, d]; query head i uses kv head i // n_rep."""
    return x.repeat_interleave(n_rep, dim=1)


def ttt_attention_dense(q, ks, vs, scale):
    """TTT attention with one dense mask over cat(K_0..K_k) (length (k+1)T).

    q [B, nh, T, d]; ks/vs: lists of k+1 tensors [B, nh, T, d] (already GQA-repeated).
    Block 0 is causal (kv <= q); block j >= 1 is the diagonal (kv == q, same position, step j).
    """
    T = q.shape[2]
    K, Vv = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
    eye = torch.eye(T, dtype=torch.bool)
    mask = torch.cat([torch.ones(T, T, dtype=torch.bool).tril()] + [eye] * (len(ks) - 1), dim=1)
    scores = (q @ K.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ Vv  # fp32 here (float64 in selfcheck)


def ttt_attention_cachelist(q, ks, vs, scale):
    """SpecForge's SDPA/eager formulation (cache_hidden lists): causal scores against K_0, plus one
    scalar score per earlier step j (q . K_j[p]); one softmax over the [T + k] concatenation."""
    T = q.shape[2]
    s0 = (q @ ks[0].transpose(-1, -2)) * scale
    s0 = s0.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    extra = [((q * kj).sum(-1, keepdim=True)) * scale for kj in ks[1:]]
    w = torch.softmax(torch.cat([s0] + extra, dim=-1), dim=-1)
    out = w[..., :T] @ vs[0]
    for j, vj in enumerate(vs[1:]):
        out = out + w[..., T + j: T + j + 1] * vj
    return out


def fuse_aux(P, cfg, aux):
    """Step-0 hidden input: [norm_before_fc] -> [fc_norm per chunk] -> fc  (serving-contract §1.1)."""
    a = aux
    if cfg.norm_before_fc:
        a = rms_norm(a, P["input_norm.weight"], cfg.eps)
    if cfg.fc_norm:
        chunks = a.split(cfg.Ht, dim=-1)
        assert len(chunks) == cfg.A
        a = torch.cat([rms_norm(c, P[f"fc_norm.{i}.weight"], cfg.eps) for i, c in enumerate(chunks)], dim=-1)
    return a @ P["fc.weight"].T


def qkv(P, cfg, emb, h_in, positions):
    """Normed inputs -> q [B,nh,T,d], k/v [B,nkv,T,d] with RoPE applied to q and k."""
    B, T, _ = emb.shape
    x = torch.cat([rms_norm(emb, P["midlayer.input_layernorm.weight"], cfg.eps),
                   rms_norm(h_in, P["midlayer.hidden_norm.weight"], cfg.eps)], dim=-1)
    q = (x @ P["midlayer.self_attn.q_proj.weight"].T).view(B, T, cfg.nh, cfg.d).transpose(1, 2)
    k = (x @ P["midlayer.self_attn.k_proj.weight"].T).view(B, T, cfg.nkv, cfg.d).transpose(1, 2)
    v = (x @ P["midlayer.self_attn.v_proj.weight"].T).view(B, T, cfg.nkv, cfg.d).transpose(1, 2)
    cos, sin = rope_cos_sin(positions, cfg.d, cfg.theta, emb.dtype)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def after_attention(P, cfg, h_in, attn):
    """attn [B,nh,T,d] -> (out = pre-norm hidden, post = norm(out), logits over Vd)."""
    B, _, T, _ = attn.shape
    h = h_in + attn.transpose(1, 2).reshape(B, T, cfg.nh * cfg.d) @ P["midlayer.self_attn.o_proj.weight"].T
    n = rms_norm(h, P["midlayer.post_attention_layernorm.weight"], cfg.eps)
    mlp = (F.silu(n @ P["midlayer.mlp.gate_proj.weight"].T) * (n @ P["midlayer.mlp.up_proj.weight"].T)) \
        @ P["midlayer.mlp.down_proj.weight"].T
    out = h + mlp
    post = rms_norm(out, P["norm.weight"], cfg.eps)
    return out, post, post @ P["lm_head.weight"].T


# ----------------------------------------------------------------------------------------------
# The TTT step
# ----------------------------------------------------------------------------------------------

def draft_forward(P, cfg, embed, ids_shifted, aux, K, attention=ttt_attention_dense, posts=None):
    """Unrolled TTT forward. ids_shifted = ids' [B, T]. Returns logits_k [B,T,Vd] for k < K
    (and appends each step's post-norm hidden to `posts` when a list is given)."""
    B, T = ids_shifted.shape
    n_rep = cfg.nh // cfg.nkv
    scale = cfg.d ** -0.5
    pos = torch.arange(T).expand(B, T)
    h_in = fuse_aux(P, cfg, aux)
    ks, vs, logits = [], [], []
    for k in range(K):
        emb = F.embedding(shift_left(ids_shifted, k), embed)
        q, kk, vv = qkv(P, cfg, emb, h_in, pos + k)
        ks.append(repeat_kv(kk, n_rep))
        vs.append(repeat_kv(vv, n_rep))
        out, post, lg = after_attention(P, cfg, h_in, attention(q, ks, vs, scale))
        logits.append(lg)
        if posts is not None:
            posts.append(post)
        h_in = post if cfg.norm_output else out
    return logits


def teacher(batch, t2d, lm_head):
    """Pre-shifted ids', target distribution p over the draft vocab, position_mask."""
    z = batch["last_hidden"] @ lm_head.T                      # [B, T, V]
    Zs = shift_left(z)
    ids_s = shift_left(batch["input_ids"])
    a = Zs.argmax(-1)                                          # full-vocab target top-1
    position_mask = t2d[a].to(torch.int64) * batch["loss_mask"]
    p = torch.softmax(Zs[..., t2d], dim=-1)                   # columns in draft-id order
    return ids_s, p, position_mask


def ttt_step(P, cfg, t2d, embed, lm_head, batch, K, decay, attention=ttt_attention_dense):
    ids_s, p, position_mask = teacher(batch, t2d, lm_head)
    B, T = ids_s.shape
    Vd = p.shape[-1]
    p_padded = torch.cat([p, torch.full((B, K, Vd), 1.0 / Vd, dtype=p.dtype)], dim=1)
    logits = draft_forward(P, cfg, embed, ids_s, batch["aux"], K, attention)

    losses, res = [], {k: [] for k in ("acc", "cond_acc", "acc_correct", "acc_denominator",
                                       "cond_correct", "cond_denominator")}
    prefix_prev = torch.ones(B, T, dtype=torch.int64)
    for k in range(K):
        p_k = p_padded[:, k:k + T]
        pm_k = shift_left(position_mask, k)
        lm_k = shift_left(batch["loss_mask"], k)
        logq = torch.log_softmax(logits[k], dim=-1)
        losses.append(-(pm_k * (p_k * logq).sum(-1)).sum() / (B * T))
        with torch.no_grad():
            correct = (logits[k].argmax(-1) == p_k.argmax(-1)).to(torch.int64) * pm_k
            prefix = prefix_prev * correct
            acc_c, acc_d = int(correct.sum()), int(lm_k.sum())
            cond_c, cond_d = int(prefix.sum()), int((prefix_prev * pm_k).sum())
            prefix_prev = prefix
        res["acc_correct"].append(acc_c)
        res["acc_denominator"].append(acc_d)
        res["acc"].append(acc_c / max(acc_d, 1))
        res["cond_correct"].append(cond_c)
        res["cond_denominator"].append(cond_d)
        res["cond_acc"].append(cond_c / max(cond_d, 1))
    weighted = sum(decay ** k * l for k, l in enumerate(losses))
    sim, run = 1.0, 1.0
    for c in res["cond_acc"]:
        run *= c
        sim += run
    report = {"ttt": K, "loss": [float(l.detach()) for l in losses], "weighted_loss": float(weighted.detach()),
              "acc": res["acc"], "cond_acc": res["cond_acc"],
              "acc_correct": res["acc_correct"], "acc_denominator": res["acc_denominator"],
              "cond_correct": res["cond_correct"], "cond_denominator": res["cond_denominator"],
              "sim_accept_len": sim, "positions": int(position_mask.sum())}
    return weighted, report, logits


def top2_gap(x):
    t = x.topk(2, dim=-1).values
    return t[..., 0] - t[..., 1]


@torch.no_grad()
def argmax_margins(batch, t2d, lm_head, logits, K):
    """Smallest top-1 minus top-2 gap of every argmax the metrics depend on (stdout only), so a
    comparison with another implementation knows whether an argmax could flip on rounding noise.
    Exact ties (the all-zero teacher row of the last valid token) are excluded: they are resolved
    by the lowest-index rule, not by rounding."""
    z = shift_left(batch["last_hidden"] @ lm_head.T)
    lm = batch["loss_mask"].bool()
    zt = top2_gap(z)[lm]
    p = z[..., t2d]
    out = {"target_full_vocab": float(zt[zt > 0].min())}
    draft = []
    for k in range(K):
        pm = shift_left(lm.to(torch.int64), k).bool()
        draft.append(float(top2_gap(logits[k])[pm].min()))
    pk = top2_gap(p)[lm]
    out["target_draft_vocab"] = float(pk[pk > 0].min())
    out["draft_logits_per_step"] = draft
    return out


def cmd_step(args):
    dtype = torch.float32
    cfg, P, t2d, _ = load_draft(args.draft, dtype)
    embed, lm_head = load_target_head(args.target, dtype)
    _, samples = load_features(args.features)
    assert samples[0]["aux"].shape[1] == cfg.A * cfg.Ht, "aux width != num_aux_hidden_states * target_hidden_size"
    batch = collate(samples, dtype)
    weighted, report, logits = ttt_step(P, cfg, t2d, embed, lm_head, batch, args.ttt, args.decay)
    weighted.backward()
    grads = {k: v.grad.detach().contiguous() for k, v in P.items()}
    for k, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), k
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.grads:
        save_file(grads, args.grads)
    summary = dict(report)
    summary["argmax_margins"] = argmax_margins(batch, t2d, lm_head, logits, args.ttt)
    summary["grad_norms"] = {k: float(g.norm()) for k, g in grads.items()}
    summary["batch"] = {"B": len(samples), "T": batch["input_ids"].shape[1], "lengths": batch["lengths"]}
    print(json.dumps(summary, indent=1))


# ----------------------------------------------------------------------------------------------
# Fixture
# ----------------------------------------------------------------------------------------------

H, V, VD, LAYERS, NH, NKV, HD, INTER = 64, 256, 96, 4, 4, 2, 16, 96
LENGTHS = [23, 17, 30, 9]


def draft_config(eagle31):
    return {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": H, "num_hidden_layers": 1, "num_attention_heads": NH, "num_key_value_heads": NKV,
        "head_dim": HD, "intermediate_size": INTER, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "vocab_size": V, "draft_vocab_size": VD, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "torch_dtype": "float32",
        "target_hidden_size": H, "num_aux_hidden_states": 3,
        "eagle_aux_hidden_state_layer_ids": [1, 2, 3],
        "eagle_config": {"use_aux_hidden_state": True, "eagle_aux_hidden_state_layer_ids": [0, 1, 2]},
        "norm_before_residual": False, "norm_before_fc": False,
        "fc_norm": eagle31, "norm_output": eagle31,
    }


def random_draft(g, eagle31):
    def lin(o, i, gain=1.0):
        return torch.randn(o, i, generator=g) * gain / math.sqrt(i)

    def norm(n):
        return 1.0 + 0.2 * torch.randn(n, generator=g)

    t = {"fc.weight": lin(H, 3 * H)}
    if eagle31:
        for i in range(3):
            t[f"fc_norm.{i}.weight"] = norm(H)
    t.update({
        "midlayer.input_layernorm.weight": norm(H),
        "midlayer.hidden_norm.weight": norm(H),
        "midlayer.self_attn.q_proj.weight": lin(NH * HD, 2 * H, 2.0),
        "midlayer.self_attn.k_proj.weight": lin(NKV * HD, 2 * H, 2.0),
        "midlayer.self_attn.v_proj.weight": lin(NKV * HD, 2 * H),
        "midlayer.self_attn.o_proj.weight": lin(H, NH * HD),
        "midlayer.post_attention_layernorm.weight": norm(H),
        "midlayer.mlp.gate_proj.weight": lin(INTER, H),
        "midlayer.mlp.up_proj.weight": lin(INTER, H),
        "midlayer.mlp.down_proj.weight": lin(H, INTER),
        "norm.weight": norm(H),
        "lm_head.weight": lin(VD, H, 2.0),
    })
    # Draft vocab: a random sorted subset of target ids that includes the low ids 0..7.
    rest = 8 + torch.randperm(V - 8, generator=g)[: VD - 8]
    used = torch.cat([torch.arange(8), rest]).sort().values
    t["d2t"] = (used - torch.arange(VD)).to(torch.int64)
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[used] = True
    t["t2d"] = t2d
    return {k: v.contiguous() for k, v in t.items()}


def random_loss_mask(n, g):
    """Prompt prefix of 0s, then alternating assistant (1) / user (0) runs; the last run is random."""
    m = torch.zeros(n, dtype=torch.uint8)
    t = max(2, int(n * 0.3))
    on = True
    while t < n:
        run = int(torch.randint(2, 8, (1,), generator=g))
        if on:
            m[t:t + run] = 1
        t += run
        on = not on
    return m


def write_chunk(out, samples_tensors, hidden, aux_ids, target_cfg_json, sample_index):
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.cat([s["input_ids"] for s in samples_tensors])
    lens = [s["input_ids"].numel() for s in samples_tensors]
    offsets = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int64)
    tensors = {
        "input_ids": ids.to(torch.int64),
        "loss_mask": torch.cat([s["loss_mask"] for s in samples_tensors]).to(torch.uint8),
        "aux": torch.cat([s["aux"] for s in samples_tensors]).to(torch.bfloat16),
        "last_hidden": torch.cat([s["last_hidden"] for s in samples_tensors]).to(torch.bfloat16),
        "offsets": offsets,
        "sample_index": torch.tensor(sample_index, dtype=torch.int64),
    }
    name = "shard-00000-00000.safetensors"
    tmp = out / (name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "specforge-shards", "version": "1"})
    os.replace(tmp, out / name)
    data = (out / name).read_bytes()
    cfg_obj = json.loads(target_cfg_json)
    # config_hash: xxh3-64 of the target's config.json bytes (docs/shard-format.md).
    config_hash = xxhash.xxh3_64_hexdigest(target_cfg_json.encode())
    manifest = {
        "format": "specforge-shards", "version": 1,
        "target": {"name": "tiny-random-llama", "model_type": cfg_obj.get("model_type", "llama"),
                   "config_hash": config_hash, "vocab_size": cfg_obj["vocab_size"],
                   "num_hidden_layers": cfg_obj["num_hidden_layers"]},
        "aux_layer_ids": aux_ids, "hidden_size": hidden, "dtype": "bf16",
        "samples": len(lens), "tokens": int(offsets[-1]),
        "shards": [{"file": name, "samples": len(lens), "tokens": int(offsets[-1]), "bytes": len(data),
                    "xxh3": xxhash.xxh3_64_hexdigest(data), "first_sample": 0, "rank": 0}],
        "run": {"dataset": "random (ttt_reference.py make)", "dataset_xxh3": "", "max_len": max(lens),
                "truncation": "none", "compute_dtype": "f32", "world_size": 1, "shard_bytes": len(data),
                "planned_samples": len(lens), "planned_tokens": int(offsets[-1])},
        "complete": True,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / "manifest.json")


def make_fixture(out, eagle31, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = pathlib.Path(out)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    # --- draft ---
    draft = random_draft(g, eagle31)  # written below, after the lm_head tilt

    # --- target: tiny random Llama, every parameter random (norms 1 +- noise) ---
    tcfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=112, num_hidden_layers=LAYERS,
                       num_attention_heads=NH, num_key_value_heads=NKV, max_position_embeddings=2048,
                       rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)
    target = LlamaForCausalLM(tcfg).eval()
    with torch.no_grad():
        for name, p in target.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif name == "lm_head.weight":
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)  # logits std ~3: peaked
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)

    # --- features: random, scaled ~1, plus a shared mean direction (real hidden states have large
    # mean components). A fully random fixture gives a draft that is never right, so accuracies and
    # conditional chains would all be 0 and check nothing. So, after drawing everything, we pick a
    # draft id d* and tilt two rows: draft lm_head[d*] toward the mean post-norm hidden (so the draft's
    # top-1 is d* at ~half the positions of every step) and target lm_head[t*], t* = used[d*], toward
    # the mean last_hidden (so the target's top-1 is t* at ~half the positions). Elsewhere the
    # target's top-1 is random over V, often outside the draft vocab (position_mask drops those).
    m_aux = 1.0 * torch.randn(3 * H, generator=g)
    m_last = torch.randn(H, generator=g)
    samples = []
    for n in LENGTHS:
        samples.append(dict(input_ids=torch.randint(0, V, (n,), generator=g),
                            loss_mask=random_loss_mask(n, g),
                            aux=(torch.randn(n, 3 * H, generator=g) + m_aux).to(torch.bfloat16),
                            last_hidden=(torch.randn(n, H, generator=g) + m_last).to(torch.bfloat16)))
    # Sample 1 ends in a prompt run (mask 0), the others end on an assistant token (mask 1): the
    # last valid token's teacher is then the all-zero logit row (padding / shift fill).
    samples[1]["loss_mask"][-2:] = 0
    samples[0]["loss_mask"][-1] = 1
    samples[2]["loss_mask"][-1] = 1
    samples[3]["loss_mask"][-1] = 1

    cfg = DraftConfig(draft_config(eagle31))
    P = {k: v for k, v in draft.items() if k not in NON_TRAINABLE}
    emb = target.model.embed_tokens.weight.detach().clone()
    batch = collate(samples, torch.float32)
    valid = torch.arange(batch["input_ids"].shape[1])[None] < torch.tensor(batch["lengths"])[:, None]
    used = torch.nonzero(draft["t2d"]).flatten()
    d_star = 8 + int(torch.randint(0, VD - 8, (1,), generator=g))
    t_star = int(used[d_star])
    with torch.no_grad():
        posts = []
        draft_forward(P, cfg, emb, shift_left(batch["input_ids"]), batch["aux"], 7, posts=posts)
        u = torch.stack([q[valid] for q in posts]).mean((0, 1))
        row = P["lm_head.weight"][d_star].clone()
        for beta in [0.05 * i for i in range(1, 200)]:  # smallest tilt giving >= 50% at every step
            P["lm_head.weight"][d_star] = row + beta * u / u.norm()
            if min(float((q[valid] @ P["lm_head.weight"].T).argmax(-1).eq(d_star).float().mean())
                   for q in posts) >= 0.5:
                break
        z = batch["last_hidden"][valid]
        w = m_last / m_last.norm()
        for alpha in [0.05 * i for i in range(1, 200)]:  # smallest tilt giving >= 45% t* top-1
            target.lm_head.weight[t_star] = alpha * w
            if float((z @ target.lm_head.weight.T).argmax(-1).eq(t_star).float().mean()) >= 0.45:
                break
    draft["lm_head.weight"] = P["lm_head.weight"].contiguous()
    (out / "draft").mkdir(parents=True, exist_ok=True)
    (out / "draft" / "config.json").write_text(json.dumps(draft_config(eagle31), indent=2) + "\n")
    save_file(draft, str(out / "draft" / "model.safetensors"))
    target.save_pretrained(out / "target", safe_serialization=True)
    write_chunk(out / "features", samples, H, [1, 2, 3], (out / "target" / "config.json").read_text(),
                sample_index=[0, 2, 3, 5])
    print(json.dumps({"out": str(out), "eagle31": eagle31, "seed": seed, "lengths": LENGTHS,
                      "draft_popular_id": d_star, "target_popular_id": t_star,
                      "draft_tilt": round(beta, 3), "target_tilt": round(alpha, 3),
                      "xxhash": xxhash is not None}))


# ----------------------------------------------------------------------------------------------
# Self-check
# ----------------------------------------------------------------------------------------------

def serve_chain(P, cfg, embed, ids_row, aux_row, p, K):
    """Serving-style drafting for ONE row, anchored at position p, teacher-forced tokens.

    Step 0: ordinary causal pass over rows 0..p (row i = (ids'[i], aux[i]), position i) -> K_0, h_p.
    Step j >= 1: one new token ids'[p+j] at position p+j, hidden = step j-1's next-hidden at p,
    attending to the context keys K_0[0..p] plus the draft keys of steps 1..j (the draft KV cache).
    Returns the logits [Vd] of steps 0..K-1 at the anchor. Deliberately written without the TTT
    masks, as a server would run it.
    """
    n_rep, scale = cfg.nh // cfg.nkv, cfg.d ** -0.5
    ids = ids_row[None, : p + 1]
    h_in = fuse_aux(P, cfg, aux_row[None, : p + 1])
    q, k, v = qkv(P, cfg, F.embedding(ids, embed), h_in, torch.arange(p + 1)[None])
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~torch.ones(p + 1, p + 1, dtype=torch.bool).tril(), float("-inf"))
    out, post, lg = after_attention(P, cfg, h_in, torch.softmax(s, -1) @ v)
    cache_k, cache_v = k, v
    res = [lg[0, p]]
    h = (post if cfg.norm_output else out)[:, p: p + 1]
    T = ids_row.numel()
    for j in range(1, K):
        tok = ids_row[p + j] if p + j < T else torch.tensor(0)
        q, k, v = qkv(P, cfg, F.embedding(tok.view(1, 1), embed), h, torch.tensor([[p + j]]))
        cache_k = torch.cat([cache_k, repeat_kv(k, n_rep)], dim=2)
        cache_v = torch.cat([cache_v, repeat_kv(v, n_rep)], dim=2)
        w = torch.softmax((q @ cache_k.transpose(-1, -2)) * scale, -1)
        out, post, lg = after_attention(P, cfg, h, w @ cache_v)
        res.append(lg[0, 0])
        h = post if cfg.norm_output else out
    return res


def selfcheck(args):
    from transformers.models.llama.modeling_llama import (LlamaRMSNorm, LlamaRotaryEmbedding,
                                                          apply_rotary_pos_emb)
    from transformers import LlamaConfig

    ok = True

    def check(name, err, tol):
        nonlocal ok
        good = err <= tol
        ok &= good
        print(f"{'ok  ' if good else 'FAIL'} {name}: {err:.3e} (tol {tol:.0e})")

    torch.manual_seed(0)
    # RMSNorm and RoPE against transformers.
    x, w = torch.randn(3, 5, H), 1 + 0.2 * torch.randn(H)
    ref = LlamaRMSNorm(H, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(w)
    with torch.no_grad():
        check("rms_norm vs LlamaRMSNorm", float((rms_norm(x, w, 1e-6) - ref(x)).abs().max()), 1e-6)
    rcfg = LlamaConfig(hidden_size=H, num_attention_heads=NH, head_dim=HD, rope_theta=10000.0,
                       max_position_embeddings=2048)
    rot = LlamaRotaryEmbedding(rcfg)
    pos = torch.arange(7)[None] + 3
    qx, kx = torch.randn(1, NH, 7, HD), torch.randn(1, NKV, 7, HD)
    cos_t, sin_t = rot(qx, pos)
    q_t, k_t = apply_rotary_pos_emb(qx, kx, cos_t, sin_t)
    cos, sin = rope_cos_sin(pos, HD, 10000.0, torch.float32)
    err = max(float((apply_rope(qx, cos, sin) - q_t).abs().max()), float((apply_rope(kx, cos, sin) - k_t).abs().max()))
    check("rope vs transformers", err, 1e-6)

    with tempfile.TemporaryDirectory() as tmp:
        make_fixture(tmp, args.eagle31, args.seed)
        dt = torch.float64
        cfg, P, t2d, _ = load_draft(pathlib.Path(tmp) / "draft", dt)
        embed, lm_head = load_target_head(pathlib.Path(tmp) / "target", dt)
        _, samples = load_features(pathlib.Path(tmp) / "features")
        batch = collate(samples, dt)
        K = 4
        # Dense mask vs cache-list attention (whole step).
        w_dense, rep_dense, lg_dense = ttt_step(P, cfg, t2d, embed, lm_head, batch, K, 0.8)
        w_list, rep_list, lg_list = ttt_step(P, cfg, t2d, embed, lm_head, batch, K, 0.8, ttt_attention_cachelist)
        err = max(float((a - b).abs().max()) for a, b in zip(lg_dense, lg_list))
        check("dense-mask vs cache-list attention (logits)", err, 1e-10)
        check("dense-mask vs cache-list (weighted loss)", abs(float(w_dense) - float(w_list)), 1e-12)

        # Serving-style per-anchor decode == TTT logits at every supervised (step, position).
        ids_s = shift_left(batch["input_ids"])
        err = 0.0
        with torch.no_grad():
            for b, n in enumerate(batch["lengths"]):
                for p in range(n):
                    chain = serve_chain(P, cfg, embed, ids_s[b], batch["aux"][b], p, K)
                    for k in range(K):
                        if p + k < n:  # supervised positions only (position_mask_k needs t + k < n_b)
                            err = max(err, float((chain[k] - lg_dense[k][b, p]).abs().max()))
        check("serving-style decode vs TTT logits", err, 1e-10)

        # Padding independence: each row alone (T = n_b) gives the same logits on its valid part.
        err = 0.0
        with torch.no_grad():
            for b, s in enumerate(samples):
                one = collate([s], dt)
                lg1 = draft_forward(P, cfg, embed, shift_left(one["input_ids"]), one["aux"], K)
                n = one["lengths"][0]
                for k in range(K):
                    err = max(err, float((lg1[k][0, : n - k] - lg_dense[k][b, : n - k]).abs().max()))
        check("padding independence", err, 1e-10)

        # Autograd vs central finite differences (float64), a few entries of every tensor.
        w_dense.backward()
        g = torch.Generator().manual_seed(1)
        worst = 0.0
        for name, t in P.items():
            flat = t.detach().view(-1)
            for idx in torch.randint(0, flat.numel(), (3,), generator=g).tolist():
                eps = 1e-6
                old = float(flat[idx])
                with torch.no_grad():
                    flat[idx] = old + eps
                    lp, _, _ = ttt_step(P, cfg, t2d, embed, lm_head, batch, K, 0.8)
                    flat[idx] = old - eps
                    lm_, _, _ = ttt_step(P, cfg, t2d, embed, lm_head, batch, K, 0.8)
                    flat[idx] = old
                fd = (float(lp) - float(lm_)) / (2 * eps)
                ag = float(t.grad.view(-1)[idx])
                worst = max(worst, abs(fd - ag) / max(1e-6, abs(fd) + abs(ag)))
        check("autograd vs finite differences (rel)", worst, 1e-5)
        print(json.dumps(rep_dense))
    print("selfcheck", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a tiny random fixture")
    m.add_argument("out")
    m.add_argument("--eagle31", action="store_true", help="fc_norm + norm_output (EAGLE-3.1)")
    m.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("step", help="one TTT step: losses/metrics JSON + gradients")
    s.add_argument("--draft", required=True)
    s.add_argument("--target", required=True)
    s.add_argument("--features", required=True)
    s.add_argument("--ttt", type=int, required=True)
    s.add_argument("--decay", type=float, default=0.8)
    s.add_argument("--json")
    s.add_argument("--grads")
    c = sub.add_parser("selfcheck", help="internal consistency checks (float64)")
    c.add_argument("--eagle31", action="store_true")
    c.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "make":
        make_fixture(args.out, args.eagle31, args.seed)
    elif args.cmd == "step":
        cmd_step(args)
    else:
        return selfcheck(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
