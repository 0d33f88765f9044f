//! `specforge-rs extract`: the frozen target over a dataset, features into a chunk of shards.
//!
//! Runs as one process or as rank RANK of WORLD_SIZE (torchrun / `launch` set them); each rank
//! takes a disjoint slice and all ranks fill the same chunk directory.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use super::data_args::{compute_kind, device, DatasetArgs};
use crate::config::TargetConfig;
use crate::data::{self as dataset, Tokenizer};
use crate::extract::writer::{self, dtype_name, ExtractOptions};
use crate::extract::RunInfo;
use crate::target::{self, registry};
use crate::util::bytes;
use crate::util::progress::is_rank0;

#[derive(Args, Debug)]
pub struct ExtractArgs {
    /// Target: a model directory, a short name (smollm2-135m, ...) or a repo id in the HF cache.
    #[arg(long, default_value = "smollm2-135m")]
    target: String,
    /// Conversations with assistant turns (JSONL; OpenAI messages or ShareGPT).
    #[arg(long)]
    data: PathBuf,
    /// The chunk directory (created; a rerun resumes it).
    #[arg(long)]
    out: PathBuf,
    /// Aux layer ids, comma separated (id k = residual stream entering decoder layer k);
    /// default [2, L/2, L-3].
    #[arg(long, value_delimiter = ',')]
    aux_layers: Vec<i64>,
    /// Compute dtype of the target: auto (bf16 on GPU, f32 on CPU), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// Feature dtype on disk: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    store_dtype: String,
    /// Padded tokens per forward batch.
    #[arg(long, default_value_t = 8192)]
    batch_tokens: usize,
    /// Samples per forward batch.
    #[arg(long, default_value_t = 32)]
    max_batch_size: usize,
    /// Shard size limit (e.g. 1G, 256M).
    #[arg(long, default_value = "1G")]
    shard_size: String,
    /// Refuse to start when the chunk would take more than this (e.g. 500G).
    #[arg(long)]
    max_disk: Option<String>,
    #[command(flatten)]
    data_args: DatasetArgs,
}

pub fn run(a: ExtractArgs) -> anyhow::Result<()> {
    let (rank, world) = writer::rank_from_env()?;
    let device = device();
    let kind = compute_kind(&a.dtype, device)?;
    let store =
        writer::kind_from_name(&a.store_dtype).with_context(|| format!("--store-dtype `{}`: expected bf16, f16 or f32", a.store_dtype))?;
    let shard_bytes = bytes::parse(&a.shard_size).map_err(|e| anyhow::anyhow!("--shard-size {e}"))?;
    let max_disk = a.max_disk.as_deref().map(bytes::parse).transpose().map_err(|e| anyhow::anyhow!("--max-disk {e}"))?;
    let dir = registry::resolve(&a.target)?;
    let cfg = TargetConfig::from_path(&dir)?;
    let aux = if a.aux_layers.is_empty() { crate::extract::default_aux_ids(cfg.num_hidden_layers) } else { a.aux_layers.clone() };
    target::check_capture(&aux, cfg.num_hidden_layers)?;
    let tok = Tokenizer::from_dir(&dir)?;

    // Data first: the disk estimate needs the token counts, not the weights.
    let (convs, mut report) = a.data_args.read(&a.data)?;
    let mut samples = dataset::tokenize(&convs, &tok, &cfg.eos_token_ids, &a.data_args.tokenize_options(), &mut report);
    drop(convs);
    let report_path = a.data_args.report_path(a.out.join("bad-lines.jsonl"));
    report.check(a.data_args.max_bad_fraction, &report_path, rank == 0)?;
    if let Some(n) = a.data_args.limit {
        samples.truncate(n);
    }
    if samples.is_empty() {
        bail!("{}: no usable sample (see {})", a.data.display(), report_path.display());
    }
    let template = writer::manifest_template(
        &a.target,
        &cfg,
        &aux,
        store,
        RunInfo {
            dataset: a.data.display().to_string(),
            dataset_xxh3: dataset::file_hash(&a.data)?,
            max_len: a.data_args.max_len,
            truncation: format!("{:?}", a.data_args.truncation).to_lowercase(),
            compute_dtype: dtype_name(kind).into(),
            world_size: world,
            shard_bytes,
            planned_samples: 0,
            planned_tokens: 0,
        },
    );
    let opts = ExtractOptions {
        aux_layer_ids: aux.clone(),
        store_kind: store,
        batch_tokens: a.batch_tokens,
        max_batch_size: a.max_batch_size,
        shard_bytes,
        rank,
        world_size: world,
    };
    let plan = writer::plan(&samples, template, &opts);
    let state = writer::resume_state(&plan, &a.out)?;
    let done_bytes: u64 = state.shards.iter().map(|s| s.bytes).sum();
    if is_rank0() {
        println!(
            "extract: the chunk will take about {} ({} samples, {} tokens, {} B/token, aux ids {:?}, {}); rank {rank} of {world} writes about {} in {} shards{}",
            bytes::human(plan.chunk_bytes),
            plan.template.run.planned_samples,
            plan.template.run.planned_tokens,
            plan.bytes_per_token,
            aux,
            dtype_name(store),
            bytes::human(plan.rank_bytes),
            plan.shards.len(),
            if done_bytes > 0 {
                format!(", {} already written", bytes::human(done_bytes))
            } else {
                String::new()
            }
        );
    }
    if let Some(limit) = max_disk {
        if plan.chunk_bytes > limit {
            return Err(crate::Error::DiskBudget {
                what: format!("the chunk in {}", a.out.display()),
                needed: plan.chunk_bytes,
                limit_name: "--max-disk".into(),
                limit,
            }
            .into());
        }
    }
    let remaining = plan.rank_bytes.saturating_sub(done_bytes);
    if let Some(free) = crate::util::fs::free_space(&a.out) {
        if remaining > free {
            return Err(crate::Error::DiskBudget {
                what: format!("rank {rank}'s shards in {}", a.out.display()),
                needed: remaining,
                limit_name: format!("the free space on {}", a.out.display()),
                limit: free,
            }
            .into());
        }
    }

    tracing::info!(target = %dir.display(), ?kind, ?device, "loading target");
    let model = target::load(&dir, kind, device)?;
    let stats = writer::run(model.as_ref(), &samples, &plan, &a.out, &opts, device)?;
    let merged = crate::extract::manifest::merge(&a.out)?;
    if is_rank0() {
        println!(
            "extract: rank {rank} wrote {} samples / {} tokens in {} shards ({}; {} shards resumed) in {:.1} s: {:.1} tokens/s overall, {:.1} tokens/s in the forward; chunk {}: {} of {} samples{}",
            stats.samples,
            stats.tokens,
            stats.shards,
            bytes::human(stats.bytes),
            stats.resumed_shards,
            stats.wall_secs,
            stats.tokens as f64 / stats.wall_secs.max(1e-9),
            stats.tokens as f64 / stats.forward_secs.max(1e-9),
            a.out.display(),
            merged.samples,
            merged.run.planned_samples,
            if merged.complete { ", complete" } else { "" }
        );
        println!(
            "{}",
            json!({
                "bench": "extract",
                "target": a.target,
                "device": format!("{device:?}"),
                "compute_dtype": dtype_name(kind),
                "tokens": stats.tokens,
                "samples": stats.samples,
                "forward_secs": stats.forward_secs,
                "wall_secs": stats.wall_secs,
                "forward_tokens_per_s": stats.tokens as f64 / stats.forward_secs.max(1e-9),
                "tokens_per_s": stats.tokens as f64 / stats.wall_secs.max(1e-9),
                "bytes": stats.bytes,
            })
        );
    }
    Ok(())
}
