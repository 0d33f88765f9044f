//! Layers shared by target and draft models: pure tensor code, no I/O.
//!
//! Every function reproduces transformers' numerics (where the casts happen, which dtype a
//! reduction runs in), because aux-state parity with transformers is a hard requirement.

use tch::{Kind, Tensor};

use crate::config::{RopeConfig, RopeScaling};

/// Llama-style RMSNorm: `w * (x32 * rsqrt(mean(x32²) + eps)).to(dtype)` (cast before the weight).
///
/// # Shapes
/// `x`: `[..., D]`, `weight`: `[D]`; returns the shape of `x`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let dtype = x.kind();
    let x32 = x.to_kind(Kind::Float);
    let var = x32.square().mean_dim(-1, true, Kind::Float);
    let normed = (x32 * (var + eps).rsqrt()).to_kind(dtype);
    weight * normed
}

/// Zero-centred RMSNorm (Qwen3.5 / Qwen3-Next, vLLM's GemmaRMSNorm):
/// `(x32 * rsqrt(mean(x32²) + eps) * (1 + w32)).to(dtype)` (multiply in fp32, cast after).
pub fn rms_norm_zero_centred(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let dtype = x.kind();
    let x32 = x.to_kind(Kind::Float);
    let var = x32.square().mean_dim(-1, true, Kind::Float);
    let w = weight.to_kind(Kind::Float) + 1.0;
    (x32 * (var + eps).rsqrt() * w).to_kind(dtype)
}

/// A projection `x Wᵀ + b` (checkpoint tensors `{prefix}.weight`, `{prefix}.bias`).
#[derive(Debug)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, when the architecture has one.
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `x Wᵀ + b`.
    ///
    /// # Shapes
    /// `x`: `[..., in]`; returns `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }
}

/// A SwiGLU MLP (`{prefix}.gate_proj`, `{prefix}.up_proj`, `{prefix}.down_proj`), the one every
/// target and the draft use.
#[derive(Debug)]
pub struct Mlp {
    /// `[I, H]`.
    pub gate_proj: Linear,
    /// `[I, H]`.
    pub up_proj: Linear,
    /// `[H, I]`.
    pub down_proj: Linear,
}

impl Mlp {
    /// `down(silu(gate(x)) * up(x))`.
    ///
    /// # Shapes
    /// `x`: `[..., H]`; returns `[..., H]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down_proj.forward(&(self.gate_proj.forward(x).silu() * self.up_proj.forward(x)))
    }
}

/// Appends this pass's keys and values to the cached ones along the sequence dim:
/// `(cat([past_k, k], 2), cat([past_v, v], 2))`, or `(k, v)` without a past.
///
/// # Shapes
/// `past`: `[B, nkv, S, d]` each, `k`/`v`: `[B, nkv, T, d]`; returns two `[B, nkv, S + T, d]`.
pub fn append_kv(past: Option<(&Tensor, &Tensor)>, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
    match past {
        Some((pk, pv)) => (Tensor::cat(&[pk, k], 2), Tensor::cat(&[pv, v], 2)),
        None => (k.shallow_clone(), v.shallow_clone()),
    }
}

/// Rotary embedding tables for one model.
#[derive(Debug)]
pub struct Rotary {
    /// `[rot_dim / 2]` fp32 inverse frequencies.
    pub inv_freq: Tensor,
    /// Number of rotated dims per head (head_dim × partial_rotary_factor).
    pub rot_dim: i64,
}

impl Rotary {
    /// Builds the inverse frequencies exactly as transformers does (fp32 arithmetic).
    pub fn new(cfg: &RopeConfig, head_dim: i64, device: tch::Device) -> Self {
        let rot_dim = ((head_dim as f64) * cfg.partial_rotary_factor) as i64;
        let exps = Tensor::arange_start_step(0, rot_dim, 2, (Kind::Int64, device)).to_kind(Kind::Float) / (rot_dim as f64);
        let mut inv_freq = Tensor::pow_scalar(cfg.theta, &exps).reciprocal();
        match cfg.scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => inv_freq = inv_freq / factor,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let wavelen = (&inv_freq).reciprocal() * (2.0 * std::f64::consts::PI);
                let scaled = (&inv_freq / factor).where_self(&wavelen.gt(low_wavelen), &inv_freq);
                let smooth = ((wavelen.reciprocal() * old) - low_freq_factor) / (high_freq_factor - low_freq_factor);
                let smoothed = (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
                let medium = wavelen.lt(high_wavelen).logical_not().logical_and(&wavelen.gt(low_wavelen).logical_not());
                inv_freq = smoothed.where_self(&medium, &scaled);
            }
        }
        Rotary { inv_freq, rot_dim }
    }

    /// cos and sin for the given positions, computed in fp32 and cast to `kind`.
    ///
    /// # Shapes
    /// `position_ids`: `[B, T]` (int); returns two `[B, T, rot_dim]`.
    pub fn cos_sin(&self, position_ids: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        // [B, T, 1] x [1, 1, rot/2]: an outer product, as transformers' fp32 matmul computes it.
        let pos = position_ids.to_kind(Kind::Float).unsqueeze(-1);
        let freqs = pos * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

/// `[-x2, x1]` for `x = [x1, x2]` split in halves on the last dim.
pub fn rotate_half(x: &Tensor) -> Tensor {
    let d = x.size()[x.dim() - 1];
    let x1 = x.narrow(-1, 0, d / 2);
    let x2 = x.narrow(-1, d / 2, d - d / 2);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

/// Applies RoPE to the first `cos.size(-1)` dims of `x`; the rest pass unchanged.
///
/// # Shapes
/// `x`: `[B, heads, T, head_dim]`, `cos`/`sin`: `[B, T, rot_dim]`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let rot = cos.size()[2];
    let d = x.size()[3];
    let cos = cos.unsqueeze(1);
    let sin = sin.unsqueeze(1);
    if rot == d {
        return x * &cos + rotate_half(x) * &sin;
    }
    let xr = x.narrow(-1, 0, rot);
    let xp = x.narrow(-1, rot, d - rot);
    Tensor::cat(&[&(&xr * &cos + rotate_half(&xr) * &sin), &xp], -1)
}

/// Repeats key/value heads for grouped-query attention: `[B, nkv, S, d] -> [B, nkv·n_rep, S, d]`.
pub fn repeat_kv(x: &Tensor, n_rep: i64) -> Tensor {
    if n_rep == 1 {
        return x.shallow_clone();
    }
    let s = x.size();
    x.unsqueeze(2).expand([s[0], s[1], n_rep, s[2], s[3]], false).reshape([s[0], s[1] * n_rep, s[2], s[3]])
}

/// The most negative finite value of a float kind (what transformers fills masked scores with).
pub fn min_value(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// An additive attention mask `[B, 1, T, S]` for T queries at positions `past..past+T` over S =
/// past + T keys: 0 where key j ≤ query position and the key is not padding, the dtype's minimum
/// elsewhere. Fully masked rows (left-padding queries) stay finite, so no NaN can spread.
///
/// `attention_mask`: `[B, S]`, 1 for real tokens, 0 for padding.
pub fn causal_padding_mask(attention_mask: &Tensor, t: i64, past: i64, kind: Kind) -> Tensor {
    let device = attention_mask.device();
    let s = past + t;
    let q_pos = Tensor::arange_start(past, s, (Kind::Int64, device)).view([t, 1]);
    let k_pos = Tensor::arange(s, (Kind::Int64, device)).view([1, s]);
    let causal = k_pos.le_tensor(&q_pos).view([1, 1, t, s]);
    let keep = attention_mask.to_kind(Kind::Bool).view([-1, 1, 1, s]).logical_and(&causal);
    Tensor::zeros(keep.size(), (kind, device)).masked_fill(&keep.logical_not(), min_value(kind))
}

/// Scaled dot-product attention with GQA: `softmax(q kᵀ · d^-½ + mask) v`, softmax in fp32.
///
/// # Shapes
/// `q`: `[B, nh, T, d]`, `k`/`v`: `[B, nkv, S, d]`, `mask`: `[B, 1, T, S]` additive or `None`
/// for plain causal (`T == S`) or unmasked (`T == 1`) attention. Returns `[B, nh, T, d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, scale: f64) -> Tensor {
    let n_rep = q.size()[1] / k.size()[1];
    let k = repeat_kv(k, n_rep);
    let v = repeat_kv(v, n_rep);
    let t = q.size()[2];
    let is_causal = mask.is_none() && t > 1;
    Tensor::scaled_dot_product_attention(q, &k, &v, mask, 0.0, is_causal, scale, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn rotary_matches_closed_form() {
        let cfg = RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::Default,
            partial_rotary_factor: 1.0,
            mrope_section: None,
            mrope_interleaved: false,
        };
        let r = Rotary::new(&cfg, 8, Device::Cpu);
        let inv: Vec<f32> = Vec::try_from(&r.inv_freq).unwrap();
        for (i, f) in inv.iter().enumerate() {
            let want = 1.0 / 10000f64.powf(2.0 * i as f64 / 8.0);
            assert!((*f as f64 - want).abs() < 1e-7 * want.max(1.0), "{i}: {f} vs {want}");
        }
    }

    #[test]
    fn mask_blocks_future_and_padding() {
        let am = Tensor::from_slice(&[0i64, 1, 1]).view([1, 3]);
        let m = causal_padding_mask(&am, 3, 0, Kind::Float);
        let keep: Vec<bool> = Vec::try_from(m.eq(0.0).flatten(0, -1)).unwrap();
        // rows: query 0..3, cols: keys 0..3
        assert_eq!(keep, vec![false, false, false, false, true, false, false, true, true]);
    }
}
