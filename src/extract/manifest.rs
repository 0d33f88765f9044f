//! `manifest.json` of a feature chunk (docs/shard-format.md), and the per-rank manifests the
//! writers keep so that W processes can fill one chunk without racing on one file.
//!
//! Each rank owns `manifest.rank-RRRRR.json` (only it writes it). After every shard a rank
//! rewrites its own manifest, then — holding an `flock` on `.manifest.lock` — merges every rank
//! manifest into `manifest.json`. Both writes are temp + rename, so any reader sees a manifest
//! that lists only complete shards.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{read_json, Error, Result};
use crate::util::fs::{write_atomic, FileLock};

/// `format` of every manifest and shard header.
pub const FORMAT: &str = "specforge-shards";
/// The shard format version this code writes and reads.
pub const VERSION: u32 = 1;
/// The merged manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// The target the features came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// What `--target` named (short name, repo id or directory).
    pub name: String,
    /// config.json `model_type`.
    pub model_type: String,
    /// xxh3-64 of the config.json bytes as read: the trainer refuses shards of another target.
    pub config_hash: String,
    /// Target vocabulary size V.
    pub vocab_size: i64,
    /// Decoder layers L (aux ids are 0..=L).
    #[serde(default)]
    pub num_hidden_layers: i64,
}

/// One shard as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name within the chunk directory.
    pub file: String,
    /// Samples S.
    pub samples: usize,
    /// Tokens N.
    pub tokens: u64,
    /// File size.
    pub bytes: u64,
    /// xxh3-64 of the whole file, hex.
    pub xxh3: String,
    /// Dataset index of its first sample.
    pub first_sample: i64,
    /// Writer rank.
    #[serde(default)]
    pub rank: usize,
}

/// How the chunk was produced; a resume must match it field for field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The dataset file.
    pub dataset: String,
    /// xxh3-64 of its bytes.
    pub dataset_xxh3: String,
    /// `--max-len`.
    pub max_len: usize,
    /// `--truncation`.
    pub truncation: String,
    /// Dtype the target computed in.
    pub compute_dtype: String,
    /// Writer processes W.
    pub world_size: usize,
    /// Shard size limit in bytes.
    pub shard_bytes: u64,
    /// Usable samples in the chunk (all ranks).
    pub planned_samples: usize,
    /// Their tokens (all ranks).
    pub planned_tokens: u64,
    /// Padded tokens per forward batch (which samples share a batch changes the features' low
    /// bits, so a resume must batch the same way).
    #[serde(default)]
    pub batch_tokens: usize,
    /// Samples per forward batch.
    #[serde(default)]
    pub max_batch_size: usize,
    /// The tokenizer and chat template that made the tokens (`Tokenizer::fingerprint`).
    #[serde(default)]
    pub tokenizer_xxh3: String,
    /// Which chunk of the dataset this is (`--chunk`).
    #[serde(default)]
    pub chunk: usize,
    /// Samples per chunk (`--chunk-samples`; 0 = the whole dataset is one chunk).
    #[serde(default)]
    pub chunk_samples: usize,
}

/// `manifest.json` (and, with `rank` set, a rank's own manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// The target.
    pub target: TargetInfo,
    /// Aux ids in storage order (id k = residual stream entering decoder layer k).
    pub aux_layer_ids: Vec<i64>,
    /// Target hidden size H.
    pub hidden_size: i64,
    /// Feature dtype: `bf16`, `f16` or `f32`.
    pub dtype: String,
    /// Samples in the listed shards.
    pub samples: usize,
    /// Tokens in the listed shards.
    pub tokens: u64,
    /// The shards, sorted by file name (rank, then index).
    pub shards: Vec<ShardEntry>,
    /// How it was produced.
    pub run: RunInfo,
    /// Whether every rank finished every planned shard.
    #[serde(default)]
    pub complete: bool,
    /// For a rank manifest: its rank; absent in the merged one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// For a rank manifest: shards it will write in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_shards: Option<usize>,
    /// Dataset indices of samples skipped because their features were not finite.
    #[serde(default)]
    pub skipped_nonfinite: Vec<i64>,
}

impl Manifest {
    /// A rank's manifest path.
    pub fn rank_path(dir: &Path, rank: usize) -> PathBuf {
        dir.join(format!("manifest.rank-{rank:05}.json"))
    }

    /// Reads and checks format and version.
    pub fn read(path: &Path) -> Result<Self> {
        let m: Manifest = read_json(path)?;
        if m.format != FORMAT {
            return Err(Error::config(path, "format", format!("is `{}`, expected `{FORMAT}`", m.format)));
        }
        if m.version != VERSION {
            return Err(Error::config(
                path,
                "version",
                format!("is {}, this build reads version {VERSION} (re-extract the chunk)", m.version),
            ));
        }
        Ok(m)
    }

    /// Writes it atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Json { path: path.to_path_buf(), source: e })?;
        write_atomic(path, text.as_bytes())
    }

    /// Everything that must agree between a rerun and what is on disk, as (field, value) pairs.
    pub fn fingerprint(&self) -> Vec<(&'static str, String)> {
        vec![
            ("target.config_hash", self.target.config_hash.clone()),
            ("aux_layer_ids", format!("{:?}", self.aux_layer_ids)),
            ("hidden_size", self.hidden_size.to_string()),
            ("dtype", self.dtype.clone()),
            ("run.dataset_xxh3", self.run.dataset_xxh3.clone()),
            ("run.max_len", self.run.max_len.to_string()),
            ("run.truncation", self.run.truncation.clone()),
            ("run.compute_dtype", self.run.compute_dtype.clone()),
            ("run.world_size", self.run.world_size.to_string()),
            ("run.shard_bytes", self.run.shard_bytes.to_string()),
            ("run.batch_tokens", self.run.batch_tokens.to_string()),
            ("run.max_batch_size", self.run.max_batch_size.to_string()),
            ("run.tokenizer_xxh3", self.run.tokenizer_xxh3.clone()),
            ("run.chunk", self.run.chunk.to_string()),
            ("run.chunk_samples", self.run.chunk_samples.to_string()),
            ("run.planned_samples", self.run.planned_samples.to_string()),
            ("run.planned_tokens", self.run.planned_tokens.to_string()),
        ]
    }

    /// Errors naming the first field where `other` (on disk at `path`) differs from `self`.
    pub fn check_same_run(&self, other: &Manifest, path: &Path) -> Result<()> {
        for ((field, a), (_, b)) in self.fingerprint().into_iter().zip(other.fingerprint()) {
            if a != b {
                return Err(Error::config(
                    path,
                    field,
                    format!("is {b} on disk but {a} in this run: the directory holds another extraction; use a new --out or delete it"),
                ));
            }
        }
        Ok(())
    }
}

/// Merges every rank manifest in `dir` into `manifest.json`, under the chunk's lock.
///
/// # Errors
/// A rank manifest from a different run (another dataset, world size, ...) is an error naming it.
pub fn merge(dir: &Path) -> Result<Manifest> {
    let _lock = FileLock::acquire(&dir.join(".manifest.lock"))?;
    let mut ranks: Vec<(PathBuf, Manifest)> = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in entries {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("manifest.rank-") && name.ends_with(".json") {
            ranks.push((p.clone(), Manifest::read(&p)?));
        } else if name.starts_with(".manifest.json.tmp-") {
            // A merge killed mid-write; we hold the lock, so nobody else is writing it.
            let _ = std::fs::remove_file(&p);
        }
    }
    ranks.sort_by(|a, b| a.0.cmp(&b.0));
    let Some((_, first)) = ranks.first() else {
        return Err(Error::Shard { path: dir.join(MANIFEST), reason: "no rank manifest to merge".into() });
    };
    let mut merged = first.clone();
    merged.rank = None;
    merged.planned_shards = None;
    merged.shards.clear();
    merged.skipped_nonfinite.clear();
    let world = first.run.world_size;
    let mut done_ranks = 0;
    for (p, m) in &ranks {
        first.check_same_run(m, p)?;
        if m.rank.is_some_and(|r| r >= world) {
            return Err(Error::config(p, "rank", format!("is {:?} but the run has world_size {world}", m.rank)));
        }
        merged.shards.extend(m.shards.iter().cloned());
        merged.skipped_nonfinite.extend(&m.skipped_nonfinite);
        if m.planned_shards == Some(m.shards.len()) {
            done_ranks += 1;
        }
    }
    merged.shards.sort_by(|a, b| a.file.cmp(&b.file));
    merged.skipped_nonfinite.sort_unstable();
    merged.samples = merged.shards.iter().map(|s| s.samples).sum();
    merged.tokens = merged.shards.iter().map(|s| s.tokens).sum();
    merged.complete = done_ranks == world;
    merged.write(&dir.join(MANIFEST))?;
    Ok(merged)
}
