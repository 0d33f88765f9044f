//! Run recipes: strict TOML (every unknown key is an error naming it), sections by stage, with
//! dotted command-line overrides (`--set train.lr=2e-4`). The resolved recipe is written into
//! every checkpoint.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{read_to_string, Error, Result};

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The frozen target.
    pub target: TargetSection,
    /// Training data.
    #[serde(default)]
    pub data: DataSection,
    /// Draft architecture.
    pub draft: DraftSection,
    /// Optimisation.
    #[serde(default)]
    pub train: TrainSection,
    /// Feature extraction (`run`).
    #[serde(default)]
    pub extract: ExtractSection,
    /// Acceptance evaluation (`run`).
    #[serde(default)]
    pub eval: EvalSection,
    /// Export (`run`).
    #[serde(default)]
    pub export: ExportSection,
}

/// `[target]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    /// Short name (`smollm2-135m`), Hugging Face repo id in the local cache, or a directory.
    pub name: String,
    /// Compute dtype of the target forward: `auto` (bf16 on a GPU, f32 on the CPU), `f32`,
    /// `bf16` or `f16`.
    #[serde(default = "defaults::dtype")]
    pub dtype: String,
    /// A multimodal target (images in the data); only text targets are implemented so far.
    #[serde(default)]
    pub multimodal: bool,
}

/// `[data]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Conversations or prompts (JSONL, OpenAI messages or ShareGPT), relative to the recipe.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Held-out prompts for the acceptance evaluation (`run`), relative to the recipe.
    #[serde(default)]
    pub eval_path: Option<PathBuf>,
    /// `run`: the target writes the assistant turns itself (on-policy data) before training.
    #[serde(default = "defaults::yes")]
    pub regenerate: bool,
    /// Regeneration: new tokens per answer at most.
    #[serde(default = "defaults::regen_max_new_tokens")]
    pub max_new_tokens: usize,
    /// Regeneration: 0 = greedy.
    #[serde(default)]
    pub temperature: f64,
    /// Regeneration: conversations per batch.
    #[serde(default = "defaults::regen_batch_size")]
    pub batch_size: usize,
    /// Use at most this many conversations.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Extracted feature chunks to train on (`train`; `run` extracts its own).
    #[serde(default)]
    pub features: Vec<PathBuf>,
    /// Tokens per sample at most (longer samples are truncated).
    #[serde(default = "defaults::max_len")]
    pub max_len: i64,
    /// Stop when more than this fraction of the dataset's lines are bad.
    #[serde(default = "defaults::max_bad_fraction")]
    pub max_bad_fraction: f64,
    /// `run`: samples per extracted chunk (chunked-rolling epochs); 0 = one chunk.
    #[serde(default)]
    pub chunk_samples: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every DataSection field has a default"))
    }
}

/// `[extract]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExtractSection {
    /// Padded tokens per forward batch.
    #[serde(default = "defaults::batch_tokens")]
    pub batch_tokens: usize,
    /// Samples per forward batch.
    #[serde(default = "defaults::extract_batch")]
    pub max_batch_size: usize,
    /// Feature dtype on disk: bf16, f16 or f32.
    #[serde(default = "defaults::store_dtype")]
    pub store_dtype: String,
    /// Shard size limit in MiB.
    #[serde(default = "defaults::shard_mb")]
    pub shard_mb: u64,
    /// Disk budget for features in GB: a chunk that would exceed it is refused before writing.
    #[serde(default)]
    pub max_disk_gb: Option<f64>,
}

impl Default for ExtractSection {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every ExtractSection field has a default"))
    }
}

/// `[eval]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Draft tokens per speculative step.
    #[serde(default = "defaults::eval_k")]
    pub k: usize,
    /// New tokens per held-out prompt.
    #[serde(default = "defaults::eval_new_tokens")]
    pub max_new_tokens: usize,
    /// Held-out prompts used at most.
    #[serde(default)]
    pub limit: Option<usize>,
}

impl Default for EvalSection {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every EvalSection field has a default"))
    }
}

/// `[export]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    /// `vllm` (flat; SGLang loads the same) or `speculators`.
    #[serde(default = "defaults::export_format")]
    pub format: String,
    /// Hugging Face repo the head is meant for (`push`), recorded in the model card.
    #[serde(default)]
    pub repo: Option<String>,
}

impl Default for ExportSection {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every ExportSection field has a default"))
    }
}

/// `[draft]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DraftSection {
    /// `eagle3` or `eagle3.1` (fc_norm + norm_output).
    #[serde(default = "defaults::variant")]
    pub variant: String,
    /// Aux ids in our convention (id k = residual stream entering target layer k).
    pub aux_layer_ids: Vec<i64>,
    /// Draft vocabulary size.
    pub draft_vocab_size: i64,
    /// MLP width; the target's when absent.
    #[serde(default)]
    pub intermediate_size: Option<i64>,
    /// Start lm_head from the target's rows of the draft vocabulary.
    #[serde(default = "defaults::yes")]
    pub init_lm_head_from_target: bool,
    /// The draft vocabulary (`d2t` / `t2d` safetensors written by `vocab`); absent means the
    /// full target vocabulary (then `draft_vocab_size` must equal it).
    #[serde(default)]
    pub vocab: Option<PathBuf>,
}

/// `[train]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// TTT unroll length.
    #[serde(default = "defaults::ttt_steps")]
    pub ttt_steps: usize,
    /// Loss weight of step k is `step_decay^k`.
    #[serde(default = "defaults::step_decay")]
    pub step_decay: f64,
    /// Peak learning rate.
    #[serde(default = "defaults::lr")]
    pub lr: f64,
    /// Learning rate at the end of the cosine.
    #[serde(default)]
    pub min_lr: f64,
    /// Fraction of the optimizer steps spent in linear warmup.
    #[serde(default = "defaults::warmup_ratio")]
    pub warmup_ratio: f64,
    /// Passes over the data.
    #[serde(default = "defaults::epochs")]
    pub epochs: u64,
    /// Stop after this many optimizer steps (all epochs), if set.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Micro-batches per optimizer step (per rank).
    #[serde(default = "defaults::one")]
    pub grad_accum: u64,
    /// Clip the global gradient norm to this (0 = off).
    #[serde(default = "defaults::max_grad_norm")]
    pub max_grad_norm: f64,
    /// AdamW decoupled weight decay (matrices only; norms never decay).
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW β1.
    #[serde(default = "defaults::beta1")]
    pub adam_beta1: f64,
    /// AdamW β2.
    #[serde(default = "defaults::beta2")]
    pub adam_beta2: f64,
    /// AdamW ε.
    #[serde(default = "defaults::adam_eps")]
    pub adam_eps: f64,
    /// Padded tokens per micro-batch at most.
    #[serde(default = "defaults::token_budget")]
    pub token_budget: i64,
    /// Samples per micro-batch at most.
    #[serde(default = "defaults::max_batch_size")]
    pub max_batch_size: usize,
    /// Seed for initialisation and data order.
    #[serde(default)]
    pub seed: u64,
    /// Write a checkpoint every this many optimizer steps (0 = only at the end).
    #[serde(default = "defaults::save_every")]
    pub save_every: u64,
    /// Checkpoints kept.
    #[serde(default = "defaults::keep_last")]
    pub keep_last: usize,
    /// bf16 autocast on a GPU.
    #[serde(default = "defaults::yes")]
    pub bf16: bool,
    /// DDP gradient bucket size in MiB (gradients are flattened and all-reduced per bucket).
    #[serde(default = "defaults::ddp_bucket_mb")]
    pub ddp_bucket_mb: f64,
    /// Timeout of each collective, seconds: a dead or frozen rank turns into an error naming it.
    #[serde(default = "defaults::collective_timeout_s")]
    pub collective_timeout_s: u64,
}

impl Default for TrainSection {
    fn default() -> Self {
        // Deserialising an empty table applies every field default in one place.
        toml::from_str("").unwrap_or_else(|_| unreachable!("every TrainSection field has a default"))
    }
}

mod defaults {
    pub fn dtype() -> String {
        "auto".into()
    }
    pub fn regen_max_new_tokens() -> usize {
        512
    }
    pub fn regen_batch_size() -> usize {
        16
    }
    pub fn max_bad_fraction() -> f64 {
        0.05
    }
    pub fn batch_tokens() -> usize {
        8192
    }
    pub fn extract_batch() -> usize {
        32
    }
    pub fn store_dtype() -> String {
        "bf16".into()
    }
    pub fn shard_mb() -> u64 {
        1024
    }
    pub fn eval_k() -> usize {
        5
    }
    pub fn eval_new_tokens() -> usize {
        128
    }
    pub fn export_format() -> String {
        "vllm".into()
    }
    pub fn variant() -> String {
        "eagle3".into()
    }
    pub fn yes() -> bool {
        true
    }
    pub fn max_len() -> i64 {
        2048
    }
    pub fn ttt_steps() -> usize {
        7
    }
    pub fn step_decay() -> f64 {
        0.8
    }
    pub fn lr() -> f64 {
        1e-4
    }
    pub fn warmup_ratio() -> f64 {
        0.015
    }
    pub fn epochs() -> u64 {
        1
    }
    pub fn one() -> u64 {
        1
    }
    pub fn max_grad_norm() -> f64 {
        0.5
    }
    pub fn beta1() -> f64 {
        0.9
    }
    pub fn beta2() -> f64 {
        0.999
    }
    pub fn adam_eps() -> f64 {
        1e-8
    }
    pub fn token_budget() -> i64 {
        8192
    }
    pub fn max_batch_size() -> usize {
        16
    }
    pub fn save_every() -> u64 {
        100
    }
    pub fn keep_last() -> usize {
        3
    }
    pub fn ddp_bucket_mb() -> f64 {
        25.0
    }
    pub fn collective_timeout_s() -> u64 {
        300
    }
}

/// Sets `a.b.c = value` in a TOML tree; `value` is parsed as TOML (so `2e-4`, `true`, `[1,2]`,
/// `"text"` work) and falls back to a bare string.
fn apply_override(root: &mut toml::Table, assignment: &str) -> std::result::Result<(), String> {
    let (key, raw) = assignment.split_once('=').ok_or_else(|| format!("override `{assignment}` is not key=value"))?;
    let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let (last, path) = parts.split_last().ok_or_else(|| format!("override `{assignment}` has an empty key"))?;
    let mut table = root;
    for p in path {
        table = table
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("override `{assignment}`: `{p}` is not a section"))?;
    }
    table.insert(last.to_string(), parsed);
    Ok(())
}

impl Recipe {
    /// Reads a recipe and applies `key=value` overrides; unknown keys are errors. Relative data
    /// paths are resolved against the recipe's directory, then the working directory.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = read_to_string(path)?;
        let mut r = Self::parse(&text, path, overrides)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !p.exists() && base.join(&*p).exists() {
                *p = base.join(&*p);
            }
        };
        r.data.path.iter_mut().for_each(fix);
        r.data.eval_path.iter_mut().for_each(fix);
        r.data.features.iter_mut().for_each(fix);
        r.draft.vocab.iter_mut().for_each(fix);
        Ok(r)
    }

    /// Parses recipe text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| Error::Toml { path: path.to_path_buf(), message: e.to_string() })?;
        for o in overrides {
            apply_override(&mut table, o).map_err(|m| Error::Toml { path: path.to_path_buf(), message: m })?;
        }
        let recipe: Recipe = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::Toml { path: path.to_path_buf(), message: e.to_string() })?;
        recipe.validate(path)?;
        Ok(recipe)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |field: &str, problem: String| Err(Error::config(path, field, problem));
        if !matches!(self.draft.variant.as_str(), "eagle3" | "eagle3.1") {
            return bad("draft.variant", format!("must be `eagle3` or `eagle3.1`, got `{}`", self.draft.variant));
        }
        if self.train.ttt_steps == 0 {
            return bad("train.ttt_steps", "must be at least 1, got 0".into());
        }
        if self.train.grad_accum == 0 {
            return bad("train.grad_accum", "must be at least 1, got 0".into());
        }
        if !(0.0..1.0).contains(&self.train.warmup_ratio) {
            return bad("train.warmup_ratio", format!("must be in [0, 1), got {}", self.train.warmup_ratio));
        }
        if self.draft.aux_layer_ids.is_empty() {
            return bad("draft.aux_layer_ids", "must not be empty".into());
        }
        if !matches!(self.export.format.as_str(), "vllm" | "sglang" | "speculators") {
            return bad("export.format", format!("must be `vllm`, `sglang` or `speculators`, got `{}`", self.export.format));
        }
        if self.eval.k == 0 {
            return bad("eval.k", "must be at least 1, got 0".into());
        }
        Ok(())
    }

    /// The recipe as TOML text (what checkpoints store).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[target]\nname = \"smollm2-135m\"\n[draft]\naux_layer_ids = [2, 15, 27]\ndraft_vocab_size = 8192\n";

    #[test]
    fn defaults_and_overrides() {
        let r = Recipe::parse(MIN, Path::new("r.toml"), &["train.lr=3e-4".into(), "draft.variant=\"eagle3.1\"".into()]).unwrap();
        assert_eq!(r.train.ttt_steps, 7);
        assert_eq!(r.train.step_decay, 0.8);
        assert_eq!(r.train.lr, 3e-4);
        assert_eq!(r.draft.variant, "eagle3.1");
        let again = Recipe::parse(&r.to_toml(), Path::new("r.toml"), &[]).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = Recipe::parse(&format!("{MIN}[train]\nlearning_rate = 1.0\n"), Path::new("r.toml"), &[]).unwrap_err().to_string();
        assert!(e.contains("r.toml") && e.contains("learning_rate"), "{e}");
        let e = Recipe::parse(MIN, Path::new("r.toml"), &["train.typo=1".into()]).unwrap_err().to_string();
        assert!(e.contains("typo"), "{e}");
        let e = Recipe::parse(MIN, Path::new("r.toml"), &["draft.variant=eagle4".into()]).unwrap_err().to_string();
        assert!(e.contains("draft.variant") && e.contains("eagle4"), "{e}");
    }
}
