//! The draft head's config: what we export as a flat EAGLE-3 `config.json` (the
//! `LlamaForCausalLMEagle3` config vLLM's and SGLang's `llama_eagle3.py` load) and read back for
//! `train-step` / `eval`.

use std::path::Path;

use serde_json::{json, Value};

use crate::config::hf::{check_matrix, check_size};
use crate::config::{RopeConfig, RopeScaling, TargetConfig};
use crate::error::{read_json, Error, Result};

/// The draft architecture, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Eagle3Config {
    /// Draft hidden size H (= the target's for every head we train).
    pub hidden_size: i64,
    /// Target hidden size T (width of each aux state).
    pub target_hidden_size: i64,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// KV heads.
    pub num_key_value_heads: i64,
    /// Per-head dim.
    pub head_dim: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Draft RoPE (plain θ; never partial).
    pub rope_theta: f64,
    /// Max positions the draft is served with.
    pub max_position_embeddings: i64,
    /// Target vocabulary size V.
    pub vocab_size: i64,
    /// Draft vocabulary size Vd.
    pub draft_vocab_size: i64,
    /// Aux ids in our (= vLLM's) convention: id k = the residual stream entering target layer k.
    pub aux_layer_ids: Vec<i64>,
    /// EAGLE-3.1: one RMSNorm per aux chunk before `fc`.
    pub fc_norm: bool,
    /// EAGLE-3.1: the post-norm hidden is both lm_head input and next-step hidden.
    pub norm_output: bool,
    /// One RMSNorm over the whole A·T aux vector before `fc` (`input_norm.weight`).
    pub norm_before_fc: bool,
}

impl Eagle3Config {
    /// Number of aux states A.
    pub fn num_aux(&self) -> i64 {
        self.aux_layer_ids.len() as i64
    }

    /// A draft sized like the target: same hidden, heads, head_dim and MLP width, RoPE θ of the
    /// target, one layer.
    pub fn for_target(t: &TargetConfig, aux_layer_ids: Vec<i64>, draft_vocab_size: i64, eagle31: bool) -> Self {
        Eagle3Config {
            hidden_size: t.hidden_size,
            target_hidden_size: t.hidden_size,
            num_attention_heads: t.num_attention_heads,
            num_key_value_heads: t.num_key_value_heads,
            head_dim: t.head_dim,
            intermediate_size: t.intermediate_size,
            rms_norm_eps: t.rms_norm_eps,
            rope_theta: t.rope.theta,
            max_position_embeddings: 262_144,
            vocab_size: t.vocab_size,
            draft_vocab_size,
            aux_layer_ids,
            fc_norm: eagle31,
            norm_output: eagle31,
            norm_before_fc: false,
        }
    }

    /// The draft's RoPE parameters.
    pub fn rope(&self) -> RopeConfig {
        RopeConfig {
            theta: self.rope_theta,
            scaling: RopeScaling::Default,
            partial_rotary_factor: 1.0,
            mrope_section: None,
            mrope_interleaved: false,
        }
    }

    /// Reads a flat EAGLE-3 `config.json` (ours, SpecForge's or speculators' flat form).
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_value(&read_json(path)?, path)
    }

    /// A draft config written for another tool — a llama-style EAGLE-3 `config.json` as SpecForge's
    /// `configs/*-eagle3.json` and vLLM's drafts have it — for a head on `target`. Fields that
    /// change the head are honoured; fields that describe nothing this head computes are accepted
    /// only at the value the head implements (`hidden_act: silu`, no biases, no dropout, ...);
    /// anything else is refused by name, never silently dropped. Without aux ids in the file the
    /// head reads `aux_ids`; the target's hidden size is the aux width unless the file says
    /// `target_hidden_size` (which must then agree).
    pub fn from_llama_eagle3(path: &Path, target: &TargetConfig, aux_ids: &[i64]) -> Result<Self> {
        let mut v: Value = read_json(path)?;
        let obj = v.as_object_mut().ok_or_else(|| Error::config(path, "config", "is not a JSON object"))?;
        for (key, value) in obj.iter() {
            let wants = |ok: bool, want: &str| {
                if ok {
                    Ok(())
                } else {
                    Err(Error::config(path, key.as_str(), format!("is {value}, but specforge-rs drafts implement only {want}")))
                }
            };
            match key.as_str() {
                // Honoured (read below).
                "hidden_size"
                | "intermediate_size"
                | "num_attention_heads"
                | "num_key_value_heads"
                | "head_dim"
                | "rms_norm_eps"
                | "rope_theta"
                | "max_position_embeddings"
                | "vocab_size"
                | "draft_vocab_size"
                | "fc_norm"
                | "norm_output"
                | "norm_before_fc"
                | "target_hidden_size"
                | "eagle_aux_hidden_state_layer_ids"
                | "eagle_config" => {}
                // Bookkeeping that changes nothing the head computes.
                "bos_token_id"
                | "eos_token_id"
                | "pad_token_id"
                | "initializer_range"
                | "torch_dtype"
                | "dtype"
                | "transformers_version"
                | "use_cache"
                | "max_window_layers"
                | "_name_or_path" => {}
                "architectures" => wants(
                    value.as_array().is_some_and(|a| a.iter().any(|x| x.as_str() == Some("LlamaForCausalLMEagle3"))),
                    "[\"LlamaForCausalLMEagle3\"]",
                )?,
                "model_type" => wants(value.as_str() == Some("llama"), "\"llama\"")?,
                "num_hidden_layers" => wants(value.as_i64() == Some(1), "1 (one decoder layer, as vLLM and SGLang serve it)")?,
                "hidden_act" => wants(value.as_str() == Some("silu"), "\"silu\"")?,
                "attention_dropout" => wants(value.as_f64() == Some(0.0), "0.0")?,
                "attention_bias" | "mlp_bias" | "tie_word_embeddings" | "use_sliding_window" | "norm_before_residual" => {
                    wants(value.as_bool() == Some(false), "false")?
                }
                "rope_scaling" | "sliding_window" => wants(value.is_null(), "null (plain RoPE, full attention)")?,
                _ => return Err(Error::config(path, key.as_str(), format!("({value}) is not a field specforge-rs can honour; remove it"))),
            }
        }
        let vocab = obj.get("vocab_size").and_then(Value::as_i64);
        if vocab != Some(target.vocab_size) {
            return Err(Error::config(path, "vocab_size", format!("is {vocab:?}, the target's vocabulary is {}", target.vocab_size)));
        }
        match obj.get("target_hidden_size").map(Value::as_i64) {
            None => {
                obj.insert("target_hidden_size".into(), target.hidden_size.into());
            }
            Some(Some(t)) if t == target.hidden_size => {}
            Some(t) => {
                return Err(Error::config(
                    path,
                    "target_hidden_size",
                    format!("is {t:?}, the target's hidden size is {}", target.hidden_size),
                ))
            }
        }
        if obj.get("eagle_aux_hidden_state_layer_ids").is_none()
            && obj.get("eagle_config").and_then(|c| c.get("eagle_aux_hidden_state_layer_ids")).is_none()
        {
            obj.insert("eagle_aux_hidden_state_layer_ids".into(), aux_ids.into());
        }
        Self::from_value(&v, path)
    }

    fn from_value(v: &Value, path: &Path) -> Result<Self> {
        let int = |k: &str| -> Result<i64> {
            v.get(k).and_then(Value::as_i64).ok_or_else(|| Error::config(path, k, "is missing or not an integer"))
        };
        let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        let hidden_size = check_size(path, "hidden_size", int("hidden_size")?)?;
        let heads = check_size(path, "num_attention_heads", int("num_attention_heads")?)?;
        let aux_layer_ids: Vec<i64> = v
            .get("eagle_aux_hidden_state_layer_ids")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .or_else(|| {
                // Only SGLang's nested list: convert from its numbering (ours − 1).
                v.pointer("/eagle_config/eagle_aux_hidden_state_layer_ids")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_i64).map(|k| k + 1).collect())
            })
            .ok_or_else(|| Error::config(path, "eagle_aux_hidden_state_layer_ids", "is missing"))?;
        if v.get("num_hidden_layers").and_then(Value::as_i64).unwrap_or(1) != 1 {
            return Err(Error::config(path, "num_hidden_layers", "must be 1 (multi-layer drafts differ between vLLM and SGLang)"));
        }
        if flag("norm_before_residual") {
            return Err(Error::config(path, "norm_before_residual", "true is not supported (SGLang cannot serve it)"));
        }
        let cfg = Eagle3Config {
            hidden_size,
            target_hidden_size: v.get("target_hidden_size").and_then(Value::as_i64).unwrap_or(hidden_size),
            num_attention_heads: heads,
            num_key_value_heads: v.get("num_key_value_heads").and_then(Value::as_i64).unwrap_or(heads),
            head_dim: v.get("head_dim").and_then(Value::as_i64).unwrap_or(hidden_size / heads),
            intermediate_size: int("intermediate_size")?,
            rms_norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta: v
                .get("rope_theta")
                .and_then(Value::as_f64)
                .or_else(|| v.pointer("/rope_parameters/rope_theta").and_then(Value::as_f64))
                .unwrap_or(10_000.0),
            max_position_embeddings: v.get("max_position_embeddings").and_then(Value::as_i64).unwrap_or(2048),
            vocab_size: int("vocab_size")?,
            draft_vocab_size: v.get("draft_vocab_size").and_then(Value::as_i64).unwrap_or(int("vocab_size")?),
            aux_layer_ids,
            fc_norm: flag("fc_norm"),
            norm_output: flag("norm_output"),
            norm_before_fc: flag("norm_before_fc"),
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Checks the config is internally consistent and of a size that can exist, before anything
    /// is allocated for it.
    pub fn validate(&self, path: &Path) -> Result<()> {
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("target_hidden_size", self.target_hidden_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            check_size(path, field, v)?;
        }
        check_matrix(path, "intermediate_size", self.intermediate_size, self.hidden_size)?;
        check_matrix(path, "draft_vocab_size", self.draft_vocab_size, self.hidden_size)?;
        check_matrix(path, "num_attention_heads", self.num_attention_heads * self.head_dim, 2 * self.hidden_size)?;
        check_matrix(path, "eagle_aux_hidden_state_layer_ids", self.num_aux() * self.target_hidden_size, self.hidden_size)?;
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(Error::config(path, "rms_norm_eps", format!("must be a positive number, got {}", self.rms_norm_eps)));
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(Error::config(
                path,
                "num_key_value_heads",
                format!("{} does not divide num_attention_heads {}", self.num_key_value_heads, self.num_attention_heads),
            ));
        }
        if self.aux_layer_ids.is_empty() {
            return Err(Error::config(path, "eagle_aux_hidden_state_layer_ids", "is empty"));
        }
        if self.draft_vocab_size <= 0 || self.draft_vocab_size > self.vocab_size {
            return Err(Error::config(path, "draft_vocab_size", format!("{} must be in 1..={}", self.draft_vocab_size, self.vocab_size)));
        }
        if self.fc_norm && self.norm_before_fc {
            return Err(Error::config(path, "fc_norm", "and norm_before_fc are mutually exclusive"));
        }
        Ok(())
    }

    /// The flat config.json both vLLM and SGLang load (tests/reference/serving_draft.py reads it):
    /// every flag explicit, aux ids twice (top level in vLLM's numbering = ours, nested in
    /// SGLang's = ours − 1).
    pub fn to_export_json(&self) -> Value {
        let sglang_ids: Vec<i64> = self.aux_layer_ids.iter().map(|k| k - 1).collect();
        json!({
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": 1,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
            "target_hidden_size": self.target_hidden_size,
            "num_aux_hidden_states": self.num_aux(),
            "eagle_aux_hidden_state_layer_ids": self.aux_layer_ids,
            "eagle_config": {
                "use_aux_hidden_state": true,
                "eagle_aux_hidden_state_layer_ids": sglang_ids,
            },
            "norm_before_residual": false,
            "norm_before_fc": self.norm_before_fc,
            "fc_norm": self.fc_norm,
            "norm_output": self.norm_output,
            "specforge_rs": {
                "aux_layer_id_convention": "id k = residual stream entering target decoder layer k (HF hidden_states[k]); top-level ids use it (vLLM), eagle_config ids are k-1 (SGLang)",
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_draft_configs_are_refused_before_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let good = serde_json::json!({
            "architectures": ["LlamaForCausalLMEagle3"], "hidden_size": 16, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 8, "intermediate_size": 24, "vocab_size": 40,
            "draft_vocab_size": 10, "eagle_aux_hidden_state_layer_ids": [1, 2, 3],
        });
        std::fs::write(&p, good.to_string()).unwrap();
        Eagle3Config::from_file(&p).unwrap();
        for (field, bad) in [
            ("num_attention_heads", serde_json::json!(0)),
            ("num_key_value_heads", serde_json::json!(0)),
            ("head_dim", serde_json::json!(-8)),
            ("hidden_size", serde_json::json!(1_i64 << 40)),
            ("intermediate_size", serde_json::json!(1_i64 << 25)),
            ("rms_norm_eps", serde_json::json!(-1.0)),
        ] {
            let mut v = good.clone();
            v[field] = bad.clone();
            std::fs::write(&p, v.to_string()).unwrap();
            let e = Eagle3Config::from_file(&p).unwrap_err().to_string();
            assert!(e.contains(field), "{field} = {bad}: {e}");
        }
    }
}
