//! `specforge-rs vocab`: the draft vocabulary (d2t / t2d) from loss-masked token counts.

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use super::data_args::DatasetArgs;
use crate::config::TargetConfig;
use crate::data::{self as dataset, Tokenizer};
use crate::extract::Chunk;
use crate::target::registry;
use crate::vocab;

#[derive(Args, Debug)]
pub struct VocabArgs {
    /// Target: a model directory, a short name (smollm2-135m, ...) or a repo id in the HF cache.
    #[arg(long, default_value = "smollm2-135m")]
    target: String,
    /// Count tokens of this dataset (JSONL conversations with assistant turns).
    #[arg(long, conflicts_with = "shards")]
    data: Option<PathBuf>,
    /// Or count tokens of extracted chunks (repeatable).
    #[arg(long)]
    shards: Vec<PathBuf>,
    /// Draft vocabulary size Vd.
    #[arg(long, default_value_t = 32000)]
    draft_vocab: usize,
    /// Output safetensors file with `d2t` [Vd] int64 and `t2d` [V] bool; the coverage report is
    /// written beside it as JSON.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    data_args: DatasetArgs,
}

pub fn run(a: VocabArgs) -> anyhow::Result<()> {
    let dir = registry::resolve(&a.target)?;
    let cfg = TargetConfig::from_path(&dir)?;
    let tok = Tokenizer::from_dir(&dir)?;
    let v = cfg.vocab_size as usize;
    let counts = if let Some(data) = &a.data {
        let (convs, mut report) = a.data_args.read(data)?;
        let mut samples = dataset::tokenize(&convs, &tok, &cfg.eos_token_ids, &a.data_args.tokenize_options(), &mut report);
        let mut rp = a.out.clone().into_os_string();
        rp.push(".bad-lines.jsonl");
        report.check(a.data_args.max_bad_fraction, &a.data_args.report_path(rp.into()), true)?;
        if let Some(n) = a.data_args.limit {
            samples.truncate(n);
        }
        vocab::count_samples(&samples, v)?
    } else if !a.shards.is_empty() {
        let mut counts = vec![0u64; v];
        for dir in &a.shards {
            let chunk = Chunk::open(dir)?;
            if chunk.manifest().target.config_hash != cfg.config_hash {
                bail!(
                    "{}: extracted from target config {} but --target {} has config {}",
                    dir.display(),
                    chunk.manifest().target.config_hash,
                    a.target,
                    cfg.config_hash
                );
            }
            let pairs = (0..chunk.num_samples()).map(|i| chunk.tokens(i)).collect::<crate::Result<Vec<_>>>()?;
            let c = vocab::count_tokens(pairs, v)?;
            counts.iter_mut().zip(c).for_each(|(a, b)| *a += b);
        }
        counts
    } else {
        bail!("give --data (a dataset) or --shards (extracted chunks) to count tokens from");
    };
    let forced = vocab::forced_tokens(&tok, &cfg.eos_token_ids);
    let dv = vocab::build(&counts, a.draft_vocab, &forced)?;
    dv.save(&a.out, &cfg.config_hash)?;
    let report = a.out.with_extension("json");
    let text = serde_json::to_string_pretty(&dv.report_json(Some(&tok)))?;
    crate::util::fs::write_atomic(&report, text.as_bytes())?;
    println!(
        "vocab: Vd {} of V {}: covers {:.2}% of {} supervised tokens ({} distinct ids seen, {} forced, {} padded) -> {} (report {})",
        dv.draft_vocab_size(),
        v,
        100.0 * dv.coverage(),
        dv.total_tokens,
        dv.distinct,
        dv.forced.len(),
        dv.padded,
        a.out.display(),
        report.display()
    );
    Ok(())
}
