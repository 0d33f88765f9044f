//! Qwen3.5 hybrid target: Gated DeltaNet (`linear_attention`) and gated full attention
//! (`full_attention`) layers, the text backbone of Qwen3.5 VLMs such as chandra-ocr-2.
//!
//! Mirrors transformers' `Qwen3_5TextModel` + `lm_head` (`models/qwen3_5/modeling_qwen3_5.py`),
//! including where every cast happens and the shapes and strides of the tensors that elementwise
//! ops and reductions see (libtorch's vectorised and scalar paths round differently), so that on
//! the test models fp32 and bf16 outputs, cached decoding included, equal transformers' bit for
//! bit (the tests assert the 1e-5 / bf16 tolerances, not equality):
//! - every RMSNorm is zero-centred, `(x32·rsqrt(mean(x32²)+eps)·(1+w32)).to(dtype)`, except the
//!   plain-weight gated norm inside the DeltaNet output;
//! - full attention: `q_proj` yields `[q | gate]` per head, per-head zero-centred q/k norms,
//!   partial RoPE (the first `head_dim·partial_rotary_factor` dims) with interleaved M-RoPE when
//!   3-D positions are given, GQA SDPA, `o_proj(o ⊙ σ(gate))`;
//! - Gated DeltaNet: `in_proj_qkv` → depthwise causal conv + SiLU → q/k/v, `β = σ(in_proj_b x)`,
//!   `g = −exp(A_log)·softplus(in_proj_a x + dt_bias)` in fp32, L2-normalised q/k (q scaled by
//!   dk^−½), key heads repeated for the value heads, the delta rule (chunked for prefill,
//!   recurrent for one-token decoding), gated RMSNorm × SiLU(z), `out_proj`.
//!
//! Checkpoints: `model.*` (text-only) or `model.language_model.*` (VLM) prefixes, `model.visual.*`
//! and `mtp.*` skipped, tied or untied `lm_head`. Mixed-dtype checkpoints (A_log and the gated
//! norm stored F32) are cast wholesale to the load dtype, because transformers does exactly that
//! (`Qwen3_5PreTrainedModel` has no `_keep_in_fp32_modules`).
//!
//! Field names equal the checkpoint's tensor names (`linear_attn.in_proj_qkv.weight`,
//! `self_attn.q_proj.weight`, `linear_attn.A_log` → `a_log`, ...).

use tch::{Kind, Tensor};

use super::dense::{load_linear, load_mlp, prepare};
use super::{Cache, ForwardInput, LayerCache, TargetModel, TargetOutput};
use crate::config::{LayerType, LinearAttnConfig, TargetConfig};
use crate::error::{Error, Result};
use crate::nn::{append_kv, apply_rotary, attention, rms_norm_zero_centred, Linear, Mlp, Rotary};
use crate::weights::{Loader, WeightSource};

/// Chunk length of the chunked delta rule (transformers' and FLA's default).
pub const CHUNK_SIZE: i64 = 64;

/// The epsilon of the q/k L2 normalisation (transformers' `l2norm`, FLA's default).
const L2NORM_EPS: f64 = 1e-6;

/// transformers' M-RoPE sections when `rope_parameters` has none.
const DEFAULT_MROPE_SECTION: [i64; 3] = [11, 11, 10];

/// Checkpoint prefixes that belong to other modules of a Qwen3.5 release.
const IGNORED_PREFIXES: [&str; 2] = ["mtp.", "model.visual."];

/// Gated full attention of one `full_attention` layer (`layers.{i}.self_attn.*`).
#[derive(Debug)]
pub struct GatedAttention {
    /// `[nh·2·d, H]`; the output is `[q_h | gate_h]` per head.
    pub q_proj: Linear,
    /// `[nkv·d, H]`.
    pub k_proj: Linear,
    /// `[nkv·d, H]`.
    pub v_proj: Linear,
    /// `[H, nh·d]`.
    pub o_proj: Linear,
    /// Zero-centred per-head norm offsets `[d]`.
    pub q_norm: Tensor,
    /// Zero-centred per-head norm offsets `[d]`.
    pub k_norm: Tensor,
}

/// Gated DeltaNet of one `linear_attention` layer (`layers.{i}.linear_attn.*`).
#[derive(Debug)]
pub struct GatedDeltaNet {
    /// `[2·nk·dk + nv·dv, H]`, output layout `[Q all heads | K | V]`.
    pub in_proj_qkv: Linear,
    /// `[nv·dv, H]`: the output gate z.
    pub in_proj_z: Linear,
    /// `[nv, H]`: β logits.
    pub in_proj_b: Linear,
    /// `[nv, H]`: decay-rate logits.
    pub in_proj_a: Linear,
    /// `conv1d.weight` `[C, 1, K]`, C = 2·nk·dk + nv·dv, depthwise, no bias.
    pub conv1d: Tensor,
    /// `[nv]`.
    pub dt_bias: Tensor,
    /// `A_log` `[nv]`.
    pub a_log: Tensor,
    /// `norm.weight` `[dv]`: the plain-weight (not zero-centred) gated RMSNorm.
    pub norm: Tensor,
    /// `[H, nv·dv]`.
    pub out_proj: Linear,
    dims: LinearAttnConfig,
}

/// The token mixer of a decoder layer.
#[derive(Debug)]
pub enum Mixer {
    /// `linear_attn.*`.
    LinearAttn(GatedDeltaNet),
    /// `self_attn.*`.
    SelfAttn(GatedAttention),
}

/// One pre-norm decoder layer: `h += mixer(norm₁(h)); h += mlp(norm₂(h))`.
#[derive(Debug)]
pub struct Qwen35Layer {
    /// Gated DeltaNet or gated attention.
    pub mixer: Mixer,
    /// SwiGLU MLP.
    pub mlp: Mlp,
    /// Zero-centred norm offsets `[H]`.
    pub input_layernorm: Tensor,
    /// Zero-centred norm offsets `[H]`.
    pub post_attention_layernorm: Tensor,
}

/// The Qwen3.5 text backbone with its `lm_head`.
#[derive(Debug)]
pub struct Qwen35Model {
    cfg: TargetConfig,
    /// `[V, H]`.
    pub embed_tokens: Tensor,
    /// Decoder layers.
    pub layers: Vec<Qwen35Layer>,
    /// Final zero-centred norm offsets `[H]`.
    pub norm: Tensor,
    /// `[V, H]`; the embedding itself when tied.
    pub lm_head: Tensor,
    rotary: Rotary,
    mrope_section: [i64; 3],
}

impl Qwen35Model {
    /// Loads every tensor, reporting all missing, misshapen and unexpected ones at once.
    ///
    /// # Errors
    /// [`Error::Config`] when the config lacks the linear-attention dims or has a malformed
    /// `mrope_section`; the loader's errors for the checkpoint.
    pub fn load(cfg: TargetConfig, src: &WeightSource, kind: Kind, device: tch::Device) -> Result<Self> {
        let la = cfg.linear_attn.clone().ok_or_else(|| {
            Error::config(&cfg.source, "linear_num_key_heads", "is missing: a qwen3_5 model needs the linear-attention dims")
        })?;
        if cfg.layer_types.len() as i64 != cfg.num_hidden_layers {
            return Err(Error::config(
                &cfg.source,
                "layer_types",
                format!("has {} entries but num_hidden_layers is {}", cfg.layer_types.len(), cfg.num_hidden_layers),
            ));
        }
        let mrope_section = match cfg.rope.mrope_section.as_deref() {
            None => DEFAULT_MROPE_SECTION,
            Some(&[t, h, w]) if t >= 0 && h >= 0 && w >= 0 => [t, h, w],
            Some(other) => {
                return Err(Error::config(
                    &cfg.source,
                    "rope_parameters.mrope_section",
                    format!("must be three non-negative section sizes, got {other:?}"),
                ))
            }
        };
        let (h, d, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let (kd, vd) = (la.num_key_heads * la.key_head_dim, la.num_value_heads * la.value_head_dim);
        let conv_dim = 2 * kd + vd;
        let mut l = Loader::new(src, kind, device);
        let embed_tokens = l.backbone("embed_tokens.weight", &[cfg.vocab_size, h]);
        let mut layers = Vec::with_capacity(cfg.layer_types.len());
        for (i, ty) in cfg.layer_types.iter().enumerate() {
            let p = format!("layers.{i}");
            let mixer = match ty {
                LayerType::FullAttention => {
                    let a = format!("{p}.self_attn");
                    Mixer::SelfAttn(GatedAttention {
                        q_proj: load_linear(&mut l, &format!("{a}.q_proj"), nh * d * 2, h, cfg.qkv_bias),
                        k_proj: load_linear(&mut l, &format!("{a}.k_proj"), nkv * d, h, cfg.qkv_bias),
                        v_proj: load_linear(&mut l, &format!("{a}.v_proj"), nkv * d, h, cfg.qkv_bias),
                        o_proj: load_linear(&mut l, &format!("{a}.o_proj"), h, nh * d, cfg.o_bias),
                        q_norm: l.backbone(&format!("{a}.q_norm.weight"), &[d]),
                        k_norm: l.backbone(&format!("{a}.k_norm.weight"), &[d]),
                    })
                }
                LayerType::LinearAttention => {
                    let a = format!("{p}.linear_attn");
                    let nv = la.num_value_heads;
                    Mixer::LinearAttn(GatedDeltaNet {
                        in_proj_qkv: load_linear(&mut l, &format!("{a}.in_proj_qkv"), conv_dim, h, false),
                        in_proj_z: load_linear(&mut l, &format!("{a}.in_proj_z"), vd, h, false),
                        in_proj_b: load_linear(&mut l, &format!("{a}.in_proj_b"), nv, h, false),
                        in_proj_a: load_linear(&mut l, &format!("{a}.in_proj_a"), nv, h, false),
                        conv1d: l.backbone(&format!("{a}.conv1d.weight"), &[conv_dim, 1, la.conv_kernel_dim]),
                        dt_bias: l.backbone(&format!("{a}.dt_bias"), &[nv]),
                        a_log: l.backbone(&format!("{a}.A_log"), &[nv]),
                        norm: l.backbone(&format!("{a}.norm.weight"), &[la.value_head_dim]),
                        out_proj: load_linear(&mut l, &format!("{a}.out_proj"), h, vd, false),
                        dims: la.clone(),
                    })
                }
            };
            layers.push(Qwen35Layer {
                mixer,
                mlp: load_mlp(&mut l, &format!("{p}.mlp"), h, cfg.intermediate_size, false),
                input_layernorm: l.backbone(&format!("{p}.input_layernorm.weight"), &[h]),
                post_attention_layernorm: l.backbone(&format!("{p}.post_attention_layernorm.weight"), &[h]),
            });
        }
        let norm = l.backbone("norm.weight", &[h]);
        let lm_head = if cfg.tie_word_embeddings && !src.contains("lm_head.weight") {
            embed_tokens.shallow_clone()
        } else {
            l.exact("lm_head.weight", &[cfg.vocab_size, h])
        };
        l.finish(&IGNORED_PREFIXES)?;
        let rotary = Rotary::new(&cfg.rope, d, device);
        Ok(Qwen35Model { cfg, embed_tokens, layers, norm, lm_head, rotary, mrope_section })
    }

    /// cos/sin `[B, T, rot_dim]` for 3-D M-RoPE positions `[3, B, T]` (temporal, height, width),
    /// as transformers' `Qwen3_5TextRotaryEmbedding`: frequency j takes its angle from the
    /// height stream when `j % 3 == 1 && j < 3·s_h`, from the width stream when
    /// `j % 3 == 2 && j < 3·s_w`, and from the temporal stream otherwise (interleaved sections).
    fn mrope_cos_sin(&self, pos: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let half = self.rotary.rot_dim / 2;
        let [_, sh, sw] = self.mrope_section;
        let axis: Vec<i64> = (0..half)
            .map(|j| {
                if j % 3 == 1 && j < 3 * sh {
                    1
                } else if j % 3 == 2 && j < 3 * sw {
                    2
                } else {
                    0
                }
            })
            .collect();
        let (b, t) = (pos.size()[1], pos.size()[2]);
        // [3, B, T, 1] x [1, 1, 1, rot/2]: the same single fp32 product as transformers' matmul.
        let freqs = pos.to_kind(Kind::Float).unsqueeze(-1) * self.rotary.inv_freq.view([1, 1, 1, -1]);
        let idx = Tensor::from_slice(&axis).to_device(pos.device()).view([1, 1, 1, half]).expand([1, b, t, half], false);
        let f = freqs.gather(0, &idx, false).squeeze_dim(0);
        let emb = Tensor::cat(&[&f, &f], -1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

impl GatedAttention {
    /// `x`: `[B, T, H]` (normed) → `[B, T, H]`. cos/sin: `[B, T, rot_dim]`; `mask`: additive
    /// `[B, 1, T, past+T]` or `None` for plain causal attention.
    fn forward(
        &self,
        cfg: &TargetConfig,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let (d, nh, nkv) = (cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        // Per head the projection holds [q_h | gate_h] (not all q then all gates).
        let qg = self.q_proj.forward(x).view([b, t, nh, 2 * d]);
        let q = qg.narrow(-1, 0, d);
        let gate = qg.narrow(-1, d, d).reshape([b, t, nh * d]);
        let q = rms_norm_zero_centred(&q, &self.q_norm, cfg.rms_norm_eps).transpose(1, 2);
        let k = rms_norm_zero_centred(&self.k_proj.forward(x).view([b, t, nkv, d]), &self.k_norm, cfg.rms_norm_eps).transpose(1, 2);
        let v = self.v_proj.forward(x).view([b, t, nkv, d]).transpose(1, 2);
        let q = apply_rotary(&q, cos, sin); // [B, nh, T, d]
        let k = apply_rotary(&k, cos, sin); // [B, nkv, T, d]
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let past = match slot.take() {
                    None => None,
                    Some(LayerCache::Kv { k, v }) => Some((k, v)),
                    Some(LayerCache::Linear { .. }) => {
                        return Err(Error::Input("a linear-attention cache was passed to a full-attention layer".into()))
                    }
                };
                let (k, v) = append_kv(past.as_ref().map(|(pk, pv)| (pk, pv)), &k, &v);
                *slot = Some(LayerCache::Kv { k: k.shallow_clone(), v: v.shallow_clone() });
                (k, v)
            }
        };
        let o = attention(&q, &k, &v, mask, 1.0 / (d as f64).sqrt()); // [B, nh, T, d]
        let o = o.transpose(1, 2).reshape([b, t, nh * d]) * gate.sigmoid();
        Ok(self.o_proj.forward(&o))
    }
}

impl GatedDeltaNet {
    /// `x`: `[B, T, H]` (normed) → `[B, T, H]`.
    ///
    /// `pad_mask`: `[B, T]` (1 = real token) for the new positions, given only when it has zeros
    /// and T > 1; padded inputs are zeroed before the projections, as transformers'
    /// `apply_mask_to_padding_states` does, so that padding cannot write into the state.
    /// With a cache slot, continues from its conv/recurrent state and stores the new one.
    fn forward(&self, x: &Tensor, pad_mask: Option<&Tensor>, eps: f64, cache: Option<&mut Option<LayerCache>>) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let dims = &self.dims;
        let (nk, dk, nv, dv) = (dims.num_key_heads, dims.key_head_dim, dims.num_value_heads, dims.value_head_dim);
        let (kd, vd, kw) = (nk * dk, nv * dv, dims.conv_kernel_dim);
        let conv_dim = 2 * kd + vd;
        let x = match pad_mask {
            Some(m) => x * m.unsqueeze(-1).to_kind(x.kind()),
            None => x.shallow_clone(),
        };
        let mixed = self.in_proj_qkv.forward(&x).transpose(1, 2); // [B, C, T]
        let z = self.in_proj_z.forward(&x).view([b, t, nv, dv]);
        let beta_logits = self.in_proj_b.forward(&x); // [B, T, nv]
        let a = self.in_proj_a.forward(&x); // [B, T, nv]

        let (slot, past) = match cache {
            None => (None, None),
            Some(slot) => match slot.take() {
                None => (Some(slot), None),
                Some(LayerCache::Linear { conv, state }) => (Some(slot), Some((conv, state))),
                Some(LayerCache::Kv { .. }) => {
                    return Err(Error::Input("an attention KV cache was passed to a linear-attention layer".into()))
                }
            },
        };
        if let Some((conv, state)) = &past {
            if conv.size() != [b, conv_dim, kw - 1] || state.size() != [b, nv, dk, dv] {
                return Err(Error::Input(format!(
                    "linear-attention cache has conv {:?} / state {:?}, expected [{b}, {conv_dim}, {}] / [{b}, {nv}, {dk}, {dv}]",
                    conv.size(),
                    state.size(),
                    kw - 1
                )));
            }
        }

        // Depthwise causal conv + SiLU over [past K-1 inputs | new inputs]; without a past, zeros
        // stand in for the inputs before t = 0. The calls mirror transformers' shapes exactly:
        // SiLU takes a vectorised path on whole 8/16-lane groups and a scalar one on the tail of
        // each row, whose results differ in the last bit, so where the rows are cut matters for
        // bit-level agreement.
        let w = &self.conv1d;
        let (act, window) = match &past {
            None => {
                // `F.conv1d(x, padding=K-1)[..., :T]`, then SiLU. A cached prefill shorter than K
                // is first left-padded to K columns by transformers' cache, which moves the cut.
                let padded = slot.is_some() && t < kw;
                let x = if padded { mixed.constant_pad_nd([kw - t, 0]) } else { mixed.shallow_clone() };
                let n = x.size()[2];
                let act =
                    x.to_kind(w.kind()).conv1d(w, None::<Tensor>, [1], [kw - 1], [1], conv_dim).narrow(2, 0, n).silu().narrow(2, n - t, t);
                let window = if t < kw - 1 { mixed.constant_pad_nd([kw - 1 - t, 0]) } else { mixed.shallow_clone() };
                (act, window)
            }
            Some((conv, _)) => {
                // transformers keeps K past columns, not K-1, and convolves [K past | new]. Its
                // oldest column only reaches outputs that are dropped, so a zero column stands in
                // for it: the kept outputs are the same products, in the same call shapes.
                let window = Tensor::cat(&[conv, &mixed], 2); // [B, C, K-1+T]
                let full = Tensor::cat(&[&conv.zeros_like().narrow(2, 0, 1), &window], 2).to_kind(w.kind()); // [B, C, K+T]
                let act = if t == 1 {
                    // `causal_conv1d_update`: no padding, keep the last output, then SiLU.
                    full.conv1d(w, None::<Tensor>, [1], [0], [1], conv_dim).narrow(2, 1, 1).silu()
                } else {
                    // `causal_conv1d_fn` on the whole window, SiLU, then the last T.
                    full.conv1d(w, None::<Tensor>, [1], [kw - 1], [1], conv_dim).narrow(2, 0, kw + t).silu().narrow(2, kw, t)
                };
                (act, window)
            }
        };
        let conv_out = act.to_kind(mixed.kind()).transpose(1, 2); // [B, T, C]
        let q = conv_out.narrow(-1, 0, kd).reshape([b, t, nk, dk]);
        let k = conv_out.narrow(-1, kd, kd).reshape([b, t, nk, dk]);
        let v = conv_out.narrow(-1, 2 * kd, vd).reshape([b, t, nv, dv]);

        // β in the activation dtype, g in fp32 (`A_log.float()`; dt_bias promotes with a.float()).
        let beta = beta_logits.sigmoid();
        let g = self.a_log.to_kind(Kind::Float).exp().neg() * (a.to_kind(Kind::Float) + &self.dt_bias).softplus();
        // Grouped value attention: key head j serves value heads j·r .. j·r + r-1.
        let rep = nv / nk;
        let (q, k) =
            if rep > 1 { (q.repeat_interleave_self_int(rep, 2, None), k.repeat_interleave_self_int(rep, 2, None)) } else { (q, k) };
        let initial = past.as_ref().map(|(_, s)| s);
        let (o, state) = if initial.is_some() && t == 1 {
            recurrent_gated_delta_rule(&q, &k, &v, &g, &beta, initial)
        } else {
            chunk_gated_delta_rule(&q, &k, &v, &g, &beta, initial, CHUNK_SIZE)
        };
        if let Some(slot) = slot {
            let n = window.size()[2];
            *slot = Some(LayerCache::Linear { conv: window.narrow(2, n - (kw - 1), kw - 1).contiguous(), state });
        }
        let o = gated_rms_norm(&o, &z, &self.norm, eps); // [B, T, nv, dv]
        Ok(self.out_proj.forward(&o.reshape([b, t, vd])))
    }
}

/// transformers' `Qwen3_5RMSNormGated`: `(w · (x32·rsqrt(mean(x32²)+eps)).to(dtype) · silu(z32)).to(dtype)`,
/// normalising before gating, with a plain (not 1+w) weight.
///
/// # Shapes
/// `x`, `gate`: `[..., dv]`, `weight`: `[dv]`; returns the shape and dtype of `x`.
pub fn gated_rms_norm(x: &Tensor, gate: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let dtype = x.kind();
    let x32 = x.to_kind(Kind::Float);
    let var = x32.square().mean_dim(-1, true, Kind::Float);
    let normed = (x32 * (var + eps).rsqrt()).to_kind(dtype);
    (weight * normed * gate.to_kind(Kind::Float).silu()).to_kind(dtype)
}

/// `x · rsqrt(Σx² + 1e-6)` over the last dim (transformers' / FLA's `l2norm`).
fn l2norm(x: &Tensor) -> Tensor {
    x * ((x * x).sum_dim_intlist(-1, true, None::<Kind>) + L2NORM_EPS).rsqrt()
}

/// The kernel inputs in fp32, heads first: `[B, T, H, d] -> [B, H, T, d]`, `[B, T, H] -> [B, H, T]`.
///
/// Like transformers' `x.transpose(1, 2).to(float32, memory_format=contiguous_format)`, an fp32
/// input is *not* copied: `.to` returns the strided view itself when the dtype already matches.
/// Keeping the same strides keeps the reductions that follow (the L2 norm over a strided d) on the
/// same code path, and so bit-identical to transformers; other dtypes get a contiguous fp32 copy.
fn heads_first(x: &Tensor) -> Tensor {
    let x = x.transpose(1, 2);
    if x.kind() == Kind::Float {
        x
    } else {
        x.to_kind(Kind::Float).contiguous()
    }
}

/// The gated delta rule in chunks of `chunk` tokens (the WY/UT form of transformers'
/// `torch_chunk_gated_delta_rule`, with q/k L2-normalised inside): sequential steps drop from T
/// to T/chunk, everything else is batched matmuls.
///
/// # Shapes
/// `q`, `k`: `[B, T, H, dk]` (key heads already repeated to the value heads), `v`: `[B, T, H, dv]`,
/// `g` (log decay, ≤ 0), `beta`: `[B, T, H]`, `initial_state`: `[B, H, dk, dv]`.
/// Returns the output `[B, T, H, dv]` in q's dtype and the final state `[B, H, dk, dv]` in fp32.
pub fn chunk_gated_delta_rule(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
    chunk: i64,
) -> (Tensor, Tensor) {
    let out_kind = q.kind();
    let (b, t, h, dk) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
    let dv = v.size()[3];
    let device = q.device();
    let (q, k, v, beta, g) = (heads_first(q), heads_first(k), heads_first(v), heads_first(beta), heads_first(g));
    let q = l2norm(&q) * (dk as f64).powf(-0.5);
    let k = l2norm(&k);
    // Zero-pad T to a multiple of the chunk: padded steps have k = v = β = 0 and g = 0, so they
    // neither write into nor decay the state.
    let pad = (chunk - t % chunk) % chunk;
    let (q, k, v) = (q.constant_pad_nd([0, 0, 0, pad]), k.constant_pad_nd([0, 0, 0, pad]), v.constant_pad_nd([0, 0, 0, pad]));
    let (beta, g) = (beta.constant_pad_nd([0, pad]), g.constant_pad_nd([0, pad]));
    let n = (t + pad) / chunk;
    let v_beta = &v * beta.unsqueeze(-1);
    let k_beta = &k * beta.unsqueeze(-1);
    let chunks = |x: &Tensor| x.reshape([b, h, n, chunk, x.size()[3]]);
    let (q, k, k_beta, v_beta) = (chunks(&q), chunks(&k), chunks(&k_beta), chunks(&v_beta));
    let g = g.reshape([b, h, n, chunk]);

    let strictly_upper = Tensor::ones([chunk, chunk], (Kind::Bool, device)).triu(1);
    // γ_r = Σ_{s≤r} g_s within the chunk; Γ_rs = exp(γ_r − γ_s) for r ≥ s, else 0.
    let cum = g.cumsum(-1, Kind::Float);
    let pairwise = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(&strictly_upper, f64::NEG_INFINITY).exp();
    let ut_system = k_beta.matmul(&k.transpose(-1, -2)) * &pairwise;
    let intra = q.matmul(&k.transpose(-1, -2)) * &pairwise;
    let decayed_k_beta = &k_beta * cum.exp().unsqueeze(-1);
    // (I + strict_lower(ut_system))⁻¹ applied by a unit-lower triangular solve.
    let new_values = ut_system.linalg_solve_triangular(&v_beta, false, true, true);
    let k_cumdecay = ut_system.linalg_solve_triangular(&decayed_k_beta, false, true, true);

    let mut state = match initial_state {
        Some(s) => s.to_kind(Kind::Float),
        None => Tensor::zeros([b, h, dk, dv], (Kind::Float, device)),
    };
    let q = q * cum.exp().unsqueeze(-1);
    let k = k * (cum.narrow(-1, chunk - 1, 1) - &cum).exp().unsqueeze(-1);
    let chunk_decay = cum.select(-1, chunk - 1).exp().unsqueeze(-1).unsqueeze(-1); // [B, H, N, 1, 1]
    let mut outs = Vec::with_capacity(n as usize);
    for i in 0..n {
        let v_new = new_values.select(2, i) - k_cumdecay.select(2, i).matmul(&state);
        let inter = q.select(2, i).matmul(&state);
        outs.push(inter + intra.select(2, i).matmul(&v_new));
        state = &state * chunk_decay.select(2, i) + k.select(2, i).transpose(-1, -2).matmul(&v_new);
    }
    let out = Tensor::stack(&outs, 2).reshape([b, h, n * chunk, dv]).narrow(2, 0, t).transpose(1, 2).to_kind(out_kind).contiguous();
    (out, state)
}

/// The gated delta rule one token at a time (transformers' `torch_recurrent_gated_delta_rule`,
/// q/k L2-normalised inside): per step `S ← e^g·S; S ← S + k (β(v − Sᵀk))ᵀ; o = Sᵀq`.
///
/// # Shapes
/// As [`chunk_gated_delta_rule`].
pub fn recurrent_gated_delta_rule(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    g: &Tensor,
    beta: &Tensor,
    initial_state: Option<&Tensor>,
) -> (Tensor, Tensor) {
    let out_kind = q.kind();
    let (b, t, h, dk) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
    let dv = v.size()[3];
    let (q, k, v, beta, g) = (heads_first(q), heads_first(k), heads_first(v), heads_first(beta), heads_first(g));
    let q = l2norm(&q) / (dk as f64).sqrt();
    let k = l2norm(&k);
    let mut state = match initial_state {
        Some(s) => s.to_kind(Kind::Float),
        None => Tensor::zeros([b, h, dk, dv], (Kind::Float, q.device())),
    };
    let mut outs = Vec::with_capacity(t as usize);
    for i in 0..t {
        let (q_t, k_t, v_t) = (q.select(2, i), k.select(2, i), v.select(2, i)); // [B, H, d]
        state = &state * g.select(2, i).exp().unsqueeze(-1).unsqueeze(-1);
        let kv_mem = (&state * k_t.unsqueeze(-1)).sum_dim_intlist(-2, false, Kind::Float);
        let delta = (v_t - kv_mem) * beta.select(2, i).unsqueeze(-1);
        state = &state + k_t.unsqueeze(-1) * delta.unsqueeze(-2);
        outs.push((&state * q_t.unsqueeze(-1)).sum_dim_intlist(-2, false, Kind::Float));
    }
    let out = Tensor::stack(&outs, 2).transpose(1, 2).to_kind(out_kind).contiguous();
    (out, state)
}

impl TargetModel for Qwen35Model {
    fn config(&self) -> &TargetConfig {
        &self.cfg
    }

    /// `input.position_ids` may be `[B, T]` (text), `[3, B, T]` (M-RoPE temporal/height/width)
    /// or `[4, B, T]` (a text row, ignored here, then the three M-RoPE rows), as transformers
    /// accepts them.
    fn forward(&self, input: &ForwardInput<'_>, mut cache: Option<&mut Cache>) -> Result<TargetOutput> {
        let l = self.cfg.num_hidden_layers;
        if let Some(c) = cache.as_deref() {
            if c.layers.len() as i64 != l {
                return Err(Error::Input(format!("cache has {} layers, the model {l}", c.layers.len())));
            }
        }
        let past = cache.as_ref().map_or(0, |c| c.seq_len);
        let kind = self.embed_tokens.kind();
        // prepare() knows [B, T] positions only; 3-D M-RoPE positions are checked and used here.
        let mrope_pos = input.position_ids.filter(|p| p.dim() == 3);
        let p = match mrope_pos {
            Some(_) => prepare(&self.cfg, &ForwardInput { position_ids: None, ..*input }, past, kind)?,
            None => prepare(&self.cfg, input, past, kind)?,
        };
        if p.t == 0 || p.b == 0 {
            return Err(Error::Input(format!("input_ids is empty: [{}, {}]", p.b, p.t)));
        }
        let ids = input.input_ids;
        let vocab = self.cfg.vocab_size;
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= vocab {
            return Err(Error::Input(format!("token id out of range 0..{vocab}: saw {lo}..={hi}")));
        }
        let (cos, sin) = match mrope_pos {
            Some(pos) => {
                let s = pos.size();
                let pos = match s.as_slice() {
                    [3, b, t] if *b == p.b && *t == p.t => pos.shallow_clone(),
                    [4, b, t] if *b == p.b && *t == p.t => pos.narrow(0, 1, 3),
                    _ => {
                        return Err(Error::Input(format!(
                            "position_ids must be [{b}, {t}], [3, {b}, {t}] or [4, {b}, {t}], got {s:?}",
                            b = p.b,
                            t = p.t
                        )))
                    }
                };
                self.mrope_cos_sin(&pos, kind)
            }
            None => self.rotary.cos_sin(&p.position_ids, kind),
        };
        // transformers zeroes padded inputs of the linear-attention layers for multi-token
        // forwards only (a decoded token is never padding).
        let pad_mask = match input.attention_mask {
            Some(m) if p.t > 1 => {
                let new = m.narrow(1, p.past, p.t).to_kind(Kind::Int64);
                (new.min().int64_value(&[]) == 0).then_some(new)
            }
            _ => None,
        };

        let mut h = self.embed_tokens.index_select(0, &ids.flatten(0, -1)).view([p.b, p.t, -1]);
        let mut aux: Vec<Option<Tensor>> = input.capture.iter().map(|_| None).collect();
        let mut grab = |k: i64, h: &Tensor| {
            for (slot, &want) in aux.iter_mut().zip(input.capture) {
                if want == k {
                    *slot = Some(h.shallow_clone());
                }
            }
        };
        let eps = self.cfg.rms_norm_eps;
        for (i, layer) in self.layers.iter().enumerate() {
            grab(i as i64, &h);
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let x = rms_norm_zero_centred(&h, &layer.input_layernorm, eps);
            let mixed = match &layer.mixer {
                Mixer::SelfAttn(a) => a.forward(&self.cfg, &x, &cos, &sin, p.mask.as_ref(), slot)?,
                Mixer::LinearAttn(la) => la.forward(&x, pad_mask.as_ref(), eps, slot)?,
            };
            h = &h + mixed;
            let x = rms_norm_zero_centred(&h, &layer.post_attention_layernorm, eps);
            h = &h + layer.mlp.forward(&x);
        }
        grab(l, &h);
        if let Some(c) = cache {
            c.seq_len += p.t;
        }
        let last_hidden = rms_norm_zero_centred(&h, &self.norm, eps);
        Ok(TargetOutput { aux: aux.into_iter().map(|a| a.unwrap_or_else(|| h.shallow_clone())).collect(), last_hidden })
    }

    fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
}
