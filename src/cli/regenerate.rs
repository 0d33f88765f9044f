//! `specforge-rs regenerate`: the target writes the assistant turns itself (on-policy data).

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use super::data_args::{compute_kind, device, DatasetArgs};
use crate::data::{self as dataset, Tokenizer};
use crate::generate::regenerate::{regenerate, select, RegenerateOptions};
use crate::generate::GenerateOptions;
use crate::target::{self, registry};

#[derive(Args, Debug)]
pub struct RegenerateArgs {
    /// Target: a model directory, a short name (smollm2-135m, ...) or a repo id in the HF cache.
    #[arg(long, default_value = "smollm2-135m")]
    target: String,
    /// Conversations (JSONL); their assistant turns, if any, are replaced.
    #[arg(long)]
    data: PathBuf,
    /// Output JSONL (appended to; a rerun skips the ids already there).
    #[arg(long)]
    out: PathBuf,
    /// New tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    /// Conversations per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// 0 = greedy (the default).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Nucleus mass for sampling.
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Sampling seed (batch k uses seed + k, so a resumed run samples the same).
    #[arg(long, default_value_t = 0)]
    seed: i64,
    /// Compute dtype: auto (bf16 on GPU, f32 on CPU), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    #[command(flatten)]
    data_args: DatasetArgs,
}

pub fn run(a: RegenerateArgs) -> anyhow::Result<()> {
    let device = device();
    let kind = compute_kind(&a.dtype, device)?;
    let dir = registry::resolve(&a.target)?;
    let tok = Tokenizer::from_dir(&dir)?;
    let (mut convs, mut report) = a.data_args.read(&a.data)?;
    if let Some(n) = a.data_args.limit {
        convs.truncate(n);
    }
    let mut report_path = a.out.clone().into_os_string();
    report_path.push(".bad-lines.jsonl");
    let report_path = a.data_args.report_path(report_path.into());
    let cfg = crate::config::TargetConfig::from_path(&dir)?;
    let opts = RegenerateOptions {
        gen: GenerateOptions {
            max_new_tokens: a.max_new_tokens,
            stop_ids: dataset::stop_ids(&tok, &cfg.eos_token_ids),
            temperature: a.temperature,
            top_p: a.top_p,
        },
        batch_size: a.batch_size,
        seed: a.seed,
        max_len: a.data_args.max_len,
        multimodal: false,
        target_name: a.target.clone(),
        config_hash: cfg.config_hash.clone(),
    };
    // Bad lines (parse errors and prompts that cannot be answered) are all known before the
    // weights load, so the threshold stops a bad run before it costs anything.
    let todo = select(&tok, &convs, &opts, &mut report);
    report.check(a.data_args.max_bad_fraction, &report_path, true)?;
    tracing::info!(target = %dir.display(), ?kind, ?device, "loading target");
    let model = target::load(&dir, kind, device)?;
    let stats = regenerate(model.as_ref(), &tok, &todo, &a.out, &opts, device)?;
    if stats.written + stats.resumed == 0 {
        bail!("{}: nothing was regenerated (see {})", a.data.display(), report_path.display());
    }
    println!(
        "regenerate: {} conversations written, {} already done, {} new tokens in {:.1} s ({:.1} tokens/s) -> {}",
        stats.written,
        stats.resumed,
        stats.new_tokens,
        stats.secs,
        stats.new_tokens as f64 / stats.secs.max(1e-9),
        a.out.display()
    );
    Ok(())
}
