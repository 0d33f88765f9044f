//! Offline features (stage 3 of the pipeline): the frozen target over a tokenised dataset, aux
//! states and the post-final-norm hidden written into chunked safetensors shards (format v1,
//! docs/shard-format.md), and the reader the trainer consumes.
//!
//! - [`writer`]: deterministic shard/batch planning, rank r of W slicing (RANK / WORLD_SIZE),
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

/// The default aux ids for a target of `num_layers` decoder layers: `[2, L/2, L-3]`, vLLM's and
/// speculators' default in our (capture-before) convention.
pub fn default_aux_ids(num_layers: i64) -> Vec<i64> {
    let mut v = vec![2.min(num_layers), num_layers / 2, (num_layers - 3).max(0)];
    v.dedup();
    v
}
