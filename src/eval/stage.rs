//! The `eval` stage: a draft head's acceptance on held-out conversations, offline where a line
//! carries its answer, live otherwise. `run` evaluates its trained head and an untrained one with
//! the same [`evaluate`].

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;

use super::{SpecDecoder, SpecStats, Verify};
use crate::config::{EvalConfig, TargetSpec};
use crate::draft::Eagle3Draft;
use crate::error::{Error, Result};
use crate::runtime::{side_file, LoadedTarget, Runtime};
use crate::util::plot::{line_chart, Series};

/// `specforge-rs eval`: the stage's whole input.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalJob {
    /// The target.
    #[command(flatten)]
    pub target: TargetSpec,
    /// The head (export layout, or a checkpoint / run directory: its latest checkpoint).
    #[arg(long)]
    pub draft: PathBuf,
    /// Held-out conversations (JSONL). Lines ending in an assistant turn are evaluated offline
    /// against that answer (it should be the target's own greedy output); the others are
    /// answered live by the target, which verifies every draft.
    #[arg(long)]
    pub data: PathBuf,
    /// Draft length, budget and prompt count.
    #[command(flatten)]
    pub eval: EvalConfig,
    /// Write the counters and rates here (JSON), and the per-position acceptance beside it (PNG).
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// What an evaluation measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EvalResult {
    /// vLLM's counters, summed over the prompts.
    pub stats: SpecStats,
    /// Prompts scored against their given answers.
    pub offline: usize,
    /// Prompts answered live by the target.
    pub live: usize,
}

/// Runs `eval` with its own target and the head at `job.draft`.
pub fn run(job: &EvalJob, rt: &Runtime) -> Result<EvalResult> {
    job.eval.validate().map_err(|(f, m)| Error::config("eval", f, m))?;
    let target = LoadedTarget::open(&job.target, rt)?;
    let head = crate::train::checkpoint::head_dir(&job.draft)?;
    let draft = Eagle3Draft::load(&head, rt.device)?;
    let result = evaluate(&target, &draft, &job.data, &job.eval, rt)?;
    if let Some(p) = &job.json {
        write_report(p, &job.eval, &result)?;
    }
    Ok(result)
}

/// Speculative decoding of `draft` with `target` over the conversations in `data`: offline
/// against a line's final assistant turn when it has one, live otherwise.
pub fn evaluate(target: &LoadedTarget, draft: &Eagle3Draft, data: &Path, cfg: &EvalConfig, rt: &Runtime) -> Result<EvalResult> {
    cfg.validate().map_err(|(f, m)| Error::config("eval", f, m))?;
    let (convs, _) = crate::data::read_jsonl(data, &Default::default())?;
    let dec = SpecDecoder::new(target.model()?, draft, cfg.k, target.stop_ids(), rt.device)?;
    let tok = &target.tok;
    let n = convs.len().min(cfg.limit.unwrap_or(usize::MAX));
    let bar = crate::util::progress::bar(n as u64, "eval");
    let mut out = EvalResult::default();
    for c in convs.iter().take(n) {
        let msgs: Vec<serde_json::Value> = c.messages.iter().map(|m| m.to_template_json()).collect();
        let answered = msgs.last().and_then(|m| m.get("role")).and_then(|r| r.as_str()) == Some("assistant");
        let stats = if answered {
            // Prompt = the conversation rendered up to the answer; reference = the answer's tokens.
            let prompt = tok.encode(&tok.apply_chat_template(&serde_json::Value::Array(msgs[..msgs.len() - 1].to_vec()), true)?, false)?;
            let full = tok.encode(&tok.apply_chat_template(&serde_json::Value::Array(msgs.clone()), false)?, false)?;
            if !full.starts_with(&prompt) {
                return Err(Error::Input(format!(
                    "{}:{}: the rendered answer does not extend the rendered prompt",
                    data.display(),
                    c.line
                )));
            }
            out.offline += 1;
            dec.run(&prompt, cfg.max_new_tokens, Verify::Reference(&full[prompt.len()..]))?.1
        } else {
            let prompt = tok.encode(&tok.apply_chat_template(&serde_json::Value::Array(msgs), true)?, false)?;
            out.live += 1;
            dec.run(&prompt, cfg.max_new_tokens, Verify::Target)?.1
        };
        out.stats.add(&stats);
        bar.inc(1);
        bar.set_message(format!("τ {:.2}", out.stats.mean_acceptance_length()));
    }
    bar.finish_and_clear();
    Ok(out)
}

/// The report's JSON at `path` and its per-position plot beside it (`X.png`, never `path` itself).
pub fn write_report(path: &Path, cfg: &EvalConfig, r: &EvalResult) -> Result<()> {
    let rates = r.stats.per_position_rate();
    let report = json!({
        "k": cfg.k,
        "prompts": r.offline + r.live,
        "mean_acceptance_length": r.stats.mean_acceptance_length(),
        "draft_acceptance_rate": r.stats.draft_acceptance_rate(),
        "per_position_rate": rates,
        "counters": r.stats,
    });
    let text = serde_json::to_string_pretty(&report).map_err(|e| Error::Input(e.to_string()))?;
    crate::util::fs::write_atomic(path, text.as_bytes())?;
    let png = match path.with_extension("png") {
        p if p == path => side_file(path, ".png"),
        p => p,
    };
    let points = rates.iter().enumerate().map(|(i, r)| (i as f64 + 1.0, *r)).collect();
    line_chart(
        &png,
        &format!("acceptance at k = {}: mean acceptance length {:.3}", cfg.k, r.stats.mean_acceptance_length()),
        "draft position i",
        "fraction of steps accepting >= i drafts",
        &[Series { name: "head".into(), points }],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plot goes beside the report, never over it (`--json X.png` keeps its JSON).
    #[test]
    fn the_plot_never_overwrites_the_report() {
        let dir = tempfile::tempdir().unwrap();
        let r = EvalResult {
            stats: SpecStats { num_drafts: 2, num_draft_tokens: 6, num_accepted_tokens: 3, ..Default::default() },
            offline: 0,
            live: 1,
        };
        let cfg = EvalConfig::default();
        let json = dir.path().join("eval.json");
        write_report(&json, &cfg, &r).unwrap();
        assert!(dir.path().join("eval.png").is_file());
        let odd = dir.path().join("report.png");
        write_report(&odd, &cfg, &r).unwrap();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&odd).unwrap()).unwrap();
        assert_eq!(v["counters"]["num_drafts"], 2);
        assert!(dir.path().join("report.png.png").is_file());
    }
}
