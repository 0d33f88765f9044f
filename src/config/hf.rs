//! A lenient mirror of Hugging Face `config.json`, resolved into a typed [`TargetConfig`].
//!
//! Lenient means: unknown keys are ignored and absent keys take the defaults transformers uses.
//! Both RoPE spellings are read: the legacy `rope_theta` + `rope_scaling` pair and transformers 5's
//! `rope_parameters`. VLM configs nest the text model under `text_config`; token ids and
//! `tie_word_embeddings` may sit at the top level.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{read_to_string, Error, Result};

/// Model types this build implements, as `config.json` spells them.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "qwen2", "qwen3", "qwen3_5", "qwen3_5_text"];

/// The fields of a (text) config.json we read. Everything is optional here; [`TargetConfig`]
/// applies the defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[allow(missing_docs)]
pub struct HfConfig {
    pub model_type: Option<String>,
    pub text_config: Option<Box<HfConfig>>,
    pub vocab_size: Option<i64>,
    pub hidden_size: Option<i64>,
    pub intermediate_size: Option<i64>,
    pub num_hidden_layers: Option<i64>,
    pub num_attention_heads: Option<i64>,
    pub num_key_value_heads: Option<i64>,
    pub head_dim: Option<i64>,
    pub hidden_act: Option<String>,
    pub max_position_embeddings: Option<i64>,
    pub rms_norm_eps: Option<f64>,
    pub tie_word_embeddings: Option<bool>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<Value>,
    pub rope_parameters: Option<Value>,
    pub partial_rotary_factor: Option<f64>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub layer_types: Option<Vec<String>>,
    pub use_sliding_window: Option<bool>,
    pub full_attention_interval: Option<i64>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
    pub pad_token_id: Option<Value>,
    pub linear_conv_kernel_dim: Option<i64>,
    pub linear_key_head_dim: Option<i64>,
    pub linear_value_head_dim: Option<i64>,
    pub linear_num_key_heads: Option<i64>,
    pub linear_num_value_heads: Option<i64>,
    pub attn_output_gate: Option<bool>,
}

/// Target architecture families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama family: optional attention / MLP biases (q, k, v and o together).
    Llama,
    /// Qwen2 / Qwen2.5: q/k/v bias always on, o_proj without bias.
    Qwen2,
    /// Qwen3 dense: per-head q/k RMSNorm before RoPE.
    Qwen3,
    /// Qwen3.5 hybrid: Gated DeltaNet + gated full attention, zero-centred norms.
    Qwen3_5,
}

impl Arch {
    /// The name used in logs and errors.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Qwen3_5 => "qwen3_5",
        }
    }
}

/// What kind of token mixer a decoder layer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Softmax attention over all earlier tokens.
    FullAttention,
    /// Gated DeltaNet (Qwen3.5 `linear_attention`).
    LinearAttention,
}

/// How RoPE frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain `θ^(-2i/d)`.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3 wavelength bands.
    Llama3 {
        /// Scale factor for long wavelengths.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// The context the base model was trained on.
        original_max_position_embeddings: f64,
    },
}

/// Resolved rotary-embedding parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// Base θ.
    pub theta: f64,
    /// Frequency scaling.
    pub scaling: RopeScaling,
    /// Fraction of head_dim that is rotated (Qwen3.5: 0.25).
    pub partial_rotary_factor: f64,
    /// M-RoPE sections over the rotary frequencies (temporal, height, width), if any.
    pub mrope_section: Option<Vec<i64>>,
    /// Whether the M-RoPE sections are interleaved (Qwen3-VL / Qwen3.5) rather than contiguous.
    pub mrope_interleaved: bool,
}

/// Gated DeltaNet dimensions (Qwen3.5 `linear_attention` layers).
#[derive(Debug, Clone, PartialEq)]
pub struct LinearAttnConfig {
    /// Depthwise causal conv width.
    pub conv_kernel_dim: i64,
    /// Key head dim (dk).
    pub key_head_dim: i64,
    /// Value head dim (dv).
    pub value_head_dim: i64,
    /// Number of key heads.
    pub num_key_heads: i64,
    /// Number of value heads.
    pub num_value_heads: i64,
}

/// A target's text-model config with every default applied.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Architecture family.
    pub arch: Arch,
    /// The model_type as written in the file.
    pub model_type: String,
    /// Vocabulary size V.
    pub vocab_size: i64,
    /// Hidden size H.
    pub hidden_size: i64,
    /// MLP intermediate size.
    pub intermediate_size: i64,
    /// Number of decoder layers L.
    pub num_hidden_layers: i64,
    /// Attention heads.
    pub num_attention_heads: i64,
    /// Key/value heads (GQA).
    pub num_key_value_heads: i64,
    /// Per-head dim (may differ from H / heads).
    pub head_dim: i64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Whether lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Rotary embedding.
    pub rope: RopeConfig,
    /// Bias on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3, Qwen3.5).
    pub qk_norm: bool,
    /// One entry per decoder layer.
    pub layer_types: Vec<LayerType>,
    /// Gated DeltaNet dims, for hybrid models.
    pub linear_attn: Option<LinearAttnConfig>,
    /// End-of-sequence token ids from config.json (generation_config.json may add more).
    pub eos_token_ids: Vec<i64>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<i64>,
    /// Padding token id.
    pub pad_token_id: Option<i64>,
    /// Hex xxh3-64 of the config.json bytes, recorded in shard manifests.
    pub config_hash: String,
    /// Where the config came from.
    pub source: PathBuf,
}

fn token_ids(v: &Option<Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
        _ => Vec::new(),
    }
}

impl TargetConfig {
    /// Reads `dir/config.json` (or a config file path) and resolves it.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::Json`] for unreadable files, [`Error::UnsupportedModel`] for a
    /// model_type outside [`SUPPORTED_MODEL_TYPES`], [`Error::Config`] naming the field for
    /// missing or inconsistent values.
    pub fn from_path(path: &Path) -> Result<Self> {
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = read_to_string(&file)?;
        Self::from_json_str(&text, &file)
    }

    /// Resolves a config from its JSON text; `source` is only used in errors.
    pub fn from_json_str(text: &str, source: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Json { path: source.to_path_buf(), source: e })?;
        // The file's bytes: simple to reproduce from any language (tools writing shards in Python
        // compute the same hash).
        let config_hash = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()));
        let top: HfConfig = serde_json::from_value(value).map_err(|e| Error::Json { path: source.to_path_buf(), source: e })?;
        resolve(&top, config_hash, source)
    }
}

/// The largest size a config may give one dimension (vocabularies included): anything above is a
/// corrupt or hostile file, refused before a tensor is allocated.
pub const MAX_SIZE: i64 = 1 << 24;
/// The largest weight matrix, in elements (64 GiB in fp32).
pub const MAX_MATRIX: i64 = 1 << 34;

/// `value` of `field` as a size: in 1..=[`MAX_SIZE`].
pub fn check_size(source: &Path, field: &str, value: i64) -> Result<i64> {
    if (1..=MAX_SIZE).contains(&value) {
        Ok(value)
    } else {
        Err(Error::config(source, field, format!("must be in 1..={MAX_SIZE}, got {value}")))
    }
}

/// A `rows × hidden` weight matrix that fits [`MAX_MATRIX`].
pub fn check_matrix(source: &Path, field: &str, rows: i64, hidden: i64) -> Result<()> {
    if rows.saturating_mul(hidden) > MAX_MATRIX {
        return Err(Error::config(source, field, format!("{rows} × hidden size {hidden} is over {MAX_MATRIX} weights in one matrix")));
    }
    Ok(())
}

fn resolve(top: &HfConfig, config_hash: String, source: &Path) -> Result<TargetConfig> {
    let text = top.text_config.as_deref().unwrap_or(top);
    let model_type = text.model_type.clone().or_else(|| top.model_type.clone()).unwrap_or_default();
    let arch = match model_type.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        "qwen3" => Arch::Qwen3,
        "qwen3_5" | "qwen3_5_text" => Arch::Qwen3_5,
        other => {
            return Err(Error::UnsupportedModel {
                path: source.to_path_buf(),
                model_type: other.to_string(),
                supported: SUPPORTED_MODEL_TYPES.join(", "),
            })
        }
    };
    let need = |v: Option<i64>, field: &str| -> Result<i64> {
        match v {
            Some(x) => check_size(source, field, x),
            None => Err(Error::config(source, field, "is missing")),
        }
    };
    let hidden_size = need(text.hidden_size, "hidden_size")?;
    let num_attention_heads = need(text.num_attention_heads, "num_attention_heads")?;
    let num_key_value_heads = need(text.num_key_value_heads.or(Some(num_attention_heads)), "num_key_value_heads")?;
    if num_attention_heads % num_key_value_heads != 0 {
        return Err(Error::config(
            source,
            "num_key_value_heads",
            format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
        ));
    }
    let head_dim = match text.head_dim {
        Some(d) => need(Some(d), "head_dim")?,
        None => {
            if hidden_size % num_attention_heads != 0 {
                return Err(Error::config(
                    source,
                    "head_dim",
                    format!("absent and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"),
                ));
            }
            hidden_size / num_attention_heads
        }
    };
    let num_hidden_layers = need(text.num_hidden_layers, "num_hidden_layers")?;
    if let Some(act) = &text.hidden_act {
        if act != "silu" {
            return Err(Error::config(source, "hidden_act", format!("only `silu` is implemented, got `{act}`")));
        }
    }
    if text.use_sliding_window == Some(true) {
        return Err(Error::config(source, "use_sliding_window", "sliding-window attention is not implemented (true)"));
    }

    let rope = resolve_rope(text, arch, source)?;
    let layer_types = resolve_layer_types(text, arch, num_hidden_layers, source)?;
    let linear_attn = if arch == Arch::Qwen3_5 {
        Some(LinearAttnConfig {
            conv_kernel_dim: need(text.linear_conv_kernel_dim.or(Some(4)), "linear_conv_kernel_dim")?,
            key_head_dim: need(text.linear_key_head_dim, "linear_key_head_dim")?,
            value_head_dim: need(text.linear_value_head_dim, "linear_value_head_dim")?,
            num_key_heads: need(text.linear_num_key_heads, "linear_num_key_heads")?,
            num_value_heads: need(text.linear_num_value_heads, "linear_num_value_heads")?,
        })
    } else {
        None
    };
    if let Some(la) = &linear_attn {
        if la.num_value_heads % la.num_key_heads != 0 {
            return Err(Error::config(
                source,
                "linear_num_value_heads",
                format!("{} is not a multiple of linear_num_key_heads {}", la.num_value_heads, la.num_key_heads),
            ));
        }
    }

    let attention_bias = text.attention_bias.unwrap_or(false);
    let (qkv_bias, o_bias) = match arch {
        // transformers hard-wires Qwen2's q/k/v bias on and o_proj's off.
        Arch::Qwen2 => (true, false),
        _ => (attention_bias, attention_bias),
    };
    let first_i64 = |v: &Option<Value>| token_ids(v).first().copied();
    let vocab_size = need(text.vocab_size, "vocab_size")?;
    let intermediate_size = need(text.intermediate_size, "intermediate_size")?;
    check_matrix(source, "vocab_size", vocab_size, hidden_size)?;
    check_matrix(source, "intermediate_size", intermediate_size, hidden_size)?;
    check_matrix(source, "num_attention_heads", num_attention_heads * head_dim, hidden_size)?;
    Ok(TargetConfig {
        arch,
        model_type,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: text.rms_norm_eps.unwrap_or(1e-6),
        // VLMs keep tie_word_embeddings at the top level; text configs default to the model's own.
        tie_word_embeddings: top.tie_word_embeddings.or(text.tie_word_embeddings).unwrap_or(false),
        rope,
        qkv_bias,
        o_bias,
        mlp_bias: arch == Arch::Llama && text.mlp_bias.unwrap_or(false),
        qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3_5),
        layer_types,
        linear_attn,
        eos_token_ids: {
            let mut ids = token_ids(&top.eos_token_id);
            ids.extend(token_ids(&text.eos_token_id));
            ids.sort_unstable();
            ids.dedup();
            ids
        },
        bos_token_id: first_i64(&top.bos_token_id).or_else(|| first_i64(&text.bos_token_id)),
        pad_token_id: first_i64(&top.pad_token_id).or_else(|| first_i64(&text.pad_token_id)),
        config_hash,
        source: source.to_path_buf(),
    })
}

fn resolve_rope(text: &HfConfig, arch: Arch, source: &Path) -> Result<RopeConfig> {
    // transformers 5 `rope_parameters` wins; the legacy pair is rope_theta + rope_scaling.
    let params = text.rope_parameters.as_ref().filter(|v| v.is_object());
    let scaling = text.rope_scaling.as_ref().filter(|v| v.is_object());
    let get = |key: &str| -> Option<&Value> { params.and_then(|p| p.get(key)).or_else(|| scaling.and_then(|s| s.get(key))) };
    let num = |key: &str| get(key).and_then(Value::as_f64);
    // transformers defaults θ to 10000 for every family here (Qwen3.5 configs state 1e7 explicitly).
    let default_theta = 10_000.0;
    let theta = num("rope_theta").or(text.rope_theta).unwrap_or(default_theta);
    let rope_type = get("rope_type").or_else(|| get("type")).and_then(Value::as_str).unwrap_or("default");
    let field = |k: &str| format!("rope_parameters.{k}");
    let need = |key: &str| num(key).ok_or_else(|| Error::config(source, field(key), format!("is required for rope_type `{rope_type}`")));
    let scaling = match rope_type {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear { factor: need("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        },
        other => {
            return Err(Error::config(
                source,
                "rope_parameters.rope_type",
                format!("`{other}` is not implemented (implemented: default, linear, llama3)"),
            ))
        }
    };
    let partial_rotary_factor =
        num("partial_rotary_factor").or(text.partial_rotary_factor).unwrap_or(if arch == Arch::Qwen3_5 { 0.25 } else { 1.0 });
    let mrope_section = get("mrope_section").and_then(Value::as_array).map(|a| a.iter().filter_map(Value::as_i64).collect::<Vec<_>>());
    let mrope_interleaved = get("mrope_interleaved").and_then(Value::as_bool).unwrap_or(false);
    Ok(RopeConfig { theta, scaling, partial_rotary_factor, mrope_section, mrope_interleaved })
}

fn resolve_layer_types(text: &HfConfig, arch: Arch, n: i64, source: &Path) -> Result<Vec<LayerType>> {
    if let Some(types) = &text.layer_types {
        if types.len() as i64 != n {
            return Err(Error::config(source, "layer_types", format!("has {} entries but num_hidden_layers is {n}", types.len())));
        }
        return types
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                "full_attention" => Ok(LayerType::FullAttention),
                "linear_attention" if arch == Arch::Qwen3_5 => Ok(LayerType::LinearAttention),
                other => Err(Error::config(source, format!("layer_types[{i}]"), format!("`{other}` is not supported for {}", arch.name()))),
            })
            .collect();
    }
    if arch == Arch::Qwen3_5 {
        let every = text.full_attention_interval.unwrap_or(4);
        if every <= 0 {
            return Err(Error::config(source, "full_attention_interval", format!("must be positive, got {every}")));
        }
        return Ok((0..n).map(|i| if (i + 1) % every == 0 { LayerType::FullAttention } else { LayerType::LinearAttention }).collect());
    }
    Ok(vec![LayerType::FullAttention; n as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(json: &str) -> Result<TargetConfig> {
        TargetConfig::from_json_str(json, Path::new("config.json"))
    }

    const LLAMA: &str = r#"{"model_type":"llama","vocab_size":128,"hidden_size":64,"intermediate_size":128,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rope_theta":500000.0,
        "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,
        "original_max_position_embeddings":8192},"tie_word_embeddings":true,"eos_token_id":[1,2]}"#;

    #[test]
    fn impossible_sizes_are_refused_by_name() {
        for (field, bad) in [
            ("num_attention_heads", "0"),
            ("num_key_value_heads", "-2"),
            ("hidden_size", "1099511627776"),
            ("vocab_size", "16777217"),
            ("intermediate_size", "33554432"),
        ] {
            let json = LLAMA.replacen(&format!("\"{field}\":"), &format!("\"{field}\":{bad},\"_old_{field}\":"), 1);
            let e = cfg(&json).unwrap_err().to_string();
            assert!(e.contains(field), "{field} = {bad}: {e}");
        }
    }

    #[test]
    fn legacy_rope_spelling() {
        let c = cfg(LLAMA).unwrap();
        assert_eq!(c.rope.theta, 500000.0);
        assert!(matches!(c.rope.scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(c.head_dim, 16);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
    }

    #[test]
    fn transformers5_rope_spelling() {
        let c = cfg(r#"{"model_type":"qwen3","vocab_size":128,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"head_dim":32,
            "rope_parameters":{"rope_type":"default","rope_theta":1000000.0}}"#)
        .unwrap();
        assert_eq!(c.rope.theta, 1e6);
        assert_eq!(c.head_dim, 32);
        assert!(c.qk_norm);
        assert!(!c.qkv_bias);
    }

    #[test]
    fn qwen2_bias_is_hardwired() {
        let c = cfg(r#"{"model_type":"qwen2","vocab_size":128,"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2}"#)
        .unwrap();
        assert!(c.qkv_bias && !c.o_bias);
    }

    #[test]
    fn unknown_model_type_lists_supported() {
        let e = cfg(r#"{"model_type":"gpt2"}"#).unwrap_err().to_string();
        assert!(e.contains("gpt2") && e.contains("qwen3") && e.contains("llama"), "{e}");
    }

    #[test]
    fn missing_field_is_named() {
        let e = cfg(r#"{"model_type":"llama","vocab_size":128}"#).unwrap_err().to_string();
        assert!(e.contains("hidden_size"), "{e}");
    }

    #[test]
    fn qwen35_layer_types_from_interval() {
        let c = cfg(r#"{"model_type":"qwen3_5","tie_word_embeddings":false,"text_config":{"model_type":"qwen3_5_text",
            "vocab_size":128,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":8,"num_attention_heads":4,
            "num_key_value_heads":2,"head_dim":32,"linear_key_head_dim":16,"linear_value_head_dim":16,
            "linear_num_key_heads":2,"linear_num_value_heads":4,"tie_word_embeddings":true}}"#)
        .unwrap();
        assert!(!c.tie_word_embeddings, "the top-level value wins for VLM configs");
        let full: Vec<usize> = c.layer_types.iter().enumerate().filter(|(_, t)| **t == LayerType::FullAttention).map(|(i, _)| i).collect();
        assert_eq!(full, vec![3, 7]);
        assert_eq!(c.rope.partial_rotary_factor, 0.25);
    }
}
