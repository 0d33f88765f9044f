//! Frozen target models (`[target]` in docs/architecture.md; regenerate, extract and eval run
//! them).
//!
//! Responsibility: load a Hugging Face checkpoint, run its forward exactly as transformers does,
//! and hand out the hidden states EAGLE-3 trains on. The aux-id convention is fixed here:
//! id k is the residual stream *entering* decoder layer k (transformers' `hidden_states[k]` for
//! k < L); id 0 is the embedding output and id L the last layer's output before the final norm
//! (which transformers' `hidden_states` does not expose: its last element is post-norm).

pub mod dense;
pub mod head;
pub mod qwen3_5;
pub mod registry;

use std::path::Path;

use tch::{Device, Kind, Tensor};

use crate::config::{Arch, TargetConfig};
use crate::error::{Error, Result};

/// Per-layer decoding state.
#[derive(Debug)]
pub enum LayerCache {
    /// Attention keys and values before head repetition, `[B, nkv, S, d]` each.
    Kv {
        /// Keys after RoPE.
        k: Tensor,
        /// Values.
        v: Tensor,
    },
    /// Gated DeltaNet state.
    Linear {
        /// The last `K-1` conv inputs per channel, `[B, conv_dim, K-1]`.
        conv: Tensor,
        /// Recurrent state `[B, nv, dk, dv]`, fp32.
        state: Tensor,
    },
}

/// Decoding state for a whole model: one entry per decoder layer, plus how many positions it holds.
#[derive(Debug, Default)]
pub struct Cache {
    /// Per-layer state; `None` before the first forward.
    pub layers: Vec<Option<LayerCache>>,
    /// Positions already consumed (keys in every attention cache).
    pub seq_len: i64,
}

impl Cache {
    /// An empty cache for a model of `num_layers` layers.
    pub fn new(num_layers: i64) -> Self {
        Cache { layers: (0..num_layers).map(|_| None).collect(), seq_len: 0 }
    }
}

/// What one target forward hands back.
#[derive(Debug)]
pub struct TargetOutput {
    /// The requested aux states in request order, each `[B, T, H]`.
    pub aux: Vec<Tensor>,
    /// The hidden state after the final norm, `[B, T, H]`; logits are `last_hidden · lm_headᵀ`.
    pub last_hidden: Tensor,
}

/// The inputs of one forward.
pub struct ForwardInput<'a> {
    /// Token ids `[B, T]` (int64).
    pub input_ids: &'a Tensor,
    /// `[B, past + T]`: 1 for real tokens, 0 for padding; `None` means no padding.
    pub attention_mask: Option<&'a Tensor>,
    /// `[B, T]` positions; `None` means `past..past+T` for every row.
    pub position_ids: Option<&'a Tensor>,
    /// Aux ids to capture (0..=L, our convention).
    pub capture: &'a [i64],
}

/// A frozen causal LM target.
pub trait TargetModel: Send {
    /// The resolved config.
    fn config(&self) -> &TargetConfig;

    /// Runs the backbone. With a cache, consumes `cache.seq_len` past positions and appends.
    ///
    /// # Errors
    /// [`Error::Input`] for aux ids outside 0..=L or shapes that do not fit.
    fn forward(&self, input: &ForwardInput<'_>, cache: Option<&mut Cache>) -> Result<TargetOutput>;

    /// The token embedding `[V, H]`.
    fn embed_tokens(&self) -> &Tensor;

    /// The output projection `[V, H]` (the embedding when tied).
    fn lm_head(&self) -> &Tensor;

    /// Logits `[.., V]` from post-norm hidden states `[.., H]`.
    fn logits(&self, last_hidden: &Tensor) -> Tensor {
        last_hidden.linear::<Tensor>(self.lm_head(), None)
    }
}

/// Checks capture ids against the layer count.
pub fn check_capture(capture: &[i64], num_layers: i64) -> Result<()> {
    if let Some(bad) = capture.iter().find(|&&k| k < 0 || k > num_layers) {
        return Err(Error::Input(format!("aux layer id {bad} is out of range 0..={num_layers} (id k = the input of decoder layer k)")));
    }
    Ok(())
}

/// Default positions `past..past+T` broadcast over the batch, `[B, T]`.
pub fn default_positions(b: i64, t: i64, past: i64, device: Device) -> Tensor {
    Tensor::arange_start(past, past + t, (Kind::Int64, device)).unsqueeze(0).expand([b, t], false)
}

/// Loads the target in `dir` (config.json + safetensors) in `kind` on `device`.
pub fn load(dir: &Path, kind: Kind, device: Device) -> Result<Box<dyn TargetModel>> {
    let cfg = TargetConfig::from_path(dir)?;
    let src = crate::weights::WeightSource::open(dir)?;
    Ok(match cfg.arch {
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 => Box::new(dense::DenseModel::load(cfg, &src, kind, device)?),
        Arch::Qwen3_5 => Box::new(qwen3_5::Qwen35Model::load(cfg, &src, kind, device)?),
    })
}
