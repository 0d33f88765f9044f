//! The draft vocabulary: the `Vd` target tokens the draft head predicts, chosen from loss-masked
//! token frequencies (SpecForge's `generate_vocab_mapping_file`), as the two tensors the serving
//! engines read:
//!
//! - `d2t` `[Vd]` int64 offsets: target id = draft id + `d2t[draft id]` (non-decreasing, ≥ 0);
//! - `t2d` `[V]` bool: whether a target id is in the draft vocabulary (exactly `Vd` trues).
//!
//! Selection, fully deterministic: the forced tokens (EOS / stop tokens and the chat-control
//! tokens the template emits) first, then the most frequent supervised tokens, ties broken by the
//! smaller id; if the data has fewer distinct tokens than the slots left, the smallest unused ids
//! pad the rest (SpecForge PR #76). The chosen ids are sorted ascending, so draft id order is
//! target id order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::config::recipe::DEFAULT_DRAFT_VOCAB_SIZE;
use crate::config::{DataConfig, TargetSpec};
use crate::data::{stop_ids, Sample, Tokenizer};
use crate::error::{Error, Result};
use crate::extract::Chunk;
use crate::runtime::{side_file, LoadedTarget, Runtime};

/// `specforge-rs vocab`: the stage's whole input.
#[derive(clap::Args, Debug, Clone)]
pub struct VocabJob {
    /// The target (its tokenizer and config; no weights are loaded).
    #[command(flatten)]
    pub target: TargetSpec,
    /// Count tokens of this dataset (JSONL conversations with assistant turns).
    #[arg(long, conflicts_with = "shards")]
    pub data: Option<PathBuf>,
    /// Or count tokens of extracted chunks (repeatable).
    #[arg(long)]
    pub shards: Vec<PathBuf>,
    /// Draft vocabulary size Vd (the recipe's `draft.draft_vocab_size`).
    #[arg(long, visible_alias = "draft-vocab", default_value_t = DEFAULT_DRAFT_VOCAB_SIZE)]
    pub draft_vocab_size: usize,
    /// Output safetensors file with `d2t` [Vd] int64 and `t2d` [V] bool; the coverage report is
    /// written beside it as JSON (`X.json` for `X.safetensors`).
    #[arg(long)]
    pub out: PathBuf,
    /// Where the bad-line report goes (JSONL); default `<out>.bad-lines.jsonl`.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// How the dataset is read.
    #[command(flatten)]
    pub dataset: DataConfig,
}

/// What `vocab` wrote.
#[derive(Debug, Clone)]
pub struct VocabResult {
    /// The vocabulary.
    pub vocab: DraftVocab,
    /// The coverage report (JSON) beside the output.
    pub report: PathBuf,
}

/// The coverage report's path: `X.json` beside `X.safetensors`, never the output itself.
pub fn report_path(out: &Path) -> PathBuf {
    let p = out.with_extension("json");
    if p == out {
        side_file(out, ".report.json")
    } else {
        p
    }
}

/// Runs `vocab` with its own target.
pub fn run(job: &VocabJob, rt: &Runtime) -> Result<VocabResult> {
    run_on(&LoadedTarget::open(&job.target, rt)?, job, rt)
}

/// Runs `vocab` on an opened target (only its tokenizer and config are used).
pub fn run_on(target: &LoadedTarget, job: &VocabJob, rt: &Runtime) -> Result<VocabResult> {
    let v = target.cfg.vocab_size as usize;
    let counts = if let Some(data) = &job.data {
        let report = job.report.clone().unwrap_or_else(|| side_file(&job.out, ".bad-lines.jsonl"));
        count_samples(&target.samples(data, &job.dataset, &report, rt)?, v)?
    } else if !job.shards.is_empty() {
        let mut counts = vec![0u64; v];
        for dir in &job.shards {
            let chunk = Chunk::open(dir)?;
            if chunk.manifest().target.config_hash != target.cfg.config_hash {
                return Err(Error::Input(format!(
                    "{}: extracted from target config {} but --target {} has config {}",
                    dir.display(),
                    chunk.manifest().target.config_hash,
                    target.spec.name,
                    target.cfg.config_hash
                )));
            }
            let pairs = (0..chunk.num_samples()).map(|i| chunk.tokens(i)).collect::<Result<Vec<_>>>()?;
            let c = count_tokens(pairs, v)?;
            counts.iter_mut().zip(c).for_each(|(a, b)| *a += b);
        }
        counts
    } else {
        return Err(Error::Input("give --data (a dataset) or --shards (extracted chunks) to count tokens from".into()));
    };
    write_vocab(target, &counts, job.draft_vocab_size, &job.out)
}

/// The vocabulary of `draft_vocab_size` tokens from `counts` (`[V]`) and the target's forced
/// tokens, saved to `out` with its coverage report beside it. `run` calls this with the samples
/// it has already tokenised, so the dataset is read once.
pub fn write_vocab(target: &LoadedTarget, counts: &[u64], draft_vocab_size: usize, out: &Path) -> Result<VocabResult> {
    let forced = forced_tokens(&target.tok, &target.cfg.eos_token_ids);
    let dv = build(counts, draft_vocab_size, &forced)?;
    dv.save(out, &target.cfg.config_hash)?;
    let report = report_path(out);
    let text = serde_json::to_string_pretty(&dv.report_json(Some(&target.tok))).map_err(|e| Error::Input(e.to_string()))?;
    crate::util::fs::write_atomic(&report, text.as_bytes())?;
    Ok(VocabResult { vocab: dv, report })
}

/// A draft vocabulary and how well it covers the training tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftVocab {
    /// Target ids in the draft vocabulary, ascending, `[Vd]`.
    pub used: Vec<i64>,
    /// `[Vd]`: `used[i] - i`.
    pub d2t: Vec<i64>,
    /// `[V]`: membership.
    pub t2d: Vec<bool>,
    /// Tokens included regardless of frequency, ascending.
    pub forced: Vec<i64>,
    /// Supervised tokens counted.
    pub total_tokens: u64,
    /// Of those, tokens whose id is in the draft vocabulary.
    pub covered_tokens: u64,
    /// Distinct supervised ids seen.
    pub distinct: usize,
    /// Slots filled with unseen ids because the data had too few distinct tokens.
    pub padded: usize,
}

impl DraftVocab {
    /// Fraction of supervised training tokens the draft vocabulary covers (1.0 when none counted).
    pub fn coverage(&self) -> f64 {
        if self.total_tokens == 0 {
            1.0
        } else {
            self.covered_tokens as f64 / self.total_tokens as f64
        }
    }

    /// `Vd`.
    pub fn draft_vocab_size(&self) -> usize {
        self.used.len()
    }

    /// `d2t` as an int64 tensor `[Vd]` and `t2d` as a bool tensor `[V]`, on the CPU.
    pub fn tensors(&self) -> (Tensor, Tensor) {
        (Tensor::from_slice(&self.d2t), Tensor::from_slice(&self.t2d))
    }

    /// Writes `d2t` and `t2d` to a safetensors file (atomically), with the coverage numbers and
    /// `config_hash` in the header metadata.
    pub fn save(&self, path: &Path, config_hash: &str) -> Result<()> {
        let (d2t, t2d) = self.tensors();
        // One metadata key holding JSON: safetensors writes the map in hash order, and the file
        // should be byte-identical across runs.
        let info = json!({
            "format": "specforge-vocab",
            "draft_vocab_size": self.used.len(),
            "target_vocab_size": self.t2d.len(),
            "coverage": self.coverage(),
            "total_tokens": self.total_tokens,
            "covered_tokens": self.covered_tokens,
            "config_hash": config_hash,
        });
        let meta: HashMap<String, String> = HashMap::from([("specforge".to_string(), info.to_string())]);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        crate::weights::save_safetensors(path, &[("d2t".into(), d2t), ("t2d".into(), t2d)], Some(meta))
    }

    /// The coverage report as JSON.
    pub fn report_json(&self, tok: Option<&Tokenizer>) -> serde_json::Value {
        let forced: Vec<serde_json::Value> =
            self.forced.iter().map(|&id| json!({"id": id, "token": tok.and_then(|t| t.id_to_token(id))})).collect();
        json!({
            "draft_vocab_size": self.used.len(),
            "target_vocab_size": self.t2d.len(),
            "total_tokens": self.total_tokens,
            "covered_tokens": self.covered_tokens,
            "coverage": self.coverage(),
            "distinct_tokens": self.distinct,
            "padded_slots": self.padded,
            "forced": forced,
        })
    }
}

/// Reads `d2t` and `t2d` back from a file written by [`DraftVocab::save`], checking the
/// invariants (a wrong file is an error naming it, never a silently scrambled head).
pub fn load(path: &Path) -> Result<(Tensor, Tensor)> {
    let f = crate::weights::SafetensorsFile::open(path)?;
    let d2t = f.tensor("d2t")?;
    let t2d = f.tensor("t2d")?;
    if d2t.kind() != Kind::Int64 || t2d.kind() != Kind::Bool {
        return Err(Error::Dtype {
            name: "d2t / t2d".into(),
            expected: "int64 / bool".into(),
            got: format!("{:?} / {:?}", d2t.kind(), t2d.kind()),
            path: Some(path.to_path_buf()),
        });
    }
    let d: Vec<i64> = Vec::try_from(&d2t)?;
    let t: Vec<bool> = Vec::try_from(&t2d)?;
    check_invariants(&d, &t).map_err(|reason| Error::Safetensors { path: path.to_path_buf(), reason })?;
    Ok((d2t, t2d))
}

/// Checks `d2t` / `t2d`: `t2d` has exactly `Vd` trues and `draft + d2t[draft]` enumerates them in
/// ascending order.
pub fn check_invariants(d2t: &[i64], t2d: &[bool]) -> std::result::Result<(), String> {
    let trues = t2d.iter().filter(|&&b| b).count();
    if trues != d2t.len() {
        return Err(format!("t2d has {trues} trues but d2t has {} entries", d2t.len()));
    }
    let mut prev = -1i64;
    for (i, &off) in d2t.iter().enumerate() {
        let t = i as i64 + off;
        if t <= prev || t < 0 || t as usize >= t2d.len() || !t2d[t as usize] {
            return Err(format!("d2t[{i}] = {off} maps draft id {i} to target id {t}, which is out of order or not in t2d"));
        }
        prev = t;
    }
    Ok(())
}

/// Counts supervised (`loss_mask == 1`) token ids, `[V]`.
///
/// # Errors
/// [`Error::Input`] for an id outside `0..vocab_size`, naming the sample.
pub fn count_tokens<'a>(samples: impl IntoIterator<Item = (&'a [i64], &'a [u8])>, vocab_size: usize) -> Result<Vec<u64>> {
    let mut counts = vec![0u64; vocab_size];
    for (n, (ids, mask)) in samples.into_iter().enumerate() {
        for (&id, &m) in ids.iter().zip(mask) {
            if m == 0 {
                continue;
            }
            let slot = usize::try_from(id)
                .ok()
                .and_then(|i| counts.get_mut(i))
                .ok_or_else(|| Error::Input(format!("sample {n}: token id {id} outside the target vocabulary 0..{vocab_size}")))?;
            *slot += 1;
        }
    }
    Ok(counts)
}

/// Counts supervised tokens of tokenised samples.
pub fn count_samples(samples: &[Sample], vocab_size: usize) -> Result<Vec<u64>> {
    count_tokens(samples.iter().map(|s| (s.input_ids.as_slice(), s.loss_mask.as_slice())), vocab_size)
}

/// Tokens every draft vocabulary keeps: the EOS ids, the stop tokens, and the special tokens the
/// chat template emits around turns (`<|im_start|>`, `<|im_end|>`, ...), found by rendering a
/// probe conversation.
pub fn forced_tokens(tok: &Tokenizer, eos_ids: &[i64]) -> Vec<i64> {
    let mut set: BTreeSet<i64> = stop_ids(tok, eos_ids).into_iter().collect();
    let special: BTreeMap<i64, String> = tok.special_added_tokens().into_iter().collect();
    let probe = json!([
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
        {"role": "user", "content": "v"},
    ]);
    for gen in [false, true] {
        // A template that rejects the probe just contributes nothing here.
        if let Ok(text) = tok.apply_chat_template(&probe, gen) {
            if let Ok(ids) = tok.encode(&text, false) {
                set.extend(ids.into_iter().filter(|id| special.contains_key(id)));
            }
        }
    }
    set.into_iter().collect()
}

/// Chooses `draft_vocab_size` ids from `counts` (`[V]`), `forced` ids first.
///
/// # Errors
/// [`Error::Input`] when `Vd` is 0 or larger than `V`, when the forced ids do not fit, or when a
/// forced id is outside the vocabulary.
pub fn build(counts: &[u64], draft_vocab_size: usize, forced: &[i64]) -> Result<DraftVocab> {
    let v = counts.len();
    if draft_vocab_size == 0 || draft_vocab_size > v {
        return Err(Error::Input(format!("--draft-vocab {draft_vocab_size} must be in 1..={v} (the target vocabulary)")));
    }
    let forced: BTreeSet<i64> = forced.iter().copied().collect();
    if let Some(bad) = forced.iter().find(|&&id| id < 0 || id as usize >= v) {
        return Err(Error::Input(format!("forced token id {bad} is outside the target vocabulary 0..{v}")));
    }
    if forced.len() > draft_vocab_size {
        return Err(Error::Input(format!(
            "--draft-vocab {draft_vocab_size} cannot hold the {} tokens that must be included ({:?})",
            forced.len(),
            forced
        )));
    }
    let mut chosen = vec![false; v];
    for &id in &forced {
        chosen[id as usize] = true;
    }
    let mut by_freq: Vec<usize> = (0..v).filter(|&i| counts[i] > 0 && !chosen[i]).collect();
    // Most frequent first; equal counts: the smaller id wins (deterministic on every machine).
    by_freq.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    let mut left = draft_vocab_size - forced.len();
    for &i in by_freq.iter().take(left) {
        chosen[i] = true;
    }
    left -= by_freq.len().min(left);
    let padded = left;
    let mut i = 0;
    while left > 0 {
        if !chosen[i] {
            chosen[i] = true;
            left -= 1;
        }
        i += 1;
    }
    let used: Vec<i64> = (0..v).filter(|&i| chosen[i]).map(|i| i as i64).collect();
    let d2t: Vec<i64> = used.iter().enumerate().map(|(i, &t)| t - i as i64).collect();
    let total_tokens: u64 = counts.iter().sum();
    let covered_tokens: u64 = used.iter().map(|&t| counts[t as usize]).sum();
    Ok(DraftVocab {
        used,
        d2t,
        t2d: chosen,
        forced: forced.into_iter().collect(),
        total_tokens,
        covered_tokens,
        distinct: counts.iter().filter(|&&c| c > 0).count(),
        padded,
    })
}

/// `d2t` and `t2d` as tensors on `device`, for the trainer.
pub fn to_device(vocab: &DraftVocab, device: Device) -> (Tensor, Tensor) {
    let (d, t) = vocab.tensors();
    (d.to_device(device), t.to_device(device))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_never_overwrites_the_vocabulary() {
        assert_eq!(report_path(Path::new("v.safetensors")), Path::new("v.json"));
        assert_eq!(report_path(Path::new("v.json")), Path::new("v.json.report.json"));
    }

    #[test]
    fn ties_forced_and_padding() {
        // ids:    0  1  2  3  4  5  6  7
        let counts = [0, 5, 3, 3, 9, 0, 3, 0];
        let v = build(&counts, 4, &[7]).unwrap();
        // forced 7; then 4 (9), 1 (5), 2 (3, smallest id among the 3s).
        assert_eq!(v.used, vec![1, 2, 4, 7]);
        assert_eq!(v.d2t, vec![1, 1, 2, 4]);
        assert_eq!(v.t2d.iter().filter(|&&b| b).count(), 4);
        assert_eq!(v.covered_tokens, 5 + 3 + 9);
        assert_eq!(v.total_tokens, 23);
        check_invariants(&v.d2t, &v.t2d).unwrap();
        // Too few distinct tokens: pad with the smallest unused ids.
        let v = build(&[0, 0, 4, 0, 1], 4, &[]).unwrap();
        assert_eq!(v.used, vec![0, 1, 2, 4]);
        assert_eq!(v.padded, 2);
        assert!(build(&counts, 9, &[]).is_err());
        assert!(build(&counts, 1, &[1, 2]).is_err());
    }
}
