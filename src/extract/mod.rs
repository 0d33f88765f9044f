//! Offline features (the `extract` stage, docs/architecture.md): the frozen target over a
//! tokenised dataset, aux states and the post-final-norm hidden written into chunked safetensors shards (format v1,
//! docs/shard-format.md), and the reader the trainer consumes.
//!
//! - [`writer`]: deterministic shard/batch planning, rank r of W slicing (from the [`Runtime`]),
//!   atomic shard + manifest writes, resume, disk estimate.
//! - [`manifest`]: `manifest.json` and the per-rank manifests merged into it.
//! - [`reader`]: [`reader::Chunk`] (mmap + checksum on open), [`reader::plan_batches`],
//!   [`reader::load_batch`], [`reader::Prefetcher`].

pub mod manifest;
pub mod reader;
pub mod writer;

pub use manifest::{Manifest, RunInfo, ShardEntry, TargetInfo};
pub use reader::{load_batch, plan_batches, Batch, BatchOptions, BatchSpec, Chunk, Prefetcher, SampleRef};
pub use writer::{ExtractOptions, ExtractPlan, ExtractStats};

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::recipe::resolve_aux_ids;
use crate::config::{DataConfig, ExtractConfig, TargetSpec};
use crate::data::Sample;
use crate::error::{Error, Result};
use crate::runtime::{LoadedTarget, Runtime};
use crate::util::bytes;

/// The default aux ids for a target of `num_layers` decoder layers: `[2, L/2, L-3]`, vLLM's and
/// speculators' default in our (capture-before) convention.
pub fn default_aux_ids(num_layers: i64) -> Vec<i64> {
    resolve_aux_ids(&[], num_layers)
}

/// `specforge-rs extract`: the stage's whole input. Runs as one process or as one rank of a
/// job (torchrun, `launch` or SLURM, per the [`Runtime`]): each rank writes a disjoint slice and
/// all ranks fill the same chunk directory.
#[derive(clap::Args, Debug, Clone)]
pub struct ExtractJob {
    /// The target.
    #[command(flatten)]
    pub target: TargetSpec,
    /// Conversations with assistant turns (JSONL; OpenAI messages or ShareGPT).
    #[arg(long)]
    pub data: PathBuf,
    /// The chunk directory (created; a rerun resumes it).
    #[arg(long)]
    pub out: PathBuf,
    /// Aux layer ids, comma separated (id k = residual stream entering decoder layer k); the
    /// recipe's `draft.aux_layer_ids`. Empty = [2, L/2, L-3].
    #[arg(long, visible_alias = "aux-layers", value_delimiter = ',')]
    pub aux_layer_ids: Vec<i64>,
    /// With `--chunk-samples N`: extract chunk C, samples [C·N, (C+1)·N) of the dataset.
    #[arg(long, default_value_t = 0)]
    pub chunk: usize,
    /// Where the bad-line report goes (JSONL); default `<out>/bad-lines.jsonl`.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// How the dataset is read.
    #[command(flatten)]
    pub dataset: DataConfig,
    /// Batching, storage and limits.
    #[command(flatten)]
    pub extract: ExtractConfig,
}

/// What `extract` did.
#[derive(Debug, Clone, Serialize)]
pub struct ExtractResult {
    /// This rank's throughput and counts.
    pub stats: ExtractStats,
    /// The merged manifest after this rank finished.
    pub manifest: Manifest,
    /// Estimated bytes of the whole chunk.
    pub chunk_bytes: u64,
}

/// Samples `[c·n, (c+1)·n)` of `samples` (all of them when `n` is 0).
pub fn chunk_slice(samples: &[Sample], n: usize, c: usize) -> &[Sample] {
    if n == 0 {
        return if c == 0 { samples } else { &[] };
    }
    let lo = (c.saturating_mul(n)).min(samples.len());
    let hi = lo.saturating_add(n).min(samples.len());
    &samples[lo..hi]
}

/// Runs `extract` with its own target.
pub fn run(job: &ExtractJob, rt: &Runtime) -> Result<ExtractResult> {
    let target = LoadedTarget::open(&job.target, rt)?;
    // Data first: the disk estimate needs the token counts, not the weights.
    let report = job.report.clone().unwrap_or_else(|| job.out.join("bad-lines.jsonl"));
    let samples = target.samples(&job.data, &job.dataset, &report, rt)?;
    run_samples(&target, job, &samples, rt)
}

/// Runs `extract` on an opened target and the dataset's usable samples (as
/// [`LoadedTarget::samples`] gives them for `job.data`), writing chunk `job.chunk`.
pub fn run_samples(target: &LoadedTarget, job: &ExtractJob, all: &[Sample], rt: &Runtime) -> Result<ExtractResult> {
    let cfg = &target.cfg;
    let aux = resolve_aux_ids(&job.aux_layer_ids, cfg.num_hidden_layers);
    crate::target::check_capture(&aux, cfg.num_hidden_layers)?;
    let samples = chunk_slice(all, job.dataset.chunk_samples, job.chunk);
    if samples.is_empty() {
        return Err(Error::Input(format!(
            "{}: chunk {} of {} samples each is empty ({} usable samples)",
            job.data.display(),
            job.chunk,
            job.dataset.chunk_samples,
            all.len()
        )));
    }
    let (rank, world) = (rt.rank(), rt.world_size());
    let e = &job.extract;
    let store = e.store_dtype.kind();
    let kind = target.kind;
    let template = writer::manifest_template(
        &job.target.name,
        cfg,
        &aux,
        store,
        RunInfo {
            dataset: job.data.display().to_string(),
            dataset_xxh3: crate::data::file_hash(&job.data)?,
            max_len: job.dataset.max_len,
            truncation: format!("{:?}", job.dataset.truncation).to_lowercase(),
            compute_dtype: writer::dtype_name(kind).into(),
            world_size: world,
            shard_bytes: e.shard_size.0,
            planned_samples: 0,
            planned_tokens: 0,
            batch_tokens: e.batch_tokens,
            max_batch_size: e.max_batch_size,
            tokenizer_xxh3: target.tok.fingerprint.clone(),
            chunk: job.chunk,
            chunk_samples: job.dataset.chunk_samples,
        },
    );
    let opts = ExtractOptions {
        aux_layer_ids: aux.clone(),
        store_kind: store,
        batch_tokens: e.batch_tokens,
        max_batch_size: e.max_batch_size,
        shard_bytes: e.shard_size.0,
        rank,
        world_size: world,
    };
    let plan = writer::plan(samples, template, &opts);
    let state = writer::resume_state(&plan, &job.out)?;
    let done_bytes: u64 = state.shards.iter().map(|s| s.bytes).sum();
    if rt.prints {
        println!(
            "extract: the chunk will take about {} ({} samples, {} tokens, {} B/token, aux ids {:?}, {}); rank {rank} of {world} writes about {} in {} shards{}",
            bytes::human(plan.chunk_bytes),
            plan.template.run.planned_samples,
            plan.template.run.planned_tokens,
            plan.bytes_per_token,
            aux,
            writer::dtype_name(store),
            bytes::human(plan.rank_bytes),
            plan.shards.len(),
            if done_bytes > 0 { format!(", {} already written", bytes::human(done_bytes)) } else { String::new() }
        );
    }
    check_disk(&plan, done_bytes, e.max_disk.map(|b| b.0), &job.out, rank)?;
    let stats = writer::run(target.model()?, samples, &plan, &job.out, &opts, rt.device)?;
    let manifest = manifest::merge(&job.out)?;
    Ok(ExtractResult { stats, manifest, chunk_bytes: plan.chunk_bytes })
}

/// Refuses, before anything is written, a chunk over the disk budget or a rank's remaining
/// shards over the free space.
fn check_disk(plan: &ExtractPlan, done_bytes: u64, max_disk: Option<u64>, out: &Path, rank: usize) -> Result<()> {
    if let Some(limit) = max_disk {
        if plan.chunk_bytes > limit {
            return Err(Error::DiskBudget {
                what: format!("the chunk in {}", out.display()),
                needed: plan.chunk_bytes,
                limit_name: "extract.max_disk (--max-disk)".into(),
                limit,
            });
        }
    }
    let remaining = plan.rank_bytes.saturating_sub(done_bytes);
    if let Some(free) = crate::util::fs::free_space(out) {
        if remaining > free {
            return Err(Error::DiskBudget {
                what: format!("rank {rank}'s shards in {}", out.display()),
                needed: remaining,
                limit_name: format!("the free space on {}", out.display()),
                limit: free,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunk_slices_cover_the_dataset_and_never_overflow() {
        let samples: Vec<crate::data::Sample> = (0..10)
            .map(|i| crate::data::Sample {
                index: i,
                line: i + 1,
                id: i.to_string(),
                input_ids: vec![1],
                loss_mask: vec![1],
                truncated: false,
            })
            .collect();
        let lens = |n, c| super::chunk_slice(&samples, n, c).iter().map(|s| s.index).collect::<Vec<_>>();
        assert_eq!(lens(4, 0), [0, 1, 2, 3]);
        assert_eq!(lens(4, 2), [8, 9]);
        assert!(lens(4, 3).is_empty());
        assert_eq!(lens(0, 0).len(), 10);
        assert!(lens(0, 1).is_empty());
        assert_eq!(lens(usize::MAX, 0).len(), 10);
        assert!(lens(usize::MAX, usize::MAX).is_empty());
    }
}
