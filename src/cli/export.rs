//! `specforge-rs export`: a checkpoint (or any head in export layout) → a serving directory.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use tch::Device;

use crate::draft::Eagle3Draft;
use crate::export::{export, Format};

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
    Ok(())
}
