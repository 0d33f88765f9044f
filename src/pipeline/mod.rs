//! `run`: the whole pipeline from one recipe, resumable after a kill at any stage.
//!
//! regenerate → vocab → for each epoch, for each chunk: extract → train → delete → export → eval.
//! Each step is the same stage function its command calls (`regenerate::run_on`, `vocab::run_on`,
//! `extract::run_samples`, `train::fit`, `export::export`, `eval::evaluate`) with the recipe's
//! section as its config, on one [`LoadedTarget`] loaded once.
//!
//! Features of a whole dataset exceed the disk, so training is *chunked-rolling*: the dataset's
//! samples are cut into chunks of `data.chunk_samples`; the trainer sees `epochs × chunks`
//! "trainer epochs", trainer epoch `e·C + c` being chunk c in epoch e. A chunk's features are
//! extracted just before it is trained on and deleted once its last step is checkpointed, so the
//! disk never holds more than one chunk. Every stage resumes on its own: regeneration appends by
//! sample id, the vocabulary file is written atomically and reused, extraction skips finished
//! shards, training continues from its latest checkpoint (whose data order depends only on the
//! seed, the epoch and the chunk), and export and evaluation are recomputed. Everything is
//! deterministic, so a killed and rerun `run` ends where an uninterrupted one does.
//!
//! Each chunk's `manifest.json` (its shards' sizes and checksums) is kept in `chunk-manifests/`.
//!
//! The next chunk's extraction is not overlapped with training: on one device the two compete
//! for the same compute, and on CPU for the same cores.

pub mod card;

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Args;
use serde_json::json;
use tch::{Device, Kind};

use crate::config::{ExportConfig, Recipe};
use crate::data::Sample;
use crate::dist::SingleProcess;
use crate::draft::Eagle3Draft;
use crate::error::{Error, Result};
use crate::eval::{EvalJob, SpecStats};
use crate::extract::reader::{plan_batches, plan_batches_for_lengths, BatchOptions, Chunk};
use crate::extract::ExtractJob;
use crate::generate::regenerate::RegenerateJob;
use crate::runtime::{LoadedTarget, Runtime};
use crate::target::head::TargetHead;
use crate::train::setup::build_draft;
use crate::train::trainer::{MicroBatches, StepMetrics, TrainBatch};
use crate::train::TrainResult;
use crate::util::fs::write_atomic;
use card::CardFacts;

/// What a finished run produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    /// The exported head.
    pub export_dir: PathBuf,
    /// Optimizer steps trained.
    pub steps: u64,
    /// The last step's training metrics.
    pub last: Option<StepMetrics>,
    /// Acceptance of the trained head on the held-out prompts.
    pub trained: Option<SpecStats>,
    /// Acceptance of an untrained head (same initialisation, no training) on the same prompts.
    pub untrained: Option<SpecStats>,
    /// Draft tokens per step in the evaluation.
    pub k: usize,
}

/// `specforge-rs export`: the stage's whole input.
#[derive(Args, Debug, Clone)]
pub struct ExportJob {
    /// A checkpoint directory (`runs/x/checkpoints/step-N`), a run directory (its latest
    /// checkpoint is used) or a head directory.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Format, verifier and repo.
    #[command(flatten)]
    pub export: ExportConfig,
}

/// What `export` wrote.
#[derive(Debug, Clone)]
pub struct ExportResult {
    /// The head directory that was exported.
    pub head: PathBuf,
    /// Whether a model card was written (a checkpoint carries its recipe; a bare head does not).
    pub card: bool,
}

/// The `export` stage: a checkpoint (or a head) as a validated serving directory, with a model
/// card from the checkpoint's recipe and its run's training log (acceptance is measured by `eval`
/// or `run`, not here). It joins train's checkpoints, export's format and the run report, so it
/// lives here rather than in `export`, which knows only the serving format.
pub fn export(job: &ExportJob, _rt: &Runtime) -> Result<ExportResult> {
    let head = crate::train::checkpoint::head_dir(&job.checkpoint)?;
    let draft = Eagle3Draft::load(&head, Device::Cpu)?;
    crate::export::export(&draft, &job.out, job.export.format, job.export.verifier.as_deref())?;
    let recipe_path = head.join("recipe.toml");
    if !recipe_path.is_file() {
        return Ok(ExportResult { head, card: false });
    }
    let recipe = Recipe::parse(&crate::error::read_to_string(&recipe_path)?, &recipe_path, &[])?;
    let state: crate::train::checkpoint::TrainState = crate::error::read_json(&head.join("state.json"))?;
    let metrics = head.parent().and_then(Path::parent).map(|run| run.join("metrics.jsonl")).unwrap_or_default();
    let facts = CardFacts {
        aux_layer_ids: draft.cfg.aux_layer_ids.clone(),
        steps: state.step,
        last: crate::train::last_logged(&metrics),
        trained: None,
        untrained: None,
        k: recipe.eval.k,
    };
    card::write(&job.out, &recipe, &facts, &metrics)?;
    Ok(ExportResult { head, card: true })
}

fn state_note(run_dir: &Path, stage: &str) -> Result<()> {
    write_atomic(&run_dir.join("run_state.json"), json!({"stage": stage}).to_string().as_bytes())
}

/// Runs the recipe in `run_dir`: the same stage functions the commands call, in sequence.
pub fn run(recipe: &Recipe, run_dir: &Path, rt: &Runtime) -> Result<RunSummary> {
    // Fail at once, before anything is loaded or written, on what is not implemented yet.
    if recipe.target.multimodal {
        return Err(Error::config(
            "recipe",
            "target.multimodal",
            format!("is true for `{}`, but the vision tower (image patches, M-RoPE positions, deepstack) is not implemented yet: only text targets can run", recipe.target.name),
        ));
    }
    if rt.world_size() > 1 {
        return Err(Error::Input(format!(
            "`run` is one process, but this one is rank {} of {}: run `extract` and `train` under `launch` for data parallelism",
            rt.rank(),
            rt.world_size()
        )));
    }
    let data_path = recipe.data.path.clone().ok_or_else(|| Error::config("recipe", "data.path", "is required by `run`"))?;
    // A run deletes what it extracted under its directory: never in a directory it did not make.
    let recipe_path = run_dir.join("recipe.toml");
    if run_dir.exists() && !recipe_path.is_file() {
        let mut entries = std::fs::read_dir(run_dir).map_err(|e| Error::io(run_dir, e))?;
        if entries.next().is_some() {
            return Err(Error::Input(format!(
                "{} is not empty and is not a run directory (no recipe.toml): give `run` a new or empty --out",
                run_dir.display()
            )));
        }
    }
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    // A run directory belongs to one recipe: resuming with another would mix two runs.
    let recipe_toml = recipe.to_toml();
    if recipe_path.exists() {
        let old = crate::error::read_to_string(&recipe_path)?;
        if let Some((key, then, now)) = crate::config::recipe::first_difference(&old, &recipe_toml) {
            return Err(Error::config(
                &recipe_path,
                key,
                format!("is {then} in this run directory's recipe but {now} now: a run directory belongs to one recipe; use a new --out"),
            ));
        }
    } else {
        write_atomic(&recipe_path, recipe_toml.as_bytes())?;
    }
    let target = LoadedTarget::open(&recipe.target, rt)?;

    // 1. On-policy data: the target answers the prompts itself.
    let train_data = if recipe.data.regenerate {
        state_note(run_dir, "regenerate")?;
        let job = RegenerateJob {
            target: recipe.target.clone(),
            data: data_path.clone(),
            out: run_dir.join("regenerated.jsonl"),
            report: Some(run_dir.join("regenerate.bad-lines.jsonl")),
            dataset: recipe.data.clone(),
            decode: recipe.regenerate.clone(),
        };
        let stats = crate::generate::regenerate::run_on(&target, &job, rt)?;
        println!("run: regenerated {} answers ({} already done, {} new tokens)", stats.written, stats.resumed, stats.new_tokens);
        job.out
    } else {
        data_path.clone()
    };

    // 2. Tokenised samples with loss masks.
    let samples = target.samples(&train_data, &recipe.data, &run_dir.join("train.bad-lines.jsonl"), rt)?;

    // 3. The draft vocabulary (reused when a previous run wrote it).
    state_note(run_dir, "vocab")?;
    let vocab_path = match &recipe.draft.vocab {
        Some(p) => p.clone(),
        None => {
            let p = run_dir.join("vocab.safetensors");
            if crate::vocab::load(&p).is_err() {
                let counts = crate::vocab::count_samples(&samples, target.cfg.vocab_size as usize)?;
                let v = crate::vocab::write_vocab(&target, &counts, recipe.draft.draft_vocab_size, &p)?;
                println!(
                    "run: draft vocabulary of {} tokens covers {:.1}% of the supervised tokens",
                    v.vocab.draft_vocab_size(),
                    100.0 * v.vocab.coverage()
                );
            }
            p
        }
    };
    let mut recipe = recipe.clone();
    recipe.draft.vocab = Some(vocab_path);
    recipe.draft.aux_layer_ids = recipe.draft.aux_ids(target.cfg.num_hidden_layers);

    // 4. Chunked-rolling training: each chunk extracted by the `extract` stage, trained on, deleted.
    let model = target.model()?;
    let head = TargetHead {
        cfg: target.cfg.clone(),
        embed_tokens: model.embed_tokens().to_kind(Kind::Float),
        lm_head: model.lm_head().to_kind(Kind::Float),
        dir: target.dir.clone(),
    };
    let extract = ExtractJob {
        target: recipe.target.clone(),
        data: train_data.clone(),
        out: PathBuf::new(),
        aux_layer_ids: recipe.draft.aux_layer_ids.clone(),
        chunk: 0,
        report: None,
        dataset: recipe.data.clone(),
        extract: recipe.extract.clone(),
    };
    let rolling = Rolling::new(&recipe, &target, &samples, extract, run_dir.join("chunks"), rt)?;
    state_note(run_dir, "train")?;
    let train_dir = run_dir.join("train");
    let epochs = recipe.train.epochs * rolling.num_chunks() as u64;
    let TrainResult { draft, steps, last } =
        crate::train::fit(&recipe, &head, &rolling, epochs, &train_dir, None, true, &SingleProcess, rt)?;

    // 5. Export.
    state_note(run_dir, "export")?;
    let export_dir = run_dir.join("export");
    crate::export::export(&draft, &export_dir, recipe.export.format, recipe.export.verifier.as_deref())?;

    // 6. Acceptance on held-out prompts: the trained head against an untrained one.
    state_note(run_dir, "eval")?;
    let (trained, untrained) = match &recipe.data.eval_path {
        Some(p) => {
            let job = EvalJob {
                target: recipe.target.clone(),
                draft: export_dir.clone(),
                data: p.clone(),
                eval: recipe.eval.clone(),
                json: None,
            };
            let exported = Eagle3Draft::load(&job.draft, rt.device)?;
            let fresh = build_draft(&recipe, &head, None, rt.device)?;
            let t = crate::eval::evaluate(&target, &exported, &job.data, &job.eval, rt)?;
            let u = crate::eval::evaluate(&target, &fresh, &job.data, &job.eval, rt)?;
            (Some(t.stats), Some(u.stats))
        }
        None => (None, None),
    };
    let summary = RunSummary { export_dir: export_dir.clone(), steps, last, trained, untrained, k: recipe.eval.k };
    let report = serde_json::to_string_pretty(&summary).map_err(|e| Error::Input(e.to_string()))?;
    write_atomic(&run_dir.join("summary.json"), report.as_bytes())?;
    let facts = CardFacts {
        aux_layer_ids: recipe.draft.aux_layer_ids.clone(),
        steps,
        last: summary.last.clone(),
        trained: summary.trained.clone(),
        untrained: summary.untrained.clone(),
        k: recipe.eval.k,
    };
    card::write(&export_dir, &recipe, &facts, &train_dir.join("metrics.jsonl"))?;
    state_note(run_dir, "done")?;
    Ok(summary)
}

/// The trainer's view of chunked-rolling data: trainer epoch `e·C + c` is chunk c of epoch e,
/// extracted on first use (by the `extract` stage) and deleted once trained.
struct Rolling<'a> {
    target: &'a LoadedTarget,
    samples: &'a [Sample],
    /// The extract stage's input; `chunk` and `out` are set per chunk.
    job: ExtractJob,
    /// Per chunk: (dataset index, tokens after truncation) of each sample.
    lengths: Vec<Vec<(i64, usize)>>,
    root: PathBuf,
    /// Where each trained chunk's manifest is kept after its features are deleted.
    manifests: PathBuf,
    opts: BatchOptions,
    seed: u64,
    rt: &'a Runtime,
    /// The chunk currently on disk, opened.
    open: RefCell<Option<(u64, Arc<Vec<Chunk>>)>>,
}

impl<'a> Rolling<'a> {
    fn new(
        recipe: &Recipe,
        target: &'a LoadedTarget,
        samples: &'a [Sample],
        job: ExtractJob,
        root: PathBuf,
        rt: &'a Runtime,
    ) -> Result<Self> {
        crate::target::check_capture(&job.aux_layer_ids, target.cfg.num_hidden_layers)?;
        let n = recipe.data.chunk_samples;
        let count = if n == 0 { 1 } else { samples.len().div_ceil(n) };
        let lengths = (0..count)
            .map(|c| crate::extract::chunk_slice(samples, n, c).iter().map(|s| (s.index as i64, s.input_ids.len())).collect())
            .collect();
        Ok(Rolling {
            target,
            samples,
            job,
            lengths,
            manifests: root.with_file_name("chunk-manifests"),
            root,
            opts: crate::train::batch_options(recipe),
            seed: recipe.train.seed,
            rt,
            open: RefCell::new(None),
        })
    }

    fn num_chunks(&self) -> usize {
        self.lengths.len()
    }

    /// (data epoch, chunk) of a trainer epoch.
    fn split(&self, e: u64) -> (u64, usize) {
        let n = self.num_chunks() as u64;
        (e / n, (e % n) as usize)
    }

    fn dir(&self, e: u64) -> PathBuf {
        let (epoch, c) = self.split(e);
        self.root.join(format!("epoch-{epoch:03}-chunk-{c:05}"))
    }

    /// Extracts (or finishes extracting) trainer epoch `e`'s chunk and opens it; removes any
    /// other chunk directory first, so at most one chunk is ever on disk.
    fn ensure(&self, e: u64) -> Result<Arc<Vec<Chunk>>> {
        if let Some((open_e, chunks)) = self.open.borrow().as_ref() {
            if *open_e == e {
                return Ok(chunks.clone());
            }
        }
        let dir = self.dir(e);
        if self.root.exists() {
            // Only chunk directories this run names (a symlink is removed, never followed).
            for entry in std::fs::read_dir(&self.root).map_err(|e| Error::io(&self.root, e))? {
                let p = entry.map_err(|e| Error::io(&self.root, e))?.path();
                let ours = p.file_name().and_then(|n| n.to_str()).is_some_and(is_chunk_dir_name);
                if p != dir && ours {
                    std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
                }
            }
        }
        let mut job = self.job.clone();
        job.chunk = self.split(e).1;
        job.out = dir.clone();
        crate::extract::run_samples(self.target, &job, self.samples, self.rt)?;
        let chunks = Arc::new(vec![Chunk::open(&dir)?]);
        *self.open.borrow_mut() = Some((e, chunks.clone()));
        Ok(chunks)
    }
}

/// `epoch-EEE-chunk-CCCCC`, the names [`Rolling::dir`] gives.
fn is_chunk_dir_name(name: &str) -> bool {
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix("epoch-").and_then(|r| r.split_once("-chunk-")).is_some_and(|(e, c)| digits(e, 3) && digits(c, 5))
}

impl MicroBatches for Rolling<'_> {
    fn len(&self, e: u64) -> Result<u64> {
        let (epoch, c) = self.split(e);
        Ok(plan_batches_for_lengths(&self.lengths[c..=c], &self.opts, self.seed, epoch).len() as u64)
    }

    fn iter_from(&self, e: u64, start: u64) -> Result<Box<dyn Iterator<Item = Result<TrainBatch>> + '_>> {
        let chunks = self.ensure(e)?;
        let (epoch, _) = self.split(e);
        let specs: Vec<_> = plan_batches(&chunks, &self.opts, self.seed, epoch).into_iter().skip(start as usize).collect();
        Ok(crate::train::data::prefetched(chunks, specs, self.rt.device))
    }

    fn fingerprint(&self) -> String {
        crate::train::trainer::data_fingerprint(&self.lengths, &self.opts, self.seed, 1)
    }

    fn epoch_done(&self, e: u64) -> Result<()> {
        *self.open.borrow_mut() = None;
        let dir = self.dir(e);
        // The chunk's manifest (shard sizes and checksums) outlives its features, so a run can
        // show what it trained on.
        let manifest = dir.join(crate::extract::manifest::MANIFEST);
        if let (Some(name), true) = (dir.file_name(), manifest.is_file()) {
            let keep = self.manifests.join(name).with_extension("json");
            write_atomic(&keep, &crate::error::read_bytes(&manifest)?)?;
        }
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|err| Error::io(&dir, err))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_chunk_directory_names_are_ours() {
        assert!(super::is_chunk_dir_name("epoch-000-chunk-00001"));
        for other in ["epoch-000-chunk-0001", "notes", "epoch-00a-chunk-00001", "epoch-000-chunk-00001x", ""] {
            assert!(!super::is_chunk_dir_name(other), "{other}");
        }
    }
}
