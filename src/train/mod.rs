//! Training (the `train` stage, docs/architecture.md): the TTT objective, the optimizer,
//! checkpoints and the loop; [`run`] is the `train` stage.

pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod setup;
pub mod step;
pub mod trainer;
pub mod ttt;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tch::Kind;

use crate::config::Recipe;
use crate::dist::Collective;
use crate::draft::Eagle3Draft;
use crate::error::Result;
use crate::extract::reader::BatchOptions;
use crate::runtime::Runtime;
use crate::target::head::TargetHead;
use crate::target::registry;
use trainer::{MicroBatches, StepMetrics, Trainer};

/// `specforge-rs train`: the stage's whole input.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainJob {
    /// The run recipe (TOML; unknown keys are errors).
    #[arg(long)]
    pub recipe: PathBuf,
    /// Override a recipe field: `--set train.lr=2e-4` (repeatable).
    #[arg(long = "set")]
    pub overrides: Vec<String>,
    /// Feature chunks to train on (replaces `data.features`).
    #[arg(long)]
    pub features: Vec<PathBuf>,
    /// Run directory (checkpoints, metrics.jsonl); resumes from its latest checkpoint.
    #[arg(long)]
    pub out: PathBuf,
    /// Start from this head (export layout) instead of a fresh initialisation.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// The head's architecture from another tool's draft config.json (SpecForge's
    /// `configs/*-eagle3.json`, a vLLM draft); sets the recipe's `draft.config`.
    #[arg(long)]
    pub draft_config: Option<PathBuf>,
}

/// What training produced.
pub struct TrainResult {
    /// The trained head.
    pub draft: Eagle3Draft,
    /// Optimizer steps done (all sessions of the run).
    pub steps: u64,
    /// The last step's metrics (this session's, else the training log's last line).
    pub last: Option<StepMetrics>,
}

/// Batching of training micro-batches per the recipe.
pub fn batch_options(recipe: &Recipe) -> BatchOptions {
    BatchOptions {
        token_budget: recipe.train.token_budget as usize,
        max_batch_size: recipe.train.max_batch_size,
        max_len: recipe.data.max_len,
        ..Default::default()
    }
}

/// Runs `train`: the recipe's draft on its feature chunks, data-parallel over the runtime's
/// ranks.
pub fn run(job: &TrainJob, rt: &Runtime) -> Result<TrainResult> {
    let mut recipe = Recipe::load(&job.recipe, &job.overrides)?;
    if let Some(c) = &job.draft_config {
        recipe.draft.config = Some(c.clone());
    }
    let dir = registry::resolve(&recipe.target.name)?;
    let head = TargetHead::load(&dir, Kind::Float, rt.device)?;
    let comm = crate::dist::collective_for(&rt.env, recipe.train.ddp_bucket_mb, Duration::from_secs(recipe.train.collective_timeout_s))?;
    let features = if job.features.is_empty() { recipe.data.features.clone() } else { job.features.clone() };
    let aux = recipe.draft.aux_ids(head.cfg.num_hidden_layers);
    let chunks = setup::open_chunks(&features, &head, &aux)?;
    let data = data::ChunkBatches::new(chunks, batch_options(&recipe), recipe.train.seed, comm.rank(), comm.world_size(), rt.device);
    fit(&recipe, &head, &data, recipe.train.epochs, &job.out, job.init.as_deref(), false, comm.as_ref(), rt)
}

/// Trains the recipe's draft on `data` for `epochs` trainer epochs in `out` (resuming from its
/// latest checkpoint), checkpointing each epoch's end when `save_each_epoch`.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    recipe: &Recipe,
    head: &TargetHead,
    data: &dyn MicroBatches,
    epochs: u64,
    out: &Path,
    init: Option<&Path>,
    save_each_epoch: bool,
    comm: &dyn Collective,
    rt: &Runtime,
) -> Result<TrainResult> {
    let draft = setup::build_draft(recipe, head, init, rt.device)?;
    let mut cfg = recipe.train.clone();
    cfg.epochs = epochs;
    let mut trainer = Trainer::new(draft, head, cfg, recipe.to_toml(), out, comm)?;
    trainer.save_each_epoch = save_each_epoch;
    let history = trainer.run(data)?;
    let last = history.last().cloned().or_else(|| last_logged(&out.join("metrics.jsonl")));
    Ok(TrainResult { steps: trainer.state.step, last, draft: trainer.draft })
}

/// The last line of a training log (`metrics.jsonl`), if any.
pub fn last_logged(metrics: &Path) -> Option<StepMetrics> {
    let text = std::fs::read_to_string(metrics).ok()?;
    text.lines().last().and_then(|l| serde_json::from_str(l).ok())
}
