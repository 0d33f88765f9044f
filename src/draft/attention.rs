//! Attention across TTT steps.
//!
//! At TTT step k the query at position p attends to the step-0 keys `K_0[p']` for `p' ≤ p`
//! (causal) and to the *diagonal* keys `K_j[p]` of steps j = 1..k (same position, earlier steps),
//! with one softmax over the `T + k` scores (SpecForge's cache-list semantics). Written as a
//! dense mask over `cat(K_0..K_k)` this costs `(k+1)·T` keys per query; [`TttKv::attend`] instead
//! computes the `T × T` causal scores once and the k diagonal scores as row-wise dot products,
//! joins them in one softmax and splits the weights again. [`TttKv::attend_dense`] keeps the
//! dense-mask form as the reference the tests compare against.

use tch::{Kind, Tensor};

/// Keys and values of the TTT steps so far, each `[B, nkv, T, d]` (after RoPE, before GQA).
#[derive(Default)]
pub struct TttKv {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

impl TttKv {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of steps stored.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no step is stored.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Adds the current step's keys and values.
    pub fn push(&mut self, k: Tensor, v: Tensor) {
        self.keys.push(k);
        self.values.push(v);
    }

    /// Efficient attention for the latest step.
    ///
    /// # Shapes
    /// `q`: `[B, nh, T, d]`; returns `[B, nh, T, d]`.
    pub fn attend(&self, q: &Tensor, scale: f64) -> Tensor {
        let (b, nh, t, d) = dims4(q);
        let nkv = self.keys[0].size()[1];
        let rep = nh / nkv;
        // Group query heads by their kv head instead of repeating K/V: [B, nkv, rep, T, d].
        let qg = q.view([b, nkv, rep, t, d]);
        let k0 = self.keys[0].unsqueeze(2);
        let v0 = self.values[0].unsqueeze(2);
        let causal = Tensor::ones([t, t], (Kind::Bool, q.device())).triu(1);
        let s0 = (qg.matmul(&k0.transpose(-1, -2)) * scale).masked_fill(&causal, f64::NEG_INFINITY); // [B, nkv, rep, T, T]
        let mut scores = vec![s0];
        for kj in &self.keys[1..] {
            scores.push((&qg * kj.unsqueeze(2)).sum_dim_intlist(-1, true, None) * scale);
            // [B, nkv, rep, T, 1]
        }
        let probs = Tensor::cat(&scores, -1).softmax(-1, softmax_kind(q.kind())).to_kind(q.kind()); // [B, nkv, rep, T, T + k]
        let mut o = probs.narrow(-1, 0, t).matmul(&v0);
        for (j, vj) in self.values[1..].iter().enumerate() {
            o = o + probs.narrow(-1, t + j as i64, 1) * vj.unsqueeze(2);
        }
        o.view([b, nh, t, d])
    }

    /// Reference: the same attention as one dense `[T, (k+1)·T]` mask over all stored keys.
    pub fn attend_dense(&self, q: &Tensor, scale: f64) -> Tensor {
        let (b, nh, t, d) = dims4(q);
        let nkv = self.keys[0].size()[1];
        let steps = self.keys.len() as i64;
        let rep = nh / nkv;
        let expand = |x: &Tensor| crate::nn::repeat_kv(x, rep);
        let k = expand(&Tensor::cat(&self.keys, 2)); // [B, nh, (k+1)T, d]
        let v = expand(&Tensor::cat(&self.values, 2));
        let device = q.device();
        let qpos = Tensor::arange(t, (Kind::Int64, device)).view([t, 1]);
        let kpos = Tensor::arange(steps * t, (Kind::Int64, device)).view([1, steps * t]);
        let kstep = kpos.divide_scalar_mode(t, "floor");
        let kp = kpos.remainder(t);
        let allowed = kstep.eq(0).logical_and(&kp.le_tensor(&qpos)).logical_or(&kstep.gt(0).logical_and(&kp.eq_tensor(&qpos)));
        let scores = (q.matmul(&k.transpose(-1, -2)) * scale).masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
        let o = scores.softmax(-1, softmax_kind(q.kind())).to_kind(q.kind()).matmul(&v);
        o.view([b, nh, t, d])
    }
}

/// Softmax runs in fp32 for half-precision inputs (as SpecForge's eager attention does) and in
/// the input's own precision otherwise.
fn softmax_kind(k: Kind) -> Kind {
    if k == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

fn dims4(x: &Tensor) -> (i64, i64, i64, i64) {
    let s = x.size();
    (s[0], s[1], s[2], s[3])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The efficient form equals the dense-mask reference, forward and backward, at every step.
    #[test]
    fn efficient_equals_dense_forward_and_backward() {
        tch::manual_seed(3);
        let (b, nh, nkv, t, d) = (2, 4, 2, 9, 8);
        let opts = (Kind::Double, Device::Cpu);
        let mut kv = TttKv::new();
        let mut kv_dense = TttKv::new();
        let mut leaves = Vec::new();
        for _ in 0..4 {
            let k = Tensor::randn([b, nkv, t, d], opts).set_requires_grad(true);
            let v = Tensor::randn([b, nkv, t, d], opts).set_requires_grad(true);
            let q = Tensor::randn([b, nh, t, d], opts).set_requires_grad(true);
            kv.push(k.shallow_clone(), v.shallow_clone());
            kv_dense.push(k.shallow_clone(), v.shallow_clone());
            leaves.extend([k, v, q.shallow_clone()]);
            let w = Tensor::randn([b, nh, t, d], opts);
            let fast = kv.attend(&q, 0.3);
            let dense = kv_dense.attend_dense(&q, 0.3);
            let diff = (&fast - &dense).abs().max().double_value(&[]);
            assert!(diff < 1e-12, "forward differs by {diff} at step {}", kv.len() - 1);
            let gf = Tensor::run_backward(&[(&fast * &w).sum(Kind::Double)], &leaves, true, false);
            let gd = Tensor::run_backward(&[(&dense * &w).sum(Kind::Double)], &leaves, true, false);
            for (x, y) in gf.iter().zip(&gd) {
                // Earlier steps' queries do not reach this step's output in either form.
                assert_eq!(x.defined(), y.defined());
                if !x.defined() {
                    continue;
                }
                let diff = (x - y).abs().max().double_value(&[]);
                assert!(diff < 1e-12, "gradient differs by {diff} at step {}", kv.len() - 1);
            }
        }
    }
}
