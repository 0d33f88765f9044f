//! Dense decoder targets: Llama, Qwen2 / Qwen2.5 and Qwen3.
//!
//! Mirrors transformers' `LlamaForCausalLM`, `Qwen2ForCausalLM` and `Qwen3ForCausalLM`:
//! - pre-norm decoder layers, RMSNorm cast before the weight multiply;
//! - GQA attention with RoPE (default / linear / llama3 scaling), SwiGLU MLP;
//! - Qwen2: q/k/v bias; Llama: optional attention and MLP biases; Qwen3: per-head q/k RMSNorm
//!   before RoPE;
//! - tied or untied `lm_head`.
//!
//! Field names equal the checkpoint's tensor names (`layers.{i}.self_attn.q_proj.weight` ...).

use tch::{Device, Kind, Tensor};

use super::{check_capture, default_positions, Cache, ForwardInput, LayerCache, TargetModel, TargetOutput};
use crate::config::TargetConfig;
use crate::error::{Error, Result};
use crate::nn::{append_kv, apply_rotary, attention, causal_padding_mask, rms_norm, Linear, Mlp, Rotary};
use crate::weights::{Loader, WeightSource};

/// Loads a projection: `{prefix}.weight` (`[out, inp]`) and, when `bias`, `{prefix}.bias` (`[out]`).
pub(crate) fn load_linear(l: &mut Loader<'_>, prefix: &str, out: i64, inp: i64, bias: bool) -> Linear {
    let weight = l.backbone(&format!("{prefix}.weight"), &[out, inp]);
    let bias = bias.then(|| l.backbone(&format!("{prefix}.bias"), &[out]));
    Linear { weight, bias }
}

/// Loads a SwiGLU MLP (`{prefix}.gate_proj` / `up_proj` `[i, h]`, `{prefix}.down_proj` `[h, i]`).
pub(crate) fn load_mlp(l: &mut Loader<'_>, prefix: &str, h: i64, i: i64, bias: bool) -> Mlp {
    Mlp {
        gate_proj: load_linear(l, &format!("{prefix}.gate_proj"), i, h, bias),
        up_proj: load_linear(l, &format!("{prefix}.up_proj"), i, h, bias),
        down_proj: load_linear(l, &format!("{prefix}.down_proj"), h, i, bias),
    }
}

/// Self-attention of one dense layer.
#[derive(Debug)]
pub struct SelfAttn {
    /// `[nh·d, H]`.
    pub q_proj: Linear,
    /// `[nkv·d, H]`.
    pub k_proj: Linear,
    /// `[nkv·d, H]`.
    pub v_proj: Linear,
    /// `[H, nh·d]`.
    pub o_proj: Linear,
    /// Qwen3 per-head norm weights `[d]`.
    pub q_norm: Option<Tensor>,
    /// Qwen3 per-head norm weights `[d]`.
    pub k_norm: Option<Tensor>,
}

/// One pre-norm decoder layer.
#[derive(Debug)]
pub struct DenseLayer {
    /// Attention.
    pub self_attn: SelfAttn,
    /// MLP.
    pub mlp: Mlp,
    /// `[H]`.
    pub input_layernorm: Tensor,
    /// `[H]`.
    pub post_attention_layernorm: Tensor,
}

/// A dense decoder-only target.
#[derive(Debug)]
pub struct DenseModel {
    cfg: TargetConfig,
    /// `[V, H]`.
    pub embed_tokens: Tensor,
    /// Decoder layers.
    pub layers: Vec<DenseLayer>,
    /// Final norm `[H]`.
    pub norm: Tensor,
    /// `[V, H]`; the embedding itself when tied.
    pub lm_head: Tensor,
    rotary: Rotary,
}

impl DenseModel {
    /// Loads every tensor, reporting all missing, misshapen and unexpected ones at once.
    pub fn load(cfg: TargetConfig, src: &WeightSource, kind: Kind, device: Device) -> Result<Self> {
        let mut l = Loader::new(src, kind, device);
        let (h, d, nh, nkv) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let embed_tokens = l.backbone("embed_tokens.weight", &[cfg.vocab_size, h]);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("layers.{i}");
                DenseLayer {
                    self_attn: SelfAttn {
                        q_proj: load_linear(&mut l, &format!("{p}.self_attn.q_proj"), nh * d, h, cfg.qkv_bias),
                        k_proj: load_linear(&mut l, &format!("{p}.self_attn.k_proj"), nkv * d, h, cfg.qkv_bias),
                        v_proj: load_linear(&mut l, &format!("{p}.self_attn.v_proj"), nkv * d, h, cfg.qkv_bias),
                        o_proj: load_linear(&mut l, &format!("{p}.self_attn.o_proj"), h, nh * d, cfg.o_bias),
                        q_norm: cfg.qk_norm.then(|| l.backbone(&format!("{p}.self_attn.q_norm.weight"), &[d])),
                        k_norm: cfg.qk_norm.then(|| l.backbone(&format!("{p}.self_attn.k_norm.weight"), &[d])),
                    },
                    mlp: load_mlp(&mut l, &format!("{p}.mlp"), h, cfg.intermediate_size, cfg.mlp_bias),
                    input_layernorm: l.backbone(&format!("{p}.input_layernorm.weight"), &[h]),
                    post_attention_layernorm: l.backbone(&format!("{p}.post_attention_layernorm.weight"), &[h]),
                }
            })
            .collect();
        let norm = l.backbone("norm.weight", &[h]);
        let lm_head = if cfg.tie_word_embeddings && !src.contains("lm_head.weight") {
            embed_tokens.shallow_clone()
        } else {
            l.exact("lm_head.weight", &[cfg.vocab_size, h])
        };
        l.finish(&[])?;
        let rotary = Rotary::new(&cfg.rope, d, device);
        Ok(DenseModel { cfg, embed_tokens, layers, norm, lm_head, rotary })
    }

    fn attn(
        &self,
        layer: &DenseLayer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<LayerCache>>,
    ) -> Result<Tensor> {
        let (b, t) = (x.size()[0], x.size()[1]);
        let c = &self.cfg;
        let a = &layer.self_attn;
        let heads = |y: Tensor, n: i64| y.view([b, t, n, c.head_dim]);
        let mut q = heads(a.q_proj.forward(x), c.num_attention_heads); // [B, T, nh, d]
        let mut k = heads(a.k_proj.forward(x), c.num_key_value_heads);
        let v = heads(a.v_proj.forward(x), c.num_key_value_heads).transpose(1, 2);
        if let (Some(qn), Some(kn)) = (&a.q_norm, &a.k_norm) {
            q = rms_norm(&q, qn, c.rms_norm_eps);
            k = rms_norm(&k, kn, c.rms_norm_eps);
        }
        let q = apply_rotary(&q.transpose(1, 2), cos, sin); // [B, nh, T, d]
        let k = apply_rotary(&k.transpose(1, 2), cos, sin); // [B, nkv, T, d]
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let past = match slot.take() {
                    None => None,
                    Some(LayerCache::Kv { k, v }) => Some((k, v)),
                    Some(LayerCache::Linear { .. }) => {
                        return Err(Error::Input("a linear-attention cache was passed to an attention layer".into()))
                    }
                };
                let (k, v) = append_kv(past.as_ref().map(|(pk, pv)| (pk, pv)), &k, &v);
                *slot = Some(LayerCache::Kv { k: k.shallow_clone(), v: v.shallow_clone() });
                (k, v)
            }
        };
        let o = attention(&q, &k, &v, mask, 1.0 / (c.head_dim as f64).sqrt()); // [B, nh, T, d]
        Ok(a.o_proj.forward(&o.transpose(1, 2).reshape([b, t, c.num_attention_heads * c.head_dim])))
    }
}

/// Shared by the dense and hybrid targets: validates inputs, resolves positions and the mask.
pub(crate) struct Prepared {
    pub b: i64,
    pub t: i64,
    pub past: i64,
    pub position_ids: Tensor,
    /// Additive `[B, 1, T, past+T]` mask, or `None` when plain causal attention is exact.
    pub mask: Option<Tensor>,
}

pub(crate) fn prepare(cfg: &TargetConfig, input: &ForwardInput<'_>, past: i64, kind: Kind) -> Result<Prepared> {
    check_capture(input.capture, cfg.num_hidden_layers)?;
    let size = input.input_ids.size();
    if size.len() != 2 {
        return Err(Error::Input(format!("input_ids must be [B, T], got {size:?}")));
    }
    let (b, t) = (size[0], size[1]);
    let device = input.input_ids.device();
    if let Some(m) = input.attention_mask {
        if m.size() != [b, past + t] {
            return Err(Error::Input(format!("attention_mask must be [{b}, {}] (past + new), got {:?}", past + t, m.size())));
        }
    }
    let position_ids = match input.position_ids {
        Some(p) if p.size() == [b, t] => p.shallow_clone(),
        Some(p) => return Err(Error::Input(format!("position_ids must be [{b}, {t}], got {:?}", p.size()))),
        None => default_positions(b, t, past, device),
    };
    // Padding needs an explicit mask; so does a multi-token step on top of a cache.
    let padded = match input.attention_mask {
        Some(m) => m.min().int64_value(&[]) == 0,
        None => false,
    };
    let mask = if padded || (past > 0 && t > 1) {
        let ones;
        let m = match input.attention_mask {
            Some(m) => m,
            None => {
                ones = Tensor::ones([b, past + t], (Kind::Int64, device));
                &ones
            }
        };
        Some(causal_padding_mask(m, t, past, kind))
    } else {
        None
    };
    Ok(Prepared { b, t, past, position_ids, mask })
}

impl TargetModel for DenseModel {
    fn config(&self) -> &TargetConfig {
        &self.cfg
    }

    fn forward(&self, input: &ForwardInput<'_>, mut cache: Option<&mut Cache>) -> Result<TargetOutput> {
        let past = cache.as_ref().map_or(0, |c| c.seq_len);
        let kind = self.embed_tokens.kind();
        let p = prepare(&self.cfg, input, past, kind)?;
        let vocab = self.cfg.vocab_size;
        let ids = input.input_ids;
        if ids.numel() > 0 {
            let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
            if lo < 0 || hi >= vocab {
                return Err(Error::Input(format!("token id out of range 0..{vocab}: saw {lo}..={hi}")));
            }
        }
        let (cos, sin) = self.rotary.cos_sin(&p.position_ids, kind);
        let mut h = self.embed_tokens.index_select(0, &ids.flatten(0, -1)).view([p.b, p.t, -1]);
        let mut aux: Vec<Option<Tensor>> = input.capture.iter().map(|_| None).collect();
        let mut grab = |k: i64, h: &Tensor| {
            for (slot, &want) in aux.iter_mut().zip(input.capture) {
                if want == k {
                    *slot = Some(h.shallow_clone());
                }
            }
        };
        for (i, layer) in self.layers.iter().enumerate() {
            grab(i as i64, &h);
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let x = rms_norm(&h, &layer.input_layernorm, self.cfg.rms_norm_eps);
            h = h + self.attn(layer, &x, &cos, &sin, p.mask.as_ref(), slot)?;
            let x = rms_norm(&h, &layer.post_attention_layernorm, self.cfg.rms_norm_eps);
            h = &h + layer.mlp.forward(&x);
        }
        grab(self.cfg.num_hidden_layers, &h);
        if let Some(c) = cache {
            c.seq_len += p.t;
        }
        let last_hidden = rms_norm(&h, &self.norm, self.cfg.rms_norm_eps);
        Ok(TargetOutput { aux: aux.into_iter().map(|a| a.unwrap_or_else(|| h.shallow_clone())).collect(), last_hidden })
    }

    fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    fn lm_head(&self) -> &Tensor {
        &self.lm_head
    }
}
