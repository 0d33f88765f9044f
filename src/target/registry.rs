//! Short target names (`--target smollm2-135m`) resolved to Hugging Face repo ids and local
//! directories. Nothing is downloaded: a name resolves to a directory given directly, the
//! project's embedded cache, or a snapshot in the local Hugging Face cache.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A known target.
#[derive(Debug, Clone, Copy)]
pub struct KnownTarget {
    /// The short name.
    pub name: &'static str,
    /// The Hugging Face repo id.
    pub repo: &'static str,
}

/// The targets recipes refer to by short name.
pub const KNOWN_TARGETS: &[KnownTarget] = &[
    KnownTarget { name: "smollm2-135m", repo: "HuggingFaceTB/SmolLM2-135M-Instruct" },
    KnownTarget { name: "chandra-ocr-2", repo: "datalab-to/chandra-ocr-2" },
    KnownTarget { name: "qwen3-vl-2b", repo: "Qwen/Qwen3-VL-2B-Instruct" },
    KnownTarget { name: "qwen2.5-7b", repo: "Qwen/Qwen2.5-7B-Instruct" },
];

/// Where setup puts the embedded SmolLM2 target, relative to the project root.
pub const EMBEDDED_SMOLLM2: &str = ".cache/smollm2-135m-instruct";

/// The project root: `SPECFORGE_HOME`, else the source tree this binary was built from.
pub fn project_root() -> PathBuf {
    std::env::var_os("SPECFORGE_HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn hf_hub_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return PathBuf::from(p).join("hub");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache/huggingface/hub")
}

/// The newest snapshot of `repo` in the local Hugging Face cache.
fn hf_snapshot(repo: &str) -> Option<PathBuf> {
    let dir = hf_hub_cache().join(format!("models--{}", repo.replace('/', "--")));
    let main = std::fs::read_to_string(dir.join("refs/main")).ok();
    if let Some(rev) = main {
        let p = dir.join("snapshots").join(rev.trim());
        if p.join("config.json").is_file() {
            return Some(p);
        }
    }
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(dir.join("snapshots")).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    snaps.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    snaps.into_iter().rev().find(|p| p.join("config.json").is_file())
}

/// Resolves `--target`: a directory, a known short name, or a repo id in the local HF cache.
pub fn resolve(target: &str) -> Result<PathBuf> {
    let as_path = Path::new(target);
    if as_path.join("config.json").is_file() {
        return Ok(as_path.to_path_buf());
    }
    let known = KNOWN_TARGETS.iter().find(|k| k.name == target || k.repo == target);
    if let Some(k) = known {
        if k.name == "smollm2-135m" {
            let p = project_root().join(EMBEDDED_SMOLLM2);
            if p.join("config.json").is_file() {
                return Ok(p);
            }
        }
    }
    let repo = known.map_or(target, |k| k.repo);
    if repo.contains('/') {
        if let Some(p) = hf_snapshot(repo) {
            return Ok(p);
        }
    }
    let names: Vec<&str> = KNOWN_TARGETS.iter().map(|k| k.name).collect();
    Err(Error::Input(format!(
        "target `{target}` not found: not a directory with config.json, and `{repo}` is not in the local Hugging Face cache ({}); known names: {} (smollm2-135m comes from `make setup`)",
        hf_hub_cache().display(),
        names.join(", ")
    )))
}
