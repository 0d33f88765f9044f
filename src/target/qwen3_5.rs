//! Qwen3.5 hybrid target (Gated DeltaNet + gated full attention). Being written; see issue 7.

use tch::{Device, Kind, Tensor};

use super::{Cache, ForwardInput, TargetModel, TargetOutput};
use crate::config::TargetConfig;
use crate::error::{Error, Result};
use crate::weights::WeightSource;

/// The Qwen3.5 text backbone.
pub struct Qwen35Model {
    cfg: TargetConfig,
    embed_tokens: Tensor,
}

impl Qwen35Model {
    /// Loads the model.
    pub fn load(cfg: TargetConfig, _src: &WeightSource, _kind: Kind, _device: Device) -> Result<Self> {
        Err(Error::UnsupportedModel {
            path: cfg.source.clone(),
            model_type: cfg.model_type.clone(),
            supported: "llama, qwen2, qwen3".into(),
        })
    }
}

impl TargetModel for Qwen35Model {
    fn config(&self) -> &TargetConfig {
        &self.cfg
    }
    fn forward(&self, _input: &ForwardInput<'_>, _cache: Option<&mut Cache>) -> Result<TargetOutput> {
        unreachable!()
    }
    fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }
    fn lm_head(&self) -> &Tensor {
        &self.embed_tokens
    }
}
