//! Training checkpoints: atomic directories `run/checkpoints/step-NNNNNNNN/` holding the draft
//! (fp32, export names), the optimizer state, the trainer state (step, epoch, data position,
//! counters) and the resolved recipe; `run/checkpoints/latest` names the newest; the last N are
//! kept. A directory is written under a temporary name and renamed into place, so a kill at any
//! moment leaves either the previous checkpoint or the new one, never half of one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{read_json, Error, Result};
use crate::util::fs::write_atomic;
use crate::weights::{save_safetensors, SafetensorsFile};

/// Where training stands; everything needed to continue exactly.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Next micro-batch (index into this rank's list for `epoch`).
    pub micro: u64,
    /// Micro-batches skipped because their features were not finite.
    pub skipped_nonfinite: u64,
    /// Supervised positions seen.
    pub positions_seen: u64,
    /// World size the run was started with.
    pub world_size: u64,
    /// Total optimizer steps planned (the schedule's horizon).
    pub total_steps: u64,
}

/// One checkpoint on disk.
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// The trainer state.
    pub state: TrainState,
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint atomically and prunes old ones.
pub fn save(
    run_dir: &Path,
    state: &TrainState,
    draft: &crate::draft::Eagle3Draft,
    optimizer: &[(String, Tensor)],
    recipe_toml: &str,
    keep_last: usize,
) -> Result<PathBuf> {
    let root = run_dir.join("checkpoints");
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let name = step_name(state.step);
    let final_dir = root.join(&name);
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    draft.save(&tmp, tch::Kind::Float)?;
    save_safetensors(&tmp.join("optimizer.safetensors"), optimizer, None)?;
    let state_json = serde_json::to_string_pretty(state).map_err(|e| Error::Input(e.to_string()))?;
    write_atomic(&tmp.join("state.json"), state_json.as_bytes())?;
    write_atomic(&tmp.join("recipe.toml"), recipe_toml.as_bytes())?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    crate::util::fs::sync_parent(&final_dir);
    write_atomic(&root.join("latest"), name.as_bytes())?;
    prune(&root, keep_last.max(1))?;
    Ok(final_dir)
}

fn prune(root: &Path, keep: usize) -> Result<()> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")))
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for p in &steps[..excess] {
        std::fs::remove_dir_all(p).map_err(|e| Error::io(p, e))?;
    }
    Ok(())
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Result<Option<Checkpoint>> {
    let root = run_dir.join("checkpoints");
    let pointer = root.join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).map_err(|e| Error::io(&pointer, e))?;
    let dir = root.join(name.trim());
    let state: TrainState = read_json(&dir.join("state.json"))?;
    Ok(Some(Checkpoint { dir, state }))
}

/// The head directory a path names: a head itself (`model.safetensors` inside), or a run
/// directory whose latest checkpoint is used.
pub fn head_dir(p: &Path) -> Result<PathBuf> {
    if p.join("model.safetensors").is_file() {
        return Ok(p.to_path_buf());
    }
    match latest(p)? {
        Some(ck) => Ok(ck.dir),
        None => Err(Error::Input(format!("{}: neither a head (model.safetensors) nor a run directory with checkpoints", p.display()))),
    }
}

/// Reads the optimizer tensors of a checkpoint.
pub fn optimizer_state(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let f = SafetensorsFile::open(&dir.join("optimizer.safetensors"))?;
    f.names().map(|n| Ok((n.to_string(), f.tensor(n)?))).collect()
}
