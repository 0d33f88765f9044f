//! The parts of a target the trainer needs without running it: the token embedding (the draft's
//! frozen input embedding) and the lm_head (the teacher applied to stored post-norm hiddens).
//! Only these two tensors are read, so a 5B target costs two matrices of memory, not ten GB.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::config::TargetConfig;
use crate::error::{Error, Result};
use crate::weights::WeightSource;

/// Embedding and output projection of a frozen target.
pub struct TargetHead {
    /// The resolved target config.
    pub cfg: TargetConfig,
    /// `[V, H]`.
    pub embed_tokens: Tensor,
    /// `[V, H]` (the embedding itself when tied).
    pub lm_head: Tensor,
    /// Where it was loaded from.
    pub dir: PathBuf,
}

impl TargetHead {
    /// Reads config.json, `embed_tokens.weight` and `lm_head.weight` (or the tied embedding).
    pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let cfg = TargetConfig::from_path(dir)?;
        let src = WeightSource::open(dir)?;
        let embed_name = [
            "model.embed_tokens.weight",
            "model.language_model.embed_tokens.weight",
            "language_model.model.embed_tokens.weight",
            "embed_tokens.weight",
        ]
        .into_iter()
        .find(|n| src.contains(n))
        .ok_or_else(|| Error::MissingTensors { path: dir.to_path_buf(), names: vec!["model.embed_tokens.weight".into()] })?;
        let expect = [cfg.vocab_size, cfg.hidden_size];
        let get = |name: &str| -> Result<Tensor> {
            match src.shape(name) {
                Some(s) if s == expect => src.get(name, kind, device),
                Some(s) => {
                    Err(Error::Shape { name: name.into(), expected: expect.to_vec(), got: s.to_vec(), path: Some(dir.to_path_buf()) })
                }
                None => Err(Error::MissingTensors { path: dir.to_path_buf(), names: vec![name.into()] }),
            }
        };
        let embed_tokens = get(embed_name)?;
        let lm_head = if src.contains("lm_head.weight") {
            get("lm_head.weight")?
        } else if cfg.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            return Err(Error::MissingTensors { path: dir.to_path_buf(), names: vec!["lm_head.weight".into()] });
        };
        Ok(TargetHead { cfg, embed_tokens, lm_head, dir: dir.to_path_buf() })
    }
}
