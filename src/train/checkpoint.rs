//! Training checkpoints: atomic directories `run/checkpoints/step-NNNNNNNN/` holding the draft
//! (fp32, export names), the optimizer state, the trainer state (step, epoch, data position,
//! counters) and the resolved recipe; `run/checkpoints/latest` names the newest; the last N are
//! kept. A directory is written under a temporary name (every file fsynced) and renamed into
//! place, the rename and the `latest` switch made durable before older checkpoints are pruned, so
//! a kill or a power cut at any moment leaves the previous checkpoint or the new one, never half
//! of one; and should the newest be damaged anyway, [`latest`] falls back to the newest intact.

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
    /// What the run trains on ([`crate::train::trainer::data_fingerprint`]); a resume on other
    /// data is refused.
    #[serde(default)]
    pub data_fingerprint: String,
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

/// The newest intact checkpoint of a run, if any: the one `latest` names, or, when that one is
/// missing, unreadable or truncated (reported), the newest `step-*` directory that is intact.
/// Export and resume both go through here, so a damaged last checkpoint costs the steps since the
/// one before it, not the run.
///
/// # Errors
/// Checkpoints exist but none is intact: each is named with what is wrong with it.
pub fn latest(run_dir: &Path) -> Result<Option<Checkpoint>> {
    let root = run_dir.join("checkpoints");
    if !root.is_dir() {
        return Ok(None);
    }
    let mut names: Vec<String> = std::fs::read_dir(&root)
        .map_err(|e| Error::io(&root, e))?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().into_string().ok()))
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort_unstable_by(|a, b| b.cmp(a));
    if let Ok(pointed) = std::fs::read_to_string(root.join("latest")) {
        let pointed = pointed.trim().to_string();
        names.retain(|n| *n != pointed);
        names.insert(0, pointed);
    }
    let mut problems = Vec::new();
    for name in names {
        let dir = root.join(&name);
        match intact(&dir) {
            Ok(state) => {
                if !problems.is_empty() {
                    tracing::warn!("using checkpoint {} because newer ones are unusable: {}", dir.display(), problems.join("; "));
                }
                return Ok(Some(Checkpoint { dir, state }));
            }
            Err(e) => problems.push(format!("{}: {e}", dir.display())),
        }
    }
    if problems.is_empty() {
        return Ok(None);
    }
    Err(Error::Input(format!("no intact checkpoint in {}: {}", root.display(), problems.join("; "))))
}

/// A checkpoint's state, once its files are all there and readable (safetensors headers and sizes
/// checked, the state parsed).
fn intact(dir: &Path) -> Result<TrainState> {
    let state: TrainState = read_json(&dir.join("state.json"))?;
    for f in ["model.safetensors", "optimizer.safetensors"] {
        SafetensorsFile::open(&dir.join(f))?;
    }
    let recipe = dir.join("recipe.toml");
    if !recipe.is_file() {
        return Err(Error::Input(format!("{} is missing", recipe.display())));
    }
    Ok(state)
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

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    #[test]
    fn a_damaged_latest_checkpoint_falls_back_to_the_newest_intact() {
        let run = tempfile::tempdir().unwrap();
        let draft = crate::draft::tiny_draft(false);
        let opt = vec![("m".to_string(), Tensor::ones([3], (Kind::Float, Device::Cpu)))];
        for step in 1..=3 {
            let state = TrainState { step, ..Default::default() };
            save(run.path(), &state, &draft, &opt, "recipe", 5).unwrap();
        }
        assert_eq!(latest(run.path()).unwrap().unwrap().state.step, 3);
        let root = run.path().join("checkpoints");
        // A truncated head in the newest: the one before is used (export and resume alike).
        let head = root.join("step-00000003/model.safetensors");
        let bytes = std::fs::read(&head).unwrap();
        std::fs::write(&head, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(latest(run.path()).unwrap().unwrap().state.step, 2);
        assert!(head_dir(run.path()).unwrap().ends_with("step-00000002"));
        // A missing state file, likewise; and a lost `latest` pointer is no reason to start over.
        std::fs::remove_file(root.join("step-00000002/state.json")).unwrap();
        std::fs::remove_file(root.join("latest")).unwrap();
        assert_eq!(latest(run.path()).unwrap().unwrap().state.step, 1);
        // None intact: an error naming each.
        std::fs::remove_file(root.join("step-00000001/optimizer.safetensors")).unwrap();
        let e = latest(run.path()).err().unwrap().to_string();
        assert!(e.contains("step-00000001") && e.contains("step-00000002") && e.contains("step-00000003"), "{e}");
    }
}
