//! `run`: the whole pipeline from one recipe, resumable after a kill at any stage.
//!
//! regenerate → vocab → for each epoch, for each chunk: extract → train → delete → export → eval.
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
//! The next chunk's extraction is not overlapped with training: on one device the two compete
//! for the same compute, and on CPU for the same cores.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::json;
use tch::{Device, Kind};

use crate::config::recipe::Recipe;
use crate::config::TargetConfig;
use crate::data::{self as dataset, Sample, TokenizeOptions, Truncation};
use crate::data::Tokenizer;
use crate::dist::SingleProcess;
use crate::draft::Eagle3Draft;
use crate::error::{Error, Result};
use crate::eval::{SpecDecoder, SpecStats, Verify};
use crate::extract::manifest::RunInfo;
use crate::extract::reader::{plan_batches, plan_batches_for_lengths, BatchOptions, Chunk};
use crate::extract::writer::{self, dtype_name, ExtractOptions};
use crate::generate::regenerate::{regenerate, select, RegenerateOptions};
use crate::generate::GenerateOptions;
use crate::target::head::TargetHead;
use crate::target::{self, registry, TargetModel};
use crate::train::setup::build_draft;
use crate::train::trainer::{MicroBatches, StepMetrics, TrainBatch, Trainer};

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

/// The compute dtype a recipe's `target.dtype` names on `device`.
pub fn compute_kind(name: &str, device: Device) -> Result<Kind> {
    Ok(match name {
        "auto" if device.is_cuda() => Kind::BFloat16,
        "auto" | "f32" | "float32" => Kind::Float,
        "bf16" | "bfloat16" => Kind::BFloat16,
        "f16" | "float16" => Kind::Half,
        other => return Err(Error::config("recipe", "target.dtype", format!("`{other}`: expected auto, f32, bf16 or f16"))),
    })
}

fn state_note(run_dir: &Path, stage: &str) -> Result<()> {
    let p = run_dir.join("run_state.json");
    let tmp = crate::weights::tmp_path(&p);
    std::fs::write(&tmp, json!({"stage": stage}).to_string()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &p).map_err(|e| Error::io(&p, e))
}

/// Runs the recipe in `run_dir`.
pub fn run(recipe: &Recipe, run_dir: &Path) -> Result<RunSummary> {
    // Fail at once, before anything is loaded or written, on what is not implemented yet.
    if recipe.target.multimodal {
        return Err(Error::config(
            "recipe",
            "target.multimodal",
            format!("is true for `{}`, but the vision tower (image patches, M-RoPE positions, deepstack) is not implemented yet: only text targets can run", recipe.target.name),
        ));
    }
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    // A run directory belongs to one recipe: resuming with another would mix two runs.
    let recipe_toml = recipe.to_toml();
    let recipe_path = run_dir.join("recipe.toml");
    if recipe_path.exists() {
        let old = crate::error::read_to_string(&recipe_path)?;
        if old != recipe_toml {
            return Err(Error::config(
                &recipe_path,
                "recipe",
                "differs from the recipe this run directory was started with; use a new run directory",
            ));
        }
    } else {
        std::fs::write(&recipe_path, &recipe_toml).map_err(|e| Error::io(&recipe_path, e))?;
    }
    let device = Device::cuda_if_available();
    let kind = compute_kind(&recipe.target.dtype, device)?;
    let dir = registry::resolve(&recipe.target.name)?;
    let cfg = TargetConfig::from_path(&dir)?;
    let tok = Tokenizer::from_dir(&dir)?;
    let data_path = recipe.data.path.clone().ok_or_else(|| Error::config("recipe", "data.path", "is required by `run`"))?;
    tracing::info!(target = %dir.display(), ?kind, ?device, "loading target");
    let model = target::load(&dir, kind, device)?;
    let stop_ids = dataset::stop_ids(&tok, &cfg.eos_token_ids);

    // 1. On-policy data: the target answers the prompts itself.
    let train_data = if recipe.data.regenerate {
        state_note(run_dir, "regenerate")?;
        let out = run_dir.join("regenerated.jsonl");
        let (mut convs, mut report) = dataset::read_jsonl(&data_path, &Default::default())?;
        if let Some(n) = recipe.data.limit {
            convs.truncate(n);
        }
        let opts = RegenerateOptions {
            gen: GenerateOptions {
                max_new_tokens: recipe.data.max_new_tokens,
                stop_ids: stop_ids.clone(),
                temperature: recipe.data.temperature,
                top_p: 1.0,
            },
            batch_size: recipe.data.batch_size,
            seed: recipe.train.seed as i64,
            max_len: recipe.data.max_len as usize,
            multimodal: recipe.target.multimodal,
            target_name: recipe.target.name.clone(),
            config_hash: cfg.config_hash.clone(),
        };
        let todo = select(&tok, &convs, &opts, &mut report);
        report.check(recipe.data.max_bad_fraction, &run_dir.join("regenerate.bad-lines.jsonl"), true)?;
        let stats = regenerate(model.as_ref(), &tok, &todo, &out, &opts, device)?;
        println!("run: regenerated {} answers ({} already done, {} new tokens)", stats.written, stats.resumed, stats.new_tokens);
        out
    } else {
        data_path.clone()
    };

    // 2. Tokenised samples with loss masks.
    let (convs, mut report) = dataset::read_jsonl(&train_data, &Default::default())?;
    let topts = TokenizeOptions {
        max_len: recipe.data.max_len as usize,
        truncation: Truncation::Truncate,
        multimodal: recipe.target.multimodal,
        ..Default::default()
    };
    let mut samples = dataset::tokenize(&convs, &tok, &cfg.eos_token_ids, &topts, &mut report);
    report.check(recipe.data.max_bad_fraction, &run_dir.join("train.bad-lines.jsonl"), true)?;
    if let Some(n) = recipe.data.limit {
        samples.truncate(n);
    }
    if samples.is_empty() {
        return Err(Error::Input(format!("{}: no usable training sample", train_data.display())));
    }

    // 3. The draft vocabulary (reused when a previous run wrote it).
    state_note(run_dir, "vocab")?;
    let vocab_path = match &recipe.draft.vocab {
        Some(p) => p.clone(),
        None => {
            let p = run_dir.join("vocab.safetensors");
            if crate::vocab::load(&p).is_err() {
                let counts = crate::vocab::count_samples(&samples, cfg.vocab_size as usize)?;
                let forced = crate::vocab::forced_tokens(&tok, &cfg.eos_token_ids);
                let dv = crate::vocab::build(&counts, recipe.draft.draft_vocab_size as usize, &forced)?;
                dv.save(&p, &cfg.config_hash)?;
                println!(
                    "run: draft vocabulary of {} tokens covers {:.1}% of the supervised tokens",
                    dv.draft_vocab_size(),
                    100.0 * dv.coverage()
                );
            }
            p
        }
    };
    let mut recipe = recipe.clone();
    recipe.draft.vocab = Some(vocab_path);

    // 4. Chunked-rolling training.
    let head = TargetHead {
        cfg: cfg.clone(),
        embed_tokens: model.embed_tokens().to_kind(Kind::Float),
        lm_head: model.lm_head().to_kind(Kind::Float),
        dir: dir.clone(),
    };
    let per_chunk = if recipe.data.chunk_samples == 0 { samples.len() } else { recipe.data.chunk_samples };
    let chunks: Vec<Vec<Sample>> = samples.chunks(per_chunk).map(<[Sample]>::to_vec).collect();
    let rolling = Rolling::new(&recipe, model.as_ref(), chunks, run_dir.join("chunks"), device, kind)?;
    let mut train_cfg = recipe.train.clone();
    train_cfg.epochs = recipe.train.epochs * rolling.chunks.len() as u64;
    let draft = build_draft(&recipe, &head, None, device)?;
    state_note(run_dir, "train")?;
    let comm = SingleProcess;
    let train_dir = run_dir.join("train");
    let mut trainer = Trainer::new(draft, &head, train_cfg, recipe.to_toml(), &train_dir, &comm)?;
    trainer.save_each_epoch = true;
    let history = trainer.run(&rolling)?;
    let last = history.last().cloned().or_else(|| last_logged(&train_dir.join("metrics.jsonl")));

    // 5. Export.
    state_note(run_dir, "export")?;
    let export_dir = run_dir.join("export");
    let format: crate::export::Format = recipe.export.format.parse().map_err(Error::Input)?;
    crate::export::export(&trainer.draft, &export_dir, format, None)?;

    // 6. Acceptance on held-out prompts: the trained head against an untrained one.
    state_note(run_dir, "eval")?;
    let (trained, untrained) = match &recipe.data.eval_path {
        Some(p) => {
            let prompts = eval_prompts(p, &tok, recipe.eval.limit)?;
            let exported = Eagle3Draft::load(&export_dir, device)?;
            let fresh = build_draft(&recipe, &head, None, device)?;
            let t = evaluate(model.as_ref(), &exported, &prompts, &recipe, &stop_ids, device)?;
            let u = evaluate(model.as_ref(), &fresh, &prompts, &recipe, &stop_ids, device)?;
            (Some(t), Some(u))
        }
        None => (None, None),
    };
    let summary = RunSummary { export_dir: export_dir.clone(), steps: trainer.state.step, last, trained, untrained, k: recipe.eval.k };
    let report = serde_json::to_string_pretty(&summary).map_err(|e| Error::Input(e.to_string()))?;
    std::fs::write(run_dir.join("summary.json"), report).map_err(|e| Error::io(run_dir.join("summary.json"), e))?;
    crate::export::card::write(&export_dir, &recipe, &summary, &train_dir.join("metrics.jsonl"))?;
    state_note(run_dir, "done")?;
    Ok(summary)
}

/// The last line of a training log (`metrics.jsonl`), if any.
pub fn last_logged(metrics: &Path) -> Option<StepMetrics> {
    let text = std::fs::read_to_string(metrics).ok()?;
    text.lines().last().and_then(|l| serde_json::from_str(l).ok())
}

/// Held-out prompts rendered for generation: the conversation up to its last user turn.
pub fn eval_prompts(path: &Path, tok: &Tokenizer, limit: Option<usize>) -> Result<Vec<Vec<i64>>> {
    let (convs, _report) = dataset::read_jsonl(path, &Default::default())?;
    let mut out = Vec::new();
    for c in convs.iter().take(limit.unwrap_or(usize::MAX)) {
        let mut msgs: Vec<serde_json::Value> = c.messages.iter().map(|m| m.to_template_json()).collect();
        while msgs.last().and_then(|m| m.get("role")).and_then(|r| r.as_str()) == Some("assistant") {
            msgs.pop();
        }
        if msgs.is_empty() {
            continue;
        }
        let text = tok.apply_chat_template(&serde_json::Value::Array(msgs), true)?;
        out.push(tok.encode(&text, false)?);
    }
    Ok(out)
}

/// Speculative decoding over `prompts` with the target verifying; summed counters.
pub fn evaluate(
    model: &dyn TargetModel,
    draft: &Eagle3Draft,
    prompts: &[Vec<i64>],
    recipe: &Recipe,
    stop_ids: &[i64],
    device: Device,
) -> Result<SpecStats> {
    let dec = SpecDecoder::new(model, draft, recipe.eval.k, stop_ids.to_vec(), device)?;
    let bar = crate::util::progress::bar(prompts.len() as u64, "eval");
    let mut total = SpecStats::default();
    for p in prompts {
        let (_, s) = dec.run(p, recipe.eval.max_new_tokens, Verify::Target)?;
        total.add(&s);
        bar.inc(1);
        bar.set_message(format!("τ {:.2}", total.mean_acceptance_length()));
    }
    bar.finish_and_clear();
    Ok(total)
}

/// The trainer's view of chunked-rolling data: trainer epoch `e·C + c` is chunk c of epoch e,
/// extracted on first use and deleted once trained.
struct Rolling<'a> {
    model: &'a dyn TargetModel,
    chunks: Vec<Vec<Sample>>,
    /// Per chunk: (dataset index, tokens after truncation) of each sample.
    lengths: Vec<Vec<(i64, usize)>>,
    root: PathBuf,
    opts: BatchOptions,
    extract: ExtractOptions,
    template: crate::extract::manifest::Manifest,
    max_disk: Option<u64>,
    seed: u64,
    device: Device,
    /// The chunk currently on disk, opened.
    open: RefCell<Option<(u64, Arc<Vec<Chunk>>)>>,
}

impl<'a> Rolling<'a> {
    fn new(
        recipe: &Recipe,
        model: &'a dyn TargetModel,
        chunks: Vec<Vec<Sample>>,
        root: PathBuf,
        device: Device,
        kind: Kind,
    ) -> Result<Self> {
        let cfg = model.config();
        let store = writer::kind_from_name(&recipe.extract.store_dtype).ok_or_else(|| {
            Error::config("recipe", "extract.store_dtype", format!("`{}`: expected bf16, f16 or f32", recipe.extract.store_dtype))
        })?;
        let extract = ExtractOptions {
            aux_layer_ids: recipe.draft.aux_layer_ids.clone(),
            store_kind: store,
            batch_tokens: recipe.extract.batch_tokens,
            max_batch_size: recipe.extract.max_batch_size,
            shard_bytes: recipe.extract.shard_mb << 20,
            rank: 0,
            world_size: 1,
        };
        target::check_capture(&extract.aux_layer_ids, cfg.num_hidden_layers)?;
        let template = writer::manifest_template(
            &recipe.target.name,
            cfg,
            &extract.aux_layer_ids,
            store,
            RunInfo {
                dataset: "run".into(),
                dataset_xxh3: String::new(),
                max_len: recipe.data.max_len as usize,
                truncation: "truncate".into(),
                compute_dtype: dtype_name(kind).into(),
                world_size: 1,
                shard_bytes: extract.shard_bytes,
                planned_samples: 0,
                planned_tokens: 0,
            },
        );
        let lengths = chunks.iter().map(|c| c.iter().map(|s| (s.index as i64, s.input_ids.len())).collect()).collect();
        let opts = BatchOptions {
            token_budget: recipe.train.token_budget as usize,
            max_batch_size: recipe.train.max_batch_size,
            max_len: recipe.data.max_len as usize,
            ..Default::default()
        };
        Ok(Rolling {
            model,
            chunks,
            lengths,
            root,
            opts,
            extract,
            template,
            max_disk: recipe.extract.max_disk_gb.map(|g| (g * 1e9) as u64),
            seed: recipe.train.seed,
            device,
            open: RefCell::new(None),
        })
    }

    /// (data epoch, chunk) of a trainer epoch.
    fn split(&self, e: u64) -> (u64, usize) {
        let n = self.chunks.len() as u64;
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
            for entry in std::fs::read_dir(&self.root).map_err(|e| Error::io(&self.root, e))? {
                let p = entry.map_err(|e| Error::io(&self.root, e))?.path();
                if p != dir {
                    std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
                }
            }
        }
        let (_, c) = self.split(e);
        let samples = &self.chunks[c];
        let plan = writer::plan(samples, self.template.clone(), &self.extract);
        if let Some(limit) = self.max_disk {
            if plan.chunk_bytes > limit {
                return Err(Error::DiskBudget {
                    what: format!("chunk {}", dir.display()),
                    needed: plan.chunk_bytes,
                    limit_name: "extract.max_disk_gb".into(),
                    limit,
                });
            }
        }
        writer::run(self.model, samples, &plan, &dir, &self.extract, self.device)?;
        crate::extract::manifest::merge(&dir)?;
        let chunks = Arc::new(vec![Chunk::open(&dir)?]);
        *self.open.borrow_mut() = Some((e, chunks.clone()));
        Ok(chunks)
    }
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
        Ok(crate::train::data::prefetched(chunks, specs, self.device))
    }

    fn epoch_done(&self, e: u64) -> Result<()> {
        *self.open.borrow_mut() = None;
        let dir = self.dir(e);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|err| Error::io(&dir, err))?;
        }
        Ok(())
    }
}
