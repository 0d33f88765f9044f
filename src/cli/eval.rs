//! `specforge-rs eval`: acceptance of a draft head on held-out prompts, with vLLM's definitions.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tch::Device;

use crate::data::{self as dataset, Tokenizer};
use crate::draft::Eagle3Draft;
use crate::eval::{SpecDecoder, SpecStats, Verify};
use crate::target::{self, registry};

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The head (export layout, or a checkpoint / run directory).
    #[arg(long)]
    draft: PathBuf,
    /// The target: directory, short name or repo id in the local HF cache.
    #[arg(long, default_value = "smollm2-135m")]
    target: String,
    /// Held-out conversations (JSONL). Lines ending in an assistant turn are evaluated offline
    /// against that answer (it should be the target's own greedy output); the others are
    /// answered live by the target, which verifies every draft.
    #[arg(long)]
    data: PathBuf,
    /// Drafts per step.
    #[arg(long, default_value_t = 5)]
    k: usize,
    /// New tokens per prompt.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Prompts used at most.
    #[arg(long)]
    limit: Option<usize>,
    /// Compute dtype of the target: auto, f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Write the counters and rates here (JSON), and the per-position acceptance beside it (PNG).
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let device = Device::cuda_if_available();
    let kind = crate::pipeline::compute_kind(&a.dtype, device)?;
    let dir = registry::resolve(&a.target)?;
    let tok = Tokenizer::from_dir(&dir)?;
    let cfg = crate::config::TargetConfig::from_path(&dir)?;
    let head_dir = super::export::resolve_checkpoint(&a.draft)?;
    let draft = Eagle3Draft::load(&head_dir, device).with_context(|| format!("loading {}", head_dir.display()))?;
    let model = target::load(&dir, kind, device)?;
    let stop = dataset::stop_ids(&tok, &cfg.eos_token_ids);
    let dec = SpecDecoder::new(model.as_ref(), &draft, a.k, stop, device)?;
    let (convs, _) = dataset::read_jsonl(&a.data, &Default::default())?;
    let mut total = SpecStats::default();
    let (mut offline, mut live) = (0, 0);
    let bar = crate::util::progress::bar(convs.len().min(a.limit.unwrap_or(usize::MAX)) as u64, "eval");
    for c in convs.iter().take(a.limit.unwrap_or(usize::MAX)) {
        let msgs: Vec<serde_json::Value> = c.messages.iter().map(|m| m.to_template_json()).collect();
        let answered = msgs.last().and_then(|m| m.get("role")).and_then(|r| r.as_str()) == Some("assistant");
        let stats = if answered {
            // Prompt = the conversation rendered up to the answer; reference = the answer's tokens.
            let prompt = tok.encode(&tok.apply_chat_template(&serde_json::Value::Array(msgs[..msgs.len() - 1].to_vec()), true)?, false)?;
            let full = tok.encode(&tok.apply_chat_template(&serde_json::Value::Array(msgs.clone()), false)?, false)?;
            anyhow::ensure!(full.starts_with(&prompt), "line {}: the rendered answer does not extend the rendered prompt", c.line);
            offline += 1;
            dec.run(&prompt, a.max_new_tokens, Verify::Reference(&full[prompt.len()..]))?.1
        } else {
            let prompt = tok.encode(&tok.apply_chat_template(&serde_json::Value::Array(msgs), true)?, false)?;
            live += 1;
            dec.run(&prompt, a.max_new_tokens, Verify::Target)?.1
        };
        total.add(&stats);
        bar.inc(1);
        bar.set_message(format!("τ {:.2}", total.mean_acceptance_length()));
    }
    bar.finish_and_clear();
    let rates = total.per_position_rate();
    println!("eval: {} prompts ({offline} offline against given answers, {live} live), k = {}", offline + live, a.k);
    println!("| metric | value |\n|---|---|");
    println!("| mean acceptance length | {:.3} |", total.mean_acceptance_length());
    println!("| draft acceptance rate | {:.3} |", total.draft_acceptance_rate());
    for (i, r) in rates.iter().enumerate() {
        println!("| acceptance at position {i} | {r:.3} |");
    }
    println!("| drafts / draft tokens / accepted | {} / {} / {} |", total.num_drafts, total.num_draft_tokens, total.num_accepted_tokens);
    if let Some(p) = &a.json {
        let report = json!({
            "k": a.k,
            "prompts": offline + live,
            "mean_acceptance_length": total.mean_acceptance_length(),
            "draft_acceptance_rate": total.draft_acceptance_rate(),
            "per_position_rate": rates,
            "counters": total,
        });
        std::fs::write(p, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", p.display()))?;
        let points = rates.iter().enumerate().map(|(i, r)| (i as f64 + 1.0, *r)).collect();
        crate::util::plot::line_chart(
            &p.with_extension("png"),
            &format!("acceptance at k = {}: mean acceptance length {:.3}", a.k, total.mean_acceptance_length()),
            "draft position i",
            "fraction of steps accepting >= i drafts",
            &[crate::util::plot::Series { name: "head".into(), points }],
        )?;
    }
    Ok(())
}
