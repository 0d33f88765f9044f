//! One training-time-test (TTT) step: the teacher, the K-step unroll, the loss and the metrics.
//!
//! Semantics (SpecForge's `OnlineEagle3Model.forward`, with vLLM's EAGLE-3.1 `norm_output`):
//! - Pre-shift once: `ids'[t] = x_{t+1}`, teacher logits `z'[t] = z_{t+1}` (zero row at the end);
//!   the loss mask is not shifted, but each sample's last valid position is cleared: it has no
//!   next-token target (SpecForge's offline loader does the same).
//! - Teacher: `a_t = argmax z'[t]` over the full target vocabulary; `position_mask[t] =
//!   t2d[a_t]·loss_mask[t]`; `p[t] = softmax(z'[t][draft ids])` in fp32. The target lm_head is
//!   applied to the stored post-norm hidden in row chunks, so `[T, V]` fp32 is never held whole.
//! - Step k: tokens `shift^k(ids')` (teacher forcing), hidden = `fc(aux)` at k = 0 and the
//!   draft's own previous hidden after, RoPE positions `t + k`, attention over step-0 keys plus
//!   the diagonal keys of earlier steps ([`crate::draft::attention`]).
//! - Loss: `loss_k = −(1/(B·T)) Σ_{b,t} position_mask_k · Σ_v p_k · log_softmax(logits_k)`, i.e.
//!   forward KL up to the teacher's entropy, normalised by all B·T positions (SpecForge's
//!   normalisation: padded and unsupervised positions count in the denominator); the total is
//!   `Σ_k decay^k · loss_k`.
//! - Metrics: `acc_k = Σ [argmax q_k = argmax p_k]·position_mask_k / Σ loss_mask_k`;
//!   `cond_acc_k` = correct at step k given steps 0..k−1 of the same chain (anchored at the same
//!   position) were correct; simulated acceptance length `1 + Σ_k Π_{i≤k} cond_acc_i` (like vLLM's
//!   mean acceptance length, it counts the bonus token).

use tch::{Kind, Tensor};

use crate::draft::attention::TttKv;
use crate::draft::Eagle3Draft;
use crate::error::{Error, Result};

/// A padded training batch (right padding).
pub struct TttBatch<'a> {
    /// `[B, T]` int64.
    pub input_ids: &'a Tensor,
    /// `[B, T]`: 1 for real tokens.
    pub attention_mask: &'a Tensor,
    /// `[B, T]`: 1 on assistant tokens.
    pub loss_mask: &'a Tensor,
    /// `[B, T, A·Tt]` aux states as stored (bf16).
    pub aux: &'a Tensor,
    /// `[B, T, Tt]` post-norm target hidden as stored.
    pub last_hidden: &'a Tensor,
}

/// Counts behind the metrics, summed over the batch; kept as counts so ranks can add them
/// before any ratio is taken.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepCounts {
    /// Σ correct_k.
    pub acc_correct: Vec<i64>,
    /// Σ loss_mask_k.
    pub acc_denominator: Vec<i64>,
    /// Σ prefix_k (all steps 0..=k correct).
    pub cond_correct: Vec<i64>,
    /// Σ prefix_{k−1}·position_mask_k.
    pub cond_denominator: Vec<i64>,
}

impl StepCounts {
    /// Zeroed counts for `k` steps.
    pub fn zeros(k: usize) -> Self {
        StepCounts { acc_correct: vec![0; k], acc_denominator: vec![0; k], cond_correct: vec![0; k], cond_denominator: vec![0; k] }
    }

    /// Adds `other` element-wise.
    pub fn add(&mut self, other: &StepCounts) {
        for (a, b) in [
            (&mut self.acc_correct, &other.acc_correct),
            (&mut self.acc_denominator, &other.acc_denominator),
            (&mut self.cond_correct, &other.cond_correct),
            (&mut self.cond_denominator, &other.cond_denominator),
        ] {
            if a.len() < b.len() {
                a.resize(b.len(), 0);
            }
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
    }

    fn ratio(n: &[i64], d: &[i64]) -> Vec<f64> {
        n.iter().zip(d).map(|(&n, &d)| n as f64 / d.max(1) as f64).collect()
    }

    /// acc_k per step.
    pub fn acc(&self) -> Vec<f64> {
        Self::ratio(&self.acc_correct, &self.acc_denominator)
    }

    /// cond_acc_k per step.
    pub fn cond_acc(&self) -> Vec<f64> {
        Self::ratio(&self.cond_correct, &self.cond_denominator)
    }

    /// `1 + Σ_k Π_{i≤k} cond_acc_i`.
    pub fn sim_accept_len(&self) -> f64 {
        let mut prod = 1.0;
        let mut total = 1.0;
        for c in self.cond_acc() {
            prod *= c;
            total += prod;
        }
        total
    }

    /// The counts as one flat vector (for an all-reduce) and back.
    pub fn to_flat(&self) -> Vec<i64> {
        [&self.acc_correct[..], &self.acc_denominator, &self.cond_correct, &self.cond_denominator].concat()
    }

    /// Inverse of [`StepCounts::to_flat`].
    pub fn from_flat(v: &[i64]) -> Self {
        let k = v.len() / 4;
        StepCounts {
            acc_correct: v[..k].to_vec(),
            acc_denominator: v[k..2 * k].to_vec(),
            cond_correct: v[2 * k..3 * k].to_vec(),
            cond_denominator: v[3 * k..].to_vec(),
        }
    }
}

/// The result of one TTT forward.
pub struct TttOutput {
    /// `Σ_k decay^k · loss_k`, a scalar with the autograd graph attached.
    pub weighted_loss: Tensor,
    /// `loss_k` per step (detached, f64).
    pub losses: Vec<f64>,
    /// Metric counts.
    pub counts: StepCounts,
    /// Supervised positions at step 0 (Σ position_mask).
    pub positions: i64,
}

/// `x` shifted left by `n` along dim 1, zero-filled at the end.
pub fn shift_left(x: &Tensor, n: i64) -> Tensor {
    if n == 0 {
        return x.shallow_clone();
    }
    let t = x.size()[1];
    let n = n.min(t);
    let mut pad_shape = x.size();
    pad_shape[1] = n;
    Tensor::cat(&[x.narrow(1, n, t - n), Tensor::zeros(pad_shape, (x.kind(), x.device()))], 1)
}

/// The teacher: full-vocabulary argmax and the draft-vocabulary target distribution of
/// `hidden · lm_headᵀ`, in row chunks so at most `chunk_rows × V` fp32 logits exist at once.
///
/// # Shapes
/// `hidden`: `[N, H]`; `lm_head`: `[V, H]`; `draft_ids`: `[Vd]`. Returns (`[N]` int64, `[N, Vd]` f32).
pub fn teacher(hidden: &Tensor, lm_head: &Tensor, draft_ids: &Tensor, chunk_rows: i64) -> (Tensor, Tensor) {
    let n = hidden.size()[0];
    let w = lm_head.to_kind(Kind::Float);
    let mut argmax = Vec::new();
    let mut probs = Vec::new();
    let mut start = 0;
    while start < n {
        let len = chunk_rows.min(n - start);
        let z = hidden.narrow(0, start, len).to_kind(Kind::Float).matmul(&w.tr()); // [len, V]
        argmax.push(z.argmax(-1, false));
        probs.push(z.index_select(1, draft_ids).softmax(-1, Kind::Float));
        start += len;
    }
    (Tensor::cat(&argmax, 0), Tensor::cat(&probs, 0))
}

/// Rows per teacher chunk so that one chunk of fp32 logits stays near 256 MB.
pub fn teacher_chunk_rows(vocab: i64) -> i64 {
    ((64 << 20) / vocab.max(1)).max(1)
}

/// One TTT forward over `batch`: K steps, the weighted loss (with its graph) and the metrics.
///
/// `embed` is the target's token embedding `[V, H]` and `target_lm_head` its output projection
/// `[V, Tt]`, both frozen.
pub fn ttt_forward(
    draft: &Eagle3Draft,
    embed: &Tensor,
    target_lm_head: &Tensor,
    batch: &TttBatch<'_>,
    ttt: usize,
    decay: f64,
) -> Result<TttOutput> {
    let size = batch.input_ids.size();
    if size.len() != 2 {
        return Err(Error::Input(format!("input_ids must be [B, T], got {size:?}")));
    }
    let (b, t) = (size[0], size[1]);
    let cfg = &draft.cfg;
    for (name, x, width) in
        [("aux", batch.aux, cfg.num_aux() * cfg.target_hidden_size), ("last_hidden", batch.last_hidden, cfg.target_hidden_size)]
    {
        if x.size() != [b, t, width] {
            return Err(Error::Shape { name: name.into(), expected: vec![b, t, width], got: x.size(), path: None });
        }
    }
    let device = batch.input_ids.device();
    let compute = draft.fc.kind();

    // Loss mask: real tokens only, and never a sample's last token (no next-token target).
    let attn = batch.attention_mask.to_kind(Kind::Int64);
    let lengths = attn.sum_dim_intlist(1, true, Kind::Int64); // [B, 1]
    let last = (&lengths - 1).clamp_min(0);
    let loss_mask = (batch.loss_mask.to_kind(Kind::Int64) * &attn).scatter_value(1, &last, 0);

    // Teacher on the pre-shifted hidden: z'[t] = z_{t+1}.
    let (argmax, p) = tch::no_grad(|| {
        let lh = shift_left(&batch.last_hidden.to_kind(Kind::Float), 1).view([b * t, -1]);
        teacher(&lh, target_lm_head, &draft.draft_token_ids(), teacher_chunk_rows(cfg.vocab_size))
    });
    let argmax = argmax.view([b, t]);
    let p = p.view([b, t, cfg.draft_vocab_size]);
    let in_draft = draft.t2d.index_select(0, &argmax.flatten(0, -1)).view([b, t]).to_kind(Kind::Int64);
    let position_mask = &in_draft * &loss_mask;
    // Step k's teacher is p shifted left by k (zero rows past the end): one padded copy and a view
    // per step instead of a [B, T, Vd] copy per step; its argmax likewise, computed once.
    let p_padded = Tensor::cat(&[&p, &Tensor::zeros([b, ttt as i64, cfg.draft_vocab_size], (p.kind(), p.device()))], 1);
    let p_argmax = p.argmax(-1, false); // a zero row's argmax is 0, which is also what the shift pads with
    let positions = position_mask.sum(Kind::Int64).int64_value(&[]);

    let ids = shift_left(batch.input_ids, 1);
    let base_pos = Tensor::arange(t, (Kind::Int64, device)).unsqueeze(0).expand([b, t], false);
    let mut hidden = draft.project_hidden_states(&batch.aux.to_kind(compute))?;
    let mut kv = TttKv::new();
    let mut weighted = Tensor::zeros([], (Kind::Float, device));
    let mut losses = Vec::with_capacity(ttt);
    let mut counts = StepCounts::zeros(ttt);
    let mut prefix = Tensor::ones([b, t], (Kind::Bool, device));
    let denom = (b * t) as f64;
    for k in 0..ttt as i64 {
        let ids_k = shift_left(&ids, k);
        let emb = embed.index_select(0, &ids_k.flatten(0, -1)).view([b, t, -1]).to_kind(compute);
        let (cos, sin) = draft.rope(&(&base_pos + k), compute);
        let out = draft.step(&emb, &hidden, &cos, &sin, &mut kv);
        let logits = draft.compute_logits(&out.post).to_kind(Kind::Float); // [B, T, Vd]
        let p_k = p_padded.narrow(1, k, t);
        let mask_k = shift_left(&position_mask, k);
        let ce = -(&p_k * logits.log_softmax(-1, Kind::Float)).sum_dim_intlist(-1, false, Kind::Float); // [B, T]
        let loss_k = (ce * mask_k.to_kind(Kind::Float)).sum(Kind::Float) / denom;
        losses.push(loss_k.double_value(&[]));
        weighted = weighted + &loss_k * decay.powi(k as i32);

        let correct =
            tch::no_grad(|| logits.argmax(-1, false).eq_tensor(&shift_left(&p_argmax, k)).logical_and(&mask_k.to_kind(Kind::Bool)));
        let ku = k as usize;
        counts.acc_correct[ku] = correct.sum(Kind::Int64).int64_value(&[]);
        counts.acc_denominator[ku] = shift_left(&loss_mask, k).sum(Kind::Int64).int64_value(&[]);
        counts.cond_denominator[ku] = prefix.logical_and(&mask_k.to_kind(Kind::Bool)).sum(Kind::Int64).int64_value(&[]);
        prefix = prefix.logical_and(&correct);
        counts.cond_correct[ku] = prefix.sum(Kind::Int64).int64_value(&[]);

        hidden = out.next_hidden(cfg.norm_output).shallow_clone();
    }
    Ok(TttOutput { weighted_loss: weighted, losses, counts, positions })
}
