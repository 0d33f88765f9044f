//! Run recipes and the stage configs they are made of.
//!
//! Every section of a recipe is the typed config of one stage, and the same type is that stage's
//! command-line arguments (`clap::Args` and `Deserialize` on one struct): `[extract] shard_size`
//! is `extract --shard-size`, and its default is written once, in the `#[arg]` attribute —
//! `Default` parses an empty command line, and serde fills missing keys from `Default`. Paths
//! that only a recipe names (`data.path`, `data.features`, ...) are `#[arg(skip)]`.
//!
//! Recipes are strict TOML (every unknown key is an error naming it) with dotted command-line
//! overrides (`--set train.lr=2e-4`). The resolved recipe is written into every checkpoint.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::{Deserialize, Serialize};

use super::kinds::{ByteSize, DraftVariant, Dtype, ExportFormat, StoreDtype};
use crate::data::Truncation;
use crate::error::{read_to_string, Error, Result};

/// A stage config with every field at its default: clap parses an empty command line, so the
/// default written in the `#[arg]` attribute is the only one.
pub fn clap_defaults<T: Args + clap::FromArgMatches>() -> T {
    let cmd = T::augment_args(clap::Command::new("defaults").no_binary_name(true));
    let matches = cmd.try_get_matches_from(std::iter::empty::<String>());
    match matches.and_then(|m| T::from_arg_matches(&m)) {
        Ok(t) => t,
        Err(e) => unreachable!("every field of a stage config has a default: {e}"),
    }
}

macro_rules! defaults_from_clap {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                clap_defaults()
            }
        }
    )*};
}
defaults_from_clap!(TargetSpec, DataConfig, RegenerateConfig, ExtractConfig, EvalConfig, ExportConfig);

/// Draft vocabulary size when neither `--draft-vocab-size` nor `draft.draft_vocab_size` says.
pub const DEFAULT_DRAFT_VOCAB_SIZE: usize = 32000;

/// Draft tokens per speculative step when neither `--k` nor `eval.k` says.
pub const DEFAULT_K: usize = 5;

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The frozen target.
    #[serde(default)]
    pub target: TargetSpec,
    /// Training data.
    #[serde(default)]
    pub data: DataConfig,
    /// On-policy regeneration (`run` with `data.regenerate`).
    #[serde(default)]
    pub regenerate: RegenerateConfig,
    /// Feature extraction (`run`).
    #[serde(default)]
    pub extract: ExtractConfig,
    /// Draft architecture.
    #[serde(default)]
    pub draft: DraftConfig,
    /// Optimisation.
    #[serde(default)]
    pub train: TrainConfig,
    /// Export (`run`).
    #[serde(default)]
    pub export: ExportConfig,
    /// Acceptance evaluation (`run`).
    #[serde(default)]
    pub eval: EvalConfig,
}

/// `[target]`, and the `--target` / `--dtype` flags of every stage that loads the target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(deny_unknown_fields, default)]
pub struct TargetSpec {
    /// Target: a model directory, a short name (smollm2-135m, ...) or a repo id in the local
    /// Hugging Face cache.
    #[arg(long = "target", id = "name", default_value = "smollm2-135m")]
    pub name: String,
    /// Compute dtype of the target forward: auto (bf16 on a GPU, f32 on the CPU), f32, bf16, f16.
    #[arg(long, value_enum, default_value_t = Dtype::Auto)]
    pub dtype: Dtype,
    /// A multimodal target (images in the data); only text targets are implemented so far.
    #[arg(long)]
    pub multimodal: bool,
}

/// `[data]`, and the dataset flags of regenerate, vocab and extract.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Conversations or prompts (JSONL, OpenAI messages or ShareGPT), relative to the recipe
    /// (the commands take `--data`).
    #[arg(skip)]
    pub path: Option<PathBuf>,
    /// Held-out prompts for the acceptance evaluation (`run`), relative to the recipe.
    #[arg(skip)]
    pub eval_path: Option<PathBuf>,
    /// `run`: the target writes the assistant turns itself (on-policy data) before training.
    #[arg(skip = true)]
    pub regenerate: bool,
    /// Extracted feature chunks to train on (`train`; `run` extracts its own).
    #[arg(skip)]
    pub features: Vec<PathBuf>,
    /// Longest sample in tokens (see `truncation`).
    #[arg(long, default_value_t = 2048)]
    pub max_len: usize,
    /// Over-long samples: `truncate` keeps the first `max_len` tokens if an assistant token
    /// survives (else the line is reported as over_long); `drop` reports every over-long sample.
    #[arg(long, value_enum, default_value_t = Truncation::Truncate)]
    pub truncation: Truncation,
    /// Stop when more than this fraction of lines is bad (every bad line is reported either way).
    #[arg(long, default_value_t = 0.05)]
    pub max_bad_fraction: f64,
    /// Use only the first N usable samples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Samples per feature chunk (chunked-rolling epochs in `run`; `extract --chunk C` writes
    /// chunk C); 0 = the whole dataset is one chunk.
    #[arg(long, default_value_t = 0)]
    pub chunk_samples: usize,
}

/// `[regenerate]`, and the decoding flags of `regenerate` and `generate`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(deny_unknown_fields, default)]
pub struct RegenerateConfig {
    /// New tokens per answer at most.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: usize,
    /// Conversations per batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus mass for sampling, in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sampling seed (batch k uses seed + k, so a resumed run samples the same).
    #[arg(long, default_value_t = 0)]
    pub seed: i64,
}

/// `[extract]`, and the flags of `extract`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(deny_unknown_fields, default)]
pub struct ExtractConfig {
    /// Padded tokens per forward batch.
    #[arg(long, default_value_t = 8192)]
    pub batch_tokens: usize,
    /// Samples per forward batch.
    #[arg(long, default_value_t = 32)]
    pub max_batch_size: usize,
    /// Feature dtype on disk: bf16, f16 or f32.
    #[arg(long, value_enum, default_value_t = StoreDtype::Bf16)]
    pub store_dtype: StoreDtype,
    /// Shard size limit (e.g. 1G, 256M).
    #[arg(long, default_value = "1G")]
    pub shard_size: ByteSize,
    /// Disk budget of one chunk (e.g. 500G): a chunk estimated larger is refused before writing.
    #[arg(long)]
    pub max_disk: Option<ByteSize>,
}

/// `[eval]`, and the flags of `eval`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Draft tokens per speculative step.
    #[arg(long, default_value_t = DEFAULT_K)]
    pub k: usize,
    /// New tokens per prompt.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Prompts used at most.
    #[arg(long)]
    pub limit: Option<usize>,
}

/// `[export]`, and the flags of `export`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Args)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// `vllm` (flat config; SGLang loads the same files) or `speculators`.
    #[arg(long, value_enum, default_value_t = ExportFormat::Vllm)]
    pub format: ExportFormat,
    /// The target's Hugging Face id, recorded as the verifier in the speculators format.
    #[arg(long)]
    pub verifier: Option<String>,
    /// Hugging Face repo the head is meant for (`push`), recorded in the model card.
    #[arg(long)]
    pub repo: Option<String>,
}

/// `[draft]`: the head's architecture (read by `train` and `run`; `extract --aux-layer-ids` and
/// `vocab --draft-vocab-size` are the same values).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DraftConfig {
    /// `eagle3` or `eagle3.1` (fc_norm + norm_output).
    pub variant: DraftVariant,
    /// Aux ids in our convention (id k = residual stream entering target layer k); empty = the
    /// target's default `[2, L/2, L-3]`.
    pub aux_layer_ids: Vec<i64>,
    /// Draft vocabulary size.
    pub draft_vocab_size: usize,
    /// MLP width; the target's when absent.
    pub intermediate_size: Option<i64>,
    /// Start lm_head from the target's rows of the draft vocabulary.
    pub init_lm_head_from_target: bool,
    /// The draft vocabulary (`d2t` / `t2d` safetensors written by `vocab`); absent means the
    /// full target vocabulary (then `draft_vocab_size` must equal it).
    pub vocab: Option<PathBuf>,
    /// A draft `config.json` from another tool (SpecForge's `configs/*-eagle3.json`, a vLLM
    /// draft): it then sets the head's architecture, and its fields are honoured or refused by
    /// name (`train --draft-config`).
    pub config: Option<PathBuf>,
}

impl Default for DraftConfig {
    fn default() -> Self {
        DraftConfig {
            variant: DraftVariant::Eagle3,
            aux_layer_ids: Vec::new(),
            draft_vocab_size: DEFAULT_DRAFT_VOCAB_SIZE,
            intermediate_size: None,
            init_lm_head_from_target: true,
            vocab: None,
            config: None,
        }
    }
}

impl DraftConfig {
    /// The aux ids for a target of `num_layers` decoder layers (the default ones when empty).
    pub fn aux_ids(&self, num_layers: i64) -> Vec<i64> {
        resolve_aux_ids(&self.aux_layer_ids, num_layers)
    }
}

/// `ids`, or `[2, L/2, L-3]` (vLLM's and speculators' default, in our capture-before convention)
/// when empty.
pub fn resolve_aux_ids(ids: &[i64], num_layers: i64) -> Vec<i64> {
    if !ids.is_empty() {
        return ids.to_vec();
    }
    let mut v = vec![2.min(num_layers), num_layers / 2, (num_layers - 3).max(0)];
    v.dedup();
    v
}

/// New tokens per answer at most: beyond any context window a target has.
pub const MAX_NEW_TOKENS: usize = 1 << 20;

fn check_new_tokens(n: usize) -> std::result::Result<(), (&'static str, String)> {
    if n == 0 || n > MAX_NEW_TOKENS {
        return Err(("max_new_tokens", format!("must be in 1..={MAX_NEW_TOKENS}, got {n}")));
    }
    Ok(())
}

impl RegenerateConfig {
    /// Checks the values a command line or a recipe can get wrong: (field, problem).
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(("top_p", format!("must be in (0, 1], got {}", self.top_p)));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(("temperature", format!("must be a finite number >= 0, got {}", self.temperature)));
        }
        if self.batch_size == 0 {
            return Err(("batch_size", "must be at least 1, got 0".into()));
        }
        check_new_tokens(self.max_new_tokens)
    }
}

impl EvalConfig {
    /// Checks the values a command line or a recipe can get wrong: (field, problem).
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.k == 0 {
            return Err(("k", "must be at least 1, got 0".into()));
        }
        check_new_tokens(self.max_new_tokens)
    }
}

/// `[train]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
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

impl Default for TrainConfig {
    fn default() -> Self {
        // Deserialising an empty table applies every field default in one place.
        toml::from_str("").unwrap_or_else(|_| unreachable!("every TrainConfig field has a default"))
    }
}

mod defaults {
    pub fn yes() -> bool {
        true
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
        r.draft.config.iter_mut().for_each(fix);
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
        if self.train.ttt_steps == 0 {
            return bad("train.ttt_steps", "must be at least 1, got 0".into());
        }
        if self.train.grad_accum == 0 {
            return bad("train.grad_accum", "must be at least 1, got 0".into());
        }
        if !(0.0..1.0).contains(&self.train.warmup_ratio) {
            return bad("train.warmup_ratio", format!("must be in [0, 1), got {}", self.train.warmup_ratio));
        }
        if self.draft.draft_vocab_size == 0 {
            return bad("draft.draft_vocab_size", "must be at least 1, got 0".into());
        }
        self.regenerate.validate().or_else(|(f, m)| bad(&format!("regenerate.{f}"), m))?;
        self.eval.validate().or_else(|(f, m)| bad(&format!("eval.{f}"), m))?;
        Ok(())
    }

    /// The recipe as TOML text (what checkpoints store).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// The first dotted key whose value differs between two recipe texts: (key, before, after).
pub fn first_difference(before: &str, after: &str) -> Option<(String, String, String)> {
    fn walk(prefix: &str, a: Option<&toml::Value>, b: Option<&toml::Value>) -> Option<(String, String, String)> {
        let show = |v: Option<&toml::Value>| v.map_or("absent".to_string(), |v| v.to_string());
        match (a, b) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                keys.into_iter().find_map(|k| {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, x.get(k), y.get(k))
                })
            }
            (a, b) if a == b => None,
            (a, b) => Some((prefix.to_string(), show(a), show(b))),
        }
    }
    if before == after {
        return None;
    }
    let parse = |t: &str| toml::from_str::<toml::Table>(t).ok().map(toml::Value::Table);
    match (parse(before), parse(after)) {
        (Some(a), Some(b)) => walk("", Some(&a), Some(&b)),
        _ => Some(("recipe".into(), "unparsable or different text".into(), "this recipe".into())),
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
        assert_eq!(r.draft.variant, DraftVariant::Eagle31);
        let again = Recipe::parse(&r.to_toml(), Path::new("r.toml"), &[]).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn the_first_differing_key_is_named() {
        let a = Recipe::parse(MIN, Path::new("r.toml"), &[]).unwrap().to_toml();
        let b = Recipe::parse(MIN, Path::new("r.toml"), &["train.lr=1e-3".into()]).unwrap().to_toml();
        assert_eq!(first_difference(&a, &a), None);
        assert_eq!(first_difference(&a, &b), Some(("train.lr".into(), "0.0001".into(), "0.001".into())));
        let c = Recipe::parse(MIN, Path::new("r.toml"), &["data.limit=5".into()]).unwrap().to_toml();
        assert_eq!(first_difference(&a, &c), Some(("data.limit".into(), "absent".into(), "5".into())));
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
