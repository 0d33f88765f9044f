//! `specforge-rs generate`: the target answers prompts.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use tch::{Device, Kind};

use crate::data::Tokenizer;
use crate::generate::{generate, GenerateOptions};
use crate::target::{self, registry};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Target: a model directory, a short name (smollm2-135m, ...) or a repo id in the HF cache.
    #[arg(long, default_value = "smollm2-135m")]
    target: String,
    /// A user prompt (repeatable).
    #[arg(long)]
    prompt: Vec<String>,
    /// JSONL of conversations: {"messages": [...]} per line; the last assistant turn, if any, is dropped.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Use at most this many prompts from --prompts.
    #[arg(long)]
    limit: Option<usize>,
    /// New tokens per answer.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Prompts per batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus mass for sampling.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// RNG seed for sampling.
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Compute dtype: f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Speculative decoding with this draft head (greedy, chain of --k drafts): the answers are
    /// exactly the target's greedy ones, produced with fewer target steps.
    #[arg(long)]
    draft: Option<PathBuf>,
    /// Drafts per step with --draft.
    #[arg(long, default_value_t = 5)]
    k: usize,
}

pub(crate) fn parse_kind(s: &str) -> anyhow::Result<Kind> {
    Ok(match s {
        "f32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "float16" => Kind::Half,
        other => bail!("--dtype `{other}`: expected f32, bf16 or f16"),
    })
}

fn read_conversations(path: &PathBuf) -> anyhow::Result<Vec<Value>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
        let Some(Value::Array(mut msgs)) = v.get("messages").cloned() else {
            bail!("{}:{}: no `messages` array", path.display(), i + 1);
        };
        if msgs.last().and_then(|m| m.get("role")).and_then(Value::as_str) == Some("assistant") {
            msgs.pop();
        }
        out.push(Value::Array(msgs));
    }
    Ok(out)
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let kind = parse_kind(&a.dtype)?;
    let dir = registry::resolve(&a.target)?;
    tracing::info!(target = %dir.display(), "loading target");
    let device = Device::cuda_if_available();
    let model = target::load(&dir, kind, device)?;
    let tok = Tokenizer::from_dir(&dir)?;
    let mut convs: Vec<Value> = a.prompt.iter().map(|p| json!([{"role": "user", "content": p}])).collect();
    if let Some(p) = &a.prompts {
        convs.extend(read_conversations(p)?);
    }
    if let Some(n) = a.limit {
        convs.truncate(n);
    }
    if convs.is_empty() {
        bail!("nothing to answer: give --prompt or --prompts");
    }
    let mut stop_ids = model.config().eos_token_ids.clone();
    if let Some(id) = tok.eos_token.as_deref().and_then(|t| tok.token_to_id(t)) {
        stop_ids.push(id);
    }
    let opts = GenerateOptions { max_new_tokens: a.max_new_tokens, stop_ids, temperature: a.temperature, top_p: a.top_p };
    tch::manual_seed(a.seed);
    let start = Instant::now();
    let mut new_tokens = 0usize;
    if let Some(d) = &a.draft {
        anyhow::ensure!(a.temperature <= 0.0, "--draft decodes greedily; drop --temperature");
        let head = super::export::resolve_checkpoint(d)?;
        let draft = crate::draft::Eagle3Draft::load(&head, device)?;
        let dec = crate::eval::SpecDecoder::new(model.as_ref(), &draft, a.k, opts.stop_ids.clone(), device)?;
        let mut total = crate::eval::SpecStats::default();
        for c in &convs {
            let prompt = tok.encode(&tok.apply_chat_template(c, true)?, false)?;
            let (ans, stats) = dec.run(&prompt, a.max_new_tokens, crate::eval::Verify::Target)?;
            new_tokens += ans.len();
            total.add(&stats);
            let question = c.as_array().and_then(|m| m.last()).and_then(|m| m.get("content")).and_then(Value::as_str).unwrap_or("");
            println!("### {}\n{}\n", question.trim(), tok.decode(&ans, true)?.trim());
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "{} answers, {new_tokens} new tokens in {secs:.1} s ({:.1} tokens/s); {} target steps, mean acceptance length {:.3} at k = {}",
            convs.len(),
            new_tokens as f64 / secs,
            total.num_drafts + convs.len() as u64,
            total.mean_acceptance_length(),
            a.k
        );
        return Ok(());
    }
    for chunk in convs.chunks(a.batch_size.max(1)) {
        let prompts = chunk
            .iter()
            .map(|c| tok.apply_chat_template(c, true).and_then(|s| tok.encode(&s, false)))
            .collect::<crate::Result<Vec<_>>>()?;
        let answers = generate(model.as_ref(), &prompts, &opts, device)?;
        for (c, ans) in chunk.iter().zip(&answers) {
            new_tokens += ans.len();
            let question = c.as_array().and_then(|m| m.last()).and_then(|m| m.get("content")).and_then(Value::as_str).unwrap_or("");
            println!("### {}\n{}\n", question.trim(), tok.decode(ans, true)?.trim());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{} answers, {new_tokens} new tokens in {secs:.1} s ({:.1} tokens/s)", convs.len(), new_tokens as f64 / secs);
    Ok(())
}
