//! Batched autoregressive generation with the target's cache: greedy by default, temperature /
//! top-p sampling optional. Used by `regenerate` (on-policy data) and the demo.
//!
//! Prompts of unequal length are left-padded; positions are counted over real tokens only
//! (`cumsum(mask) - 1`), as transformers' `generate` does, so a padded row computes exactly what
//! it would alone.

pub mod regenerate;

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};
use crate::target::{Cache, ForwardInput, TargetModel};

/// How to decode.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Upper bound on new tokens per prompt.
    pub max_new_tokens: usize,
    /// Tokens that end a sequence (included in the output).
    pub stop_ids: Vec<i64>,
    /// 0 = greedy; otherwise softmax temperature.
    pub temperature: f64,
    /// Nucleus sampling mass (1.0 = off); only with temperature > 0.
    pub top_p: f64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_new_tokens: 128, stop_ids: Vec::new(), temperature: 0.0, top_p: 1.0 }
    }
}

/// Picks the next token per row from `logits` `[B, V]`.
fn choose(logits: &Tensor, opts: &GenerateOptions) -> Tensor {
    if opts.temperature <= 0.0 {
        return logits.argmax(-1, false);
    }
    let probs = (logits.to_kind(Kind::Float) / opts.temperature).softmax(-1, Kind::Float);
    let probs = if opts.top_p < 1.0 {
        let (sorted, idx) = probs.sort(-1, true);
        let cum = sorted.cumsum(-1, Kind::Float);
        // Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        let drop = (&cum - &sorted).gt(opts.top_p);
        let kept = sorted.masked_fill(&drop, 0.0);
        Tensor::zeros_like(&probs).scatter(-1, &idx, &kept)
    } else {
        probs
    };
    probs.multinomial(1, false).squeeze_dim(-1)
}

/// Generates continuations of `prompts` in one batch. Returns, per prompt, the new tokens only,
/// ending with a stop token when one was produced.
///
/// # Errors
/// [`Error::Input`] for an empty prompt; model errors as they come.
pub fn generate(model: &dyn TargetModel, prompts: &[Vec<i64>], opts: &GenerateOptions, device: Device) -> Result<Vec<Vec<i64>>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(Error::Input(format!("prompt {i} is empty")));
    }
    let b = prompts.len() as i64;
    let t0 = prompts.iter().map(Vec::len).max().unwrap_or(0) as i64;
    let pad = model.config().pad_token_id.unwrap_or(0).clamp(0, model.config().vocab_size - 1);
    let mut ids = vec![pad; (b * t0) as usize];
    let mut mask = vec![0i64; (b * t0) as usize];
    for (r, p) in prompts.iter().enumerate() {
        let off = r * t0 as usize + (t0 as usize - p.len());
        ids[off..off + p.len()].copy_from_slice(p);
        mask[off..off + p.len()].iter_mut().for_each(|m| *m = 1);
    }
    let input_ids = Tensor::from_slice(&ids).view([b, t0]).to_device(device);
    let mut attention_mask = Tensor::from_slice(&mask).view([b, t0]).to_device(device);
    let mut positions = (attention_mask.cumsum(1, Kind::Int64) - 1).clamp_min(0);

    let mut cache = Cache::new(model.config().num_hidden_layers);
    let stop = Tensor::from_slice(&opts.stop_ids).to_device(device);
    let mut done = Tensor::zeros([b], (Kind::Bool, device));
    let mut out: Vec<Tensor> = Vec::with_capacity(opts.max_new_tokens);
    let mut next_input = input_ids;
    tch::no_grad(|| -> Result<()> {
        for _ in 0..opts.max_new_tokens {
            let o = model.forward(
                &ForwardInput {
                    input_ids: &next_input,
                    attention_mask: Some(&attention_mask),
                    position_ids: Some(&positions),
                    capture: &[],
                },
                Some(&mut cache),
            )?;
            let t = o.last_hidden.size()[1];
            let logits = model.logits(&o.last_hidden.select(1, t - 1)); // [B, V]
            let next = choose(&logits, opts).masked_fill(&done, pad); // [B]
            out.push(next.shallow_clone());
            if !opts.stop_ids.is_empty() {
                done = done.logical_or(&next.unsqueeze(1).eq_tensor(&stop.unsqueeze(0)).any_dim(1, false));
            }
            if bool::try_from(done.all()).unwrap_or(false) {
                break;
            }
            positions = positions.select(1, positions.size()[1] - 1).unsqueeze(1) + 1;
            attention_mask = Tensor::cat(&[&attention_mask, &Tensor::ones([b, 1], (Kind::Int64, device))], 1);
            next_input = next.unsqueeze(1);
        }
        Ok(())
    })?;
    if out.is_empty() {
        return Ok(vec![Vec::new(); prompts.len()]);
    }
    let all = Tensor::stack(&out, 1).to_device(Device::Cpu); // [B, n]
    let mut result = Vec::with_capacity(prompts.len());
    for r in 0..b {
        let row: Vec<i64> = Vec::try_from(all.get(r)).map_err(Error::Torch)?;
        let end = row.iter().position(|t| opts.stop_ids.contains(t)).map_or(row.len(), |i| i + 1);
        result.push(row[..end].to_vec());
    }
    Ok(result)
}
