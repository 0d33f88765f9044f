//! AdamW with fp32 state we can save (tch's optimizer state cannot be serialised), a cosine
//! schedule with linear warmup, and clipping on the global gradient norm.
//!
//! The update is PyTorch's `torch.optim.AdamW` (single-tensor path) step for step:
//! `p ← p·(1 − lr·wd)`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! `p ← p − lr/(1−β1^t) · m / (√v/√(1−β2^t) + ε)`. Parameters are kept in fp32 (they are the
//! master weights; bf16 enters only through autocast on a GPU).

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only.
    pub weight_decay: f64,
}

/// The optimizer and its state.
pub struct AdamW {
    cfg: AdamWConfig,
    /// Optimizer steps taken.
    pub step: i64,
    state: BTreeMap<String, (Tensor, Tensor)>,
}

impl AdamW {
    /// Zero state for `params`.
    pub fn new(params: &[(String, Tensor)], cfg: AdamWConfig) -> Self {
        let state = params
            .iter()
            .map(|(n, p)| (n.clone(), (Tensor::zeros_like(p).to_kind(Kind::Float), Tensor::zeros_like(p).to_kind(Kind::Float))))
            .collect();
        AdamW { cfg, step: 0, state }
    }

    /// One update of every parameter from its `.grad()`; parameters without a gradient are
    /// left alone (their moments do not advance, as in PyTorch).
    pub fn step(&mut self, params: &[(String, Tensor)], lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        tch::no_grad(|| -> Result<()> {
            for (name, p) in params {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let (m, v) = self.state.get_mut(name).ok_or_else(|| Error::Input(format!("optimizer has no state for `{name}`")))?;
                let mut p = p.shallow_clone();
                let g = g.to_kind(Kind::Float);
                if c.weight_decay != 0.0 && p.dim() >= 2 {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = m.g_mul_scalar_(c.beta1).g_add_(&(&g * (1.0 - c.beta1)));
                let _ = v.g_mul_scalar_(c.beta2).g_add_(&(&g * &g * (1.0 - c.beta2)));
                let denom = v.sqrt() / bc2_sqrt + c.eps;
                let _ = p.g_sub_(&((&*m / denom) * (lr / bc1)).to_kind(p.kind()));
            }
            Ok(())
        })
    }

    /// State as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::with_capacity(self.state.len() * 2);
        for (n, (m, s)) in &self.state {
            v.push((format!("exp_avg.{n}"), m.shallow_clone()));
            v.push((format!("exp_avg_sq.{n}"), s.shallow_clone()));
        }
        v
    }

    /// Restores state saved by [`AdamW::state_tensors`]; every parameter must be present.
    pub fn load_state(&mut self, tensors: &BTreeMap<String, Tensor>, step: i64) -> Result<()> {
        tch::no_grad(|| -> Result<()> {
            for (n, (m, s)) in self.state.iter_mut() {
                for (prefix, dst) in [("exp_avg", m), ("exp_avg_sq", s)] {
                    let key = format!("{prefix}.{n}");
                    let src = tensors
                        .get(&key)
                        .ok_or_else(|| Error::MissingTensors { path: "optimizer state".into(), names: vec![key.clone()] })?;
                    if src.size() != dst.size() {
                        return Err(Error::Shape { name: key, expected: dst.size(), got: src.size(), path: None });
                    }
                    dst.f_copy_(src)?;
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// Linear warmup over `warmup` steps to `peak`, then cosine to `min_lr` at `total` steps.
/// `step` counts from 0 (the learning rate used for the first update).
pub fn lr_at(step: u64, total: u64, warmup: u64, peak: f64, min_lr: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    min_lr + 0.5 * (peak - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Clips gradients in place to a global L2 norm of `max_norm` (0 = no clipping) and returns
/// the norm before clipping (PyTorch's `clip_grad_norm_`).
pub fn clip_grad_norm(params: &[(String, Tensor)], max_norm: f64) -> f64 {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = params.iter().map(|(_, p)| p.grad()).filter(Tensor::defined).collect();
        if grads.is_empty() {
            return 0.0;
        }
        let sq: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float)).collect();
        let total = Tensor::stack(&sq, 0).sum(Kind::Float).sqrt().double_value(&[]);
        if max_norm > 0.0 {
            let coef = (max_norm / (total + 1e-6)).min(1.0);
            for g in &grads {
                let _ = g.shallow_clone().g_mul_scalar_(coef);
            }
        }
        total
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn schedule_shape() {
        assert!((lr_at(0, 100, 10, 1.0, 0.0) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
        assert!((lr_at(55, 100, 10, 1.0, 0.0) - 0.5).abs() < 1e-12);
        assert!(lr_at(100, 100, 10, 1.0, 0.1) - 0.1 < 1e-12);
    }

    /// Three steps against closed-form PyTorch AdamW arithmetic on a 2-element parameter.
    #[test]
    fn adamw_matches_pytorch_arithmetic() {
        let mut p = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
        let params = vec![("w".to_string(), p.shallow_clone())];
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut opt = AdamW::new(&params, cfg);
        let (mut w, mut m, mut v) = ([1.0f64, -2.0], [0.0f64; 2], [0.0f64; 2]);
        for t in 1..=3 {
            let loss = (&p * &p).sum(Kind::Float) * 0.5; // grad = p
            p.zero_grad();
            loss.backward();
            opt.step(&params, 0.1).unwrap();
            for i in 0..2 {
                let g = w[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let denom = v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
                w[i] -= 0.1 / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
            }
        }
        let got: Vec<f32> = Vec::try_from(&p.detach()).unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - w[i]).abs() < 1e-6, "{got:?} vs {w:?}");
        }
        let _ = Device::Cpu;
    }
}
