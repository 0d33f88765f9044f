//! Evaluation (the `eval` stage, docs/architecture.md): speculative decoding with the target and
//! a draft head, greedy, chain of k drafts, and the acceptance statistics vLLM reports.
//!
//! One engine serves both uses:
//! - `generate --draft` verifies the drafts with the target's own greedy choice: the output is
//!   exactly the target's greedy continuation (lossless), produced with fewer target steps;
//! - `eval` verifies against a reference continuation (held-out target-generated answers), so
//!   when that continuation is the target's greedy output both runs perform the same forwards
//!   and report the same statistics.
//!
//! The draft runs as the servers run it: its KV cache holds the context positions, each computed
//! from `fc(aux_t)` and the embedding of token t+1; drafting step j at position L−1+j feeds the
//! previous step's hidden (post-norm for EAGLE-3.1's `norm_output`) and the embedding of the token
//! just drafted, and attends to the context plus the earlier draft steps.

pub mod stage;

pub use stage::{evaluate, EvalJob, EvalResult};

use tch::{Device, Kind, Tensor};

use crate::draft::Eagle3Draft;
use crate::error::{Error, Result};
use crate::target::{Cache, ForwardInput, LayerCache, TargetModel};

/// vLLM's speculative-decoding counters (`vllm:spec_decode_*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SpecStats {
    /// Verification steps that carried drafts.
    pub num_drafts: u64,
    /// Draft tokens proposed.
    pub num_draft_tokens: u64,
    /// Draft tokens accepted.
    pub num_accepted_tokens: u64,
    /// `[k]`: how many verification steps accepted at least i+1 drafts.
    pub accepted_per_pos: Vec<u64>,
}

impl SpecStats {
    /// Adds another run's counters.
    pub fn add(&mut self, o: &SpecStats) {
        self.num_drafts += o.num_drafts;
        self.num_draft_tokens += o.num_draft_tokens;
        self.num_accepted_tokens += o.num_accepted_tokens;
        if self.accepted_per_pos.len() < o.accepted_per_pos.len() {
            self.accepted_per_pos.resize(o.accepted_per_pos.len(), 0);
        }
        self.accepted_per_pos.iter_mut().zip(&o.accepted_per_pos).for_each(|(a, b)| *a += b);
    }

    /// `1 + accepted / drafts` (the bonus token included), vLLM's mean acceptance length.
    pub fn mean_acceptance_length(&self) -> f64 {
        1.0 + self.num_accepted_tokens as f64 / self.num_drafts.max(1) as f64
    }

    /// `accepted_per_pos[i] / drafts`: the fraction of steps whose first i+1 drafts were accepted.
    pub fn per_position_rate(&self) -> Vec<f64> {
        self.accepted_per_pos.iter().map(|&a| a as f64 / self.num_drafts.max(1) as f64).collect()
    }

    /// `accepted / draft tokens`.
    pub fn draft_acceptance_rate(&self) -> f64 {
        self.num_accepted_tokens as f64 / self.num_draft_tokens.max(1) as f64
    }
}

/// How drafts are verified.
pub enum Verify<'a> {
    /// By the target's greedy choice (real speculative decoding).
    Target,
    /// Against a given continuation of the prompt (offline evaluation).
    Reference(&'a [i64]),
}

/// Greedy chain speculative decoding of one sequence.
pub struct SpecDecoder<'a> {
    target: &'a dyn TargetModel,
    draft: &'a Eagle3Draft,
    /// Drafts per step.
    pub k: usize,
    /// Tokens that end the answer (included in it).
    pub stop_ids: Vec<i64>,
    device: Device,
}

/// The draft's inference cache: context keys/values `[1, nkv, S, d]` and the last context output.
struct DraftState {
    k: Tensor,
    v: Tensor,
    /// Post-norm and pre-norm outputs at the last context position, `[1, 1, H]`.
    last_post: Tensor,
    last_out: Tensor,
}

impl<'a> SpecDecoder<'a> {
    /// A decoder drafting `k` tokens per step.
    pub fn new(target: &'a dyn TargetModel, draft: &'a Eagle3Draft, k: usize, stop_ids: Vec<i64>, device: Device) -> Result<Self> {
        let (tc, dc) = (target.config(), &draft.cfg);
        if tc.hidden_size != dc.target_hidden_size || tc.vocab_size != dc.vocab_size {
            return Err(Error::Input(format!(
                "draft expects a target with hidden {} and vocab {}, this target has {} and {}",
                dc.target_hidden_size, dc.vocab_size, tc.hidden_size, tc.vocab_size
            )));
        }
        if let Some(bad) = dc.aux_layer_ids.iter().find(|&&k| k < 0 || k > tc.num_hidden_layers) {
            return Err(Error::Input(format!("draft aux id {bad} is out of range for a {}-layer target", tc.num_hidden_layers)));
        }
        if k == 0 {
            return Err(Error::Input("k must be at least 1".into()));
        }
        Ok(SpecDecoder { target, draft, k, stop_ids, device })
    }

    fn ids(&self, tokens: &[i64]) -> Tensor {
        Tensor::from_slice(tokens).view([1, -1]).to_device(self.device)
    }

    /// Target forward on `tokens` with the cache, returning aux `[1, T, A·H]` and logits `[T, V]`.
    fn target_step(&self, tokens: &[i64], cache: &mut Cache) -> Result<(Tensor, Tensor)> {
        let ids = self.ids(tokens);
        let o = self.target.forward(
            &ForwardInput { input_ids: &ids, attention_mask: None, position_ids: None, capture: &self.draft.cfg.aux_layer_ids },
            Some(cache),
        )?;
        let aux = Tensor::cat(&o.aux, -1);
        let logits = self.target.logits(&o.last_hidden).squeeze_dim(0);
        Ok((aux, logits))
    }

    /// Draft context pass over positions `start..start+n`: aux `[1, n, A·H]`, next tokens `[n]`.
    fn draft_context(&self, state: Option<DraftState>, aux: &Tensor, next_tokens: &[i64], start: i64) -> Result<DraftState> {
        let d = self.draft;
        let kind = d.fc.kind();
        let hidden = d.project_hidden_states(&aux.to_kind(kind))?;
        let emb = self.embed(next_tokens, kind);
        let n = next_tokens.len() as i64;
        let pos = Tensor::arange_start(start, start + n, (Kind::Int64, self.device)).unsqueeze(0);
        let (cos, sin) = d.rope(&pos, kind);
        let past = state.as_ref().map(|s| (&s.k, &s.v));
        let (out, k, v) = d.step_cached(&emb, &hidden, &cos, &sin, past);
        let (k, v) = crate::nn::append_kv(past, &k, &v);
        Ok(DraftState { k, v, last_post: out.post.narrow(1, n - 1, 1), last_out: out.out.narrow(1, n - 1, 1) })
    }

    fn embed(&self, tokens: &[i64], kind: Kind) -> Tensor {
        self.target.embed_tokens().index_select(0, &Tensor::from_slice(tokens).to_device(self.device)).unsqueeze(0).to_kind(kind)
    }

    fn argmax_target_id(&self, post: &Tensor) -> i64 {
        let draft_id = self.draft.compute_logits(post).argmax(-1, false).view([1]);
        self.draft.draft_to_target(&draft_id).int64_value(&[0])
    }

    /// k drafts from the last context position `anchor` (= L−1).
    fn propose(&self, state: &DraftState, anchor: i64, k: usize) -> Vec<i64> {
        let d = self.draft;
        let kind = d.fc.kind();
        let mut drafts = vec![self.argmax_target_id(&state.last_post)];
        let mut hidden = if d.cfg.norm_output { state.last_post.shallow_clone() } else { state.last_out.shallow_clone() };
        let (mut keys, mut values) = (state.k.shallow_clone(), state.v.shallow_clone());
        for j in 1..k as i64 {
            let emb = self.embed(&drafts[drafts.len() - 1..], kind);
            let pos = Tensor::from_slice(&[anchor + j]).view([1, 1]).to_device(self.device);
            let (cos, sin) = d.rope(&pos, kind);
            let (out, kj, vj) = d.step_cached(&emb, &hidden, &cos, &sin, Some((&keys, &values)));
            (keys, values) = crate::nn::append_kv(Some((&keys, &values)), &kj, &vj);
            drafts.push(self.argmax_target_id(&out.post));
            hidden = out.next_hidden(d.cfg.norm_output).shallow_clone();
        }
        drafts
    }

    /// Decodes after `prompt` until a stop token, `max_new_tokens`, or the end of the reference.
    /// Returns the new tokens and the acceptance statistics.
    pub fn run(&self, prompt: &[i64], max_new_tokens: usize, verify: Verify<'_>) -> Result<(Vec<i64>, SpecStats)> {
        if prompt.is_empty() {
            return Err(Error::Input("empty prompt".into()));
        }
        tch::no_grad(|| self.run_inner(prompt, max_new_tokens, verify))
    }

    fn run_inner(&self, prompt: &[i64], max_new_tokens: usize, verify: Verify<'_>) -> Result<(Vec<i64>, SpecStats)> {
        let mut stats = SpecStats { accepted_per_pos: vec![0; self.k], ..Default::default() };
        let limit = match verify {
            Verify::Reference(r) => max_new_tokens.min(r.len()),
            Verify::Target => max_new_tokens,
        };
        let mut out: Vec<i64> = Vec::new();
        if limit == 0 {
            return Ok((out, stats));
        }
        let mut cache = Cache::new(self.target.config().num_hidden_layers);
        let (aux, logits) = self.target_step(prompt, &mut cache)?;
        let first = match verify {
            Verify::Reference(r) => r[0],
            Verify::Target => logits.get(prompt.len() as i64 - 1).argmax(-1, false).int64_value(&[]),
        };
        out.push(first);
        let mut seq: Vec<i64> = prompt.to_vec();
        seq.push(first);
        // Draft context over the prompt: position t pairs aux_t with token t+1.
        let mut state = self.draft_context(None, &aux, &seq[1..], 0)?;
        let has_linear = self.target.config().layer_types.iter().any(|t| *t == crate::config::LayerType::LinearAttention);
        while out.len() < limit && !self.stop_ids.contains(&seq[seq.len() - 1]) {
            let l = seq.len() as i64 - 1; // positions 0..l-1 are in both caches; seq[l] is pending
            let room = limit - out.len();
            // Drafts per step depend on the token budget only (not on where a reference ends),
            // so live decoding and offline evaluation count the same draft tokens.
            let k = self.k.min(max_new_tokens - out.len());
            let drafts = self.propose(&state, l - 1, k);
            let mut step_tokens = vec![seq[l as usize]];
            step_tokens.extend(&drafts);
            let snapshot = if has_linear { Some(snapshot(&cache)) } else { None };
            let (aux, logits) = self.target_step(&step_tokens, &mut cache)?;
            let expected: Vec<i64> = match verify {
                Verify::Target => Vec::try_from(logits.argmax(-1, false).to_device(Device::Cpu))?,
                Verify::Reference(r) => r[out.len()..(out.len() + k + 1).min(r.len())].to_vec(),
            };
            let mut a = 0;
            while a < k && a < expected.len() && drafts[a] == expected[a] {
                a += 1;
                if self.stop_ids.contains(&drafts[a - 1]) {
                    break; // an accepted stop token ends the answer
                }
            }
            stats.num_drafts += 1;
            stats.num_draft_tokens += k as u64;
            stats.num_accepted_tokens += a as u64;
            stats.accepted_per_pos.iter_mut().take(a).for_each(|c| *c += 1);
            let mut new: Vec<i64> = drafts[..a].to_vec();
            let stopped = new.last().is_some_and(|t| self.stop_ids.contains(t));
            if !stopped && a < expected.len() {
                new.push(expected[a]); // the bonus token
            }
            new.truncate(room);
            // Keep the target cache for seq[l] and the accepted drafts only.
            let keep = l + 1 + a as i64;
            match snapshot {
                Some(s) => {
                    cache = s;
                    let _ = self.target_step(&step_tokens[..=a], &mut cache)?;
                }
                None => truncate(&mut cache, keep)?,
            }
            out.extend(&new);
            seq.extend(&new);
            if out.len() >= limit || new.len() <= a || new.last().is_some_and(|t| self.stop_ids.contains(t)) {
                break;
            }
            // Draft context over the newly verified positions l..=l+a.
            let next = &seq[l as usize + 1..=l as usize + 1 + a];
            state = self.draft_context(Some(state), &aux.narrow(1, 0, a as i64 + 1), next, l)?;
        }
        Ok((out, stats))
    }
}

/// A copy of the cache's handles (tensors are never modified in place, so this is a snapshot).
fn snapshot(c: &Cache) -> Cache {
    let layers = c
        .layers
        .iter()
        .map(|l| {
            l.as_ref().map(|l| match l {
                LayerCache::Kv { k, v } => LayerCache::Kv { k: k.shallow_clone(), v: v.shallow_clone() },
                LayerCache::Linear { conv, state } => LayerCache::Linear { conv: conv.shallow_clone(), state: state.shallow_clone() },
            })
        })
        .collect();
    Cache { layers, seq_len: c.seq_len }
}

/// Drops cached positions past `len` (attention caches only).
fn truncate(c: &mut Cache, len: i64) -> Result<()> {
    for l in c.layers.iter_mut().flatten() {
        match l {
            LayerCache::Kv { k, v } => {
                *k = k.narrow(2, 0, len);
                *v = v.narrow(2, 0, len);
            }
            LayerCache::Linear { .. } => return Err(Error::Input("cannot truncate a recurrent cache; snapshot it instead".into())),
        }
    }
    c.seq_len = len;
    Ok(())
}
