//! `specforge-rs export`: a checkpoint (or any head in export layout) → a serving directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tch::Device;

use crate::config::recipe::Recipe;
use crate::draft::Eagle3Draft;
use crate::export::{export, Format};
use crate::pipeline::RunSummary;
use crate::train::checkpoint::TrainState;

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A checkpoint directory (`runs/x/checkpoints/step-N`), a run directory (its latest
    /// checkpoint is used) or a head directory.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// `vllm` (flat config; SGLang loads the same files) or `speculators`.
    #[arg(long, default_value = "vllm")]
    format: String,
    /// The target's Hugging Face id, recorded as the verifier in the speculators format.
    #[arg(long)]
    verifier: Option<String>,
}

/// The head directory a `--checkpoint` argument names.
pub fn resolve_checkpoint(p: &Path) -> anyhow::Result<PathBuf> {
    if p.join("model.safetensors").is_file() {
        return Ok(p.to_path_buf());
    }
    match crate::train::checkpoint::latest(p)? {
        Some(ck) => Ok(ck.dir),
        None => anyhow::bail!("{}: neither a head (model.safetensors) nor a run directory with checkpoints", p.display()),
    }
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    let format: Format = a.format.parse().map_err(anyhow::Error::msg)?;
    let dir = resolve_checkpoint(&a.checkpoint)?;
    let draft = Eagle3Draft::load(&dir, Device::Cpu).with_context(|| format!("loading {}", dir.display()))?;
    export(&draft, &a.out, format, a.verifier.as_deref())?;
    println!("exported {} -> {} ({format:?}, bf16, validated)", dir.display(), a.out.display());
    // A checkpoint carries its resolved recipe and its run's training log: enough for the model
    // card (acceptance is measured by `eval` or `run`, not here). A bare head gets none.
    let recipe_path = dir.join("recipe.toml");
    if recipe_path.is_file() {
        let text = crate::error::read_to_string(&recipe_path)?;
        let recipe = Recipe::parse(&text, &recipe_path, &[])?;
        let state: TrainState = crate::error::read_json(&dir.join("state.json"))?;
        let metrics = dir.parent().and_then(Path::parent).map(|run| run.join("metrics.jsonl")).unwrap_or_default();
        let summary = RunSummary {
            export_dir: a.out.clone(),
            steps: state.step,
            last: crate::pipeline::last_logged(&metrics),
            trained: None,
            untrained: None,
            k: recipe.eval.k,
        };
        crate::export::card::write(&a.out, &recipe, &summary, &metrics)?;
        println!("model card {}", a.out.join("README.md").display());
    } else {
        println!("no recipe.toml beside {}: no model card written", dir.display());
    }
    Ok(())
}
