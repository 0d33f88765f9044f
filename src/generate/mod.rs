//! Batched autoregressive generation with the target's cache: greedy by default, temperature /
//! top-p sampling optional. Used by `regenerate` (on-policy data) and the demo.
//!
//! Prompts of unequal length are left-padded; positions are counted over real tokens only
//! (`cumsum(mask) - 1`), as transformers' `generate` does, so a padded row computes exactly what
//! it would alone.

pub mod regenerate;

use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::config::recipe::DEFAULT_K;
use crate::config::{RegenerateConfig, TargetSpec};
use crate::error::{Error, Result};
use crate::eval::{SpecDecoder, SpecStats, Verify};
use crate::runtime::{LoadedTarget, Runtime};
use crate::target::{Cache, ForwardInput, TargetModel};

/// `specforge-rs generate`: the stage's whole input.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerateJob {
    /// The target.
    #[command(flatten)]
    pub target: TargetSpec,
    /// A user prompt (repeatable).
    #[arg(long)]
    pub prompt: Vec<String>,
    /// JSONL of conversations: the last assistant turn of a line, if any, is dropped.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Use at most this many prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Decoding (max new tokens, batch size, temperature, top-p, seed).
    #[command(flatten)]
    pub decode: RegenerateConfig,
    /// Speculative decoding with this draft head (greedy, chain of --k drafts): the answers are
    /// exactly the target's greedy ones, produced with fewer target steps.
    #[arg(long)]
    pub draft: Option<PathBuf>,
    /// Drafts per step with --draft.
    #[arg(long, default_value_t = DEFAULT_K)]
    pub k: usize,
}

/// What `generate` answered.
#[derive(Debug, Clone)]
pub struct GenerateResult {
    /// (last user message, decoded answer) per prompt, in order.
    pub answers: Vec<(String, String)>,
    /// New tokens over all answers.
    pub new_tokens: usize,
    /// Wall seconds of the decoding.
    pub secs: f64,
    /// With a draft: the speculative-decoding counters.
    pub spec: Option<SpecStats>,
}

/// Runs `generate`.
pub fn run(job: &GenerateJob, rt: &Runtime) -> Result<GenerateResult> {
    job.decode.validate().map_err(|(f, m)| Error::config("generate", f, m))?;
    let target = LoadedTarget::open(&job.target, rt)?;
    let mut convs: Vec<Value> = job.prompt.iter().map(|p| json!([{"role": "user", "content": p}])).collect();
    if let Some(p) = &job.prompts {
        let (lines, _report) = crate::data::read_jsonl(p, &Default::default())?;
        for c in lines {
            let mut msgs: Vec<Value> = c.messages.iter().map(|m| m.to_template_json()).collect();
            if msgs.last().and_then(|m| m.get("role")).and_then(Value::as_str) == Some("assistant") {
                msgs.pop();
            }
            convs.push(Value::Array(msgs));
        }
    }
    if let Some(n) = job.limit {
        convs.truncate(n);
    }
    if convs.is_empty() {
        return Err(Error::Input("nothing to answer: give --prompt or --prompts".into()));
    }
    let tok = &target.tok;
    let prompts = convs.iter().map(|c| tok.apply_chat_template(c, true).and_then(|s| tok.encode(&s, false))).collect::<Result<Vec<_>>>()?;
    let question = |c: &Value| {
        c.as_array().and_then(|m| m.last()).and_then(|m| m.get("content")).and_then(Value::as_str).unwrap_or("").trim().to_string()
    };
    let d = &job.decode;
    let opts =
        GenerateOptions { max_new_tokens: d.max_new_tokens, stop_ids: target.stop_ids(), temperature: d.temperature, top_p: d.top_p };
    let model = target.model()?;
    tch::manual_seed(d.seed);
    let start = Instant::now();
    let mut answers = Vec::new();
    let mut new_tokens = 0;
    let mut spec = None;
    if let Some(path) = &job.draft {
        if d.temperature > 0.0 {
            return Err(Error::config("generate", "temperature", "--draft decodes greedily; drop --temperature"));
        }
        let draft = crate::draft::Eagle3Draft::load(&crate::train::checkpoint::head_dir(path)?, rt.device)?;
        let dec = SpecDecoder::new(model, &draft, job.k, opts.stop_ids.clone(), rt.device)?;
        let mut total = SpecStats::default();
        for (c, p) in convs.iter().zip(&prompts) {
            let (ans, stats) = dec.run(p, d.max_new_tokens, Verify::Target)?;
            new_tokens += ans.len();
            total.add(&stats);
            answers.push((question(c), tok.decode(&ans, true)?.trim().to_string()));
        }
        spec = Some(total);
    } else {
        for (cs, ps) in convs.chunks(d.batch_size.max(1)).zip(prompts.chunks(d.batch_size.max(1))) {
            for (c, ans) in cs.iter().zip(generate(model, ps, &opts, rt.device)?) {
                new_tokens += ans.len();
                answers.push((question(c), tok.decode(&ans, true)?.trim().to_string()));
            }
        }
    }
    Ok(GenerateResult { answers, new_tokens, secs: start.elapsed().as_secs_f64(), spec })
}

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
    let mut out: Vec<Tensor> = Vec::with_capacity(opts.max_new_tokens.min(4096));
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
