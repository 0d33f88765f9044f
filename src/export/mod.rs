//! Export: the serving format of the `export` stage (docs/architecture.md). A trained head as the
//! flat EAGLE-3 directory vLLM and SGLang load unchanged (both as `LlamaForCausalLMEagle3`):
//! `config.json` with every flag explicit and the aux ids in both servers' numbering,
//! `model.safetensors` in bf16 with `d2t` (int64) and `t2d` (bool), no embedding, no
//! `model.` prefix, `midlayer.*` names. Optionally the speculators format (vLLM only).
//!
//! Servers skip unknown tensor names silently and fill missing ones with random weights, so the
//! whole export is validated (names, shapes, dtypes, flags) before anything is written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tch::{Kind, Tensor};

use crate::draft::{Eagle3Config, Eagle3Draft};
use crate::error::{Error, Result};
use crate::weights::{save_safetensors, SafetensorsFile};

/// Which config flavour to write (the recipe's `export.format`).
pub use crate::config::ExportFormat as Format;

/// The tensors a head with `cfg` must have: name → (shape, dtype).
pub fn expected_tensors(cfg: &Eagle3Config) -> BTreeMap<String, (Vec<i64>, Kind)> {
    let (h, t, a) = (cfg.hidden_size, cfg.target_hidden_size, cfg.num_aux());
    let (nh, nkv, d, i) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
    let bf = Kind::BFloat16;
    let mut m: BTreeMap<String, (Vec<i64>, Kind)> = [
        ("fc.weight", vec![h, a * t]),
        ("midlayer.input_layernorm.weight", vec![h]),
        ("midlayer.hidden_norm.weight", vec![h]),
        ("midlayer.self_attn.q_proj.weight", vec![nh * d, 2 * h]),
        ("midlayer.self_attn.k_proj.weight", vec![nkv * d, 2 * h]),
        ("midlayer.self_attn.v_proj.weight", vec![nkv * d, 2 * h]),
        ("midlayer.self_attn.o_proj.weight", vec![h, nh * d]),
        ("midlayer.post_attention_layernorm.weight", vec![h]),
        ("midlayer.mlp.gate_proj.weight", vec![i, h]),
        ("midlayer.mlp.up_proj.weight", vec![i, h]),
        ("midlayer.mlp.down_proj.weight", vec![h, i]),
        ("norm.weight", vec![h]),
        ("lm_head.weight", vec![cfg.draft_vocab_size, h]),
    ]
    .into_iter()
    .map(|(n, s)| (n.to_string(), (s, bf)))
    .collect();
    if cfg.fc_norm {
        for k in 0..a {
            m.insert(format!("fc_norm.{k}.weight"), (vec![t], bf));
        }
    }
    if cfg.norm_before_fc {
        m.insert("input_norm.weight".into(), (vec![a * t], bf));
    }
    m.insert("d2t".into(), (vec![cfg.draft_vocab_size], Kind::Int64));
    m.insert("t2d".into(), (vec![cfg.vocab_size], Kind::Bool));
    m
}

/// Checks an export before it is written: names (no extras, none missing, no `model.` prefix,
/// no embedding), shapes, dtypes, the vocabulary maps and the config flags.
pub fn validate(cfg: &Eagle3Config, config_json: &Value, tensors: &[(String, Tensor)]) -> Result<()> {
    let want = expected_tensors(cfg);
    let got: BTreeMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let bad = |what: String| Err(Error::Input(format!("export validation: {what}")));
    // Unexpected names first: a wrong prefix shows up there, by name.
    let extra: Vec<String> = got.keys().filter(|n| !want.contains_key(**n)).map(|n| n.to_string()).collect();
    if !extra.is_empty() {
        return Err(Error::UnexpectedTensors { path: "export".into(), names: extra });
    }
    let missing: Vec<String> = want.keys().filter(|n| !got.contains_key(n.as_str())).cloned().collect();
    if !missing.is_empty() {
        return Err(Error::MissingTensors { path: "export".into(), names: missing });
    }
    for (name, (shape, kind)) in &want {
        let t = got[name.as_str()];
        if t.size() != *shape {
            return Err(Error::Shape { name: name.clone(), expected: shape.clone(), got: t.size(), path: None });
        }
        if t.kind() != *kind {
            return Err(Error::Dtype { name: name.clone(), expected: format!("{kind:?}"), got: format!("{:?}", t.kind()), path: None });
        }
        if matches!(kind, Kind::BFloat16) && !bool::try_from(t.isfinite().all()).unwrap_or(false) {
            return bad(format!("`{name}` has NaN or inf values"));
        }
    }
    // d2t must map draft ids onto exactly the t2d ids, in order (target = draft + d2t[draft]).
    let t2d = got["t2d"];
    let ids = Tensor::arange(cfg.draft_vocab_size, (Kind::Int64, t2d.device())) + got["d2t"];
    let trues = t2d.sum(Kind::Int64).int64_value(&[]);
    if trues != cfg.draft_vocab_size {
        return bad(format!("t2d has {trues} trues, draft_vocab_size is {}", cfg.draft_vocab_size));
    }
    if !ids.equal(&t2d.nonzero().squeeze_dim(1)) {
        return bad("d2t does not map draft ids onto the t2d ids in ascending order".into());
    }
    // Flags the servers read with differing defaults must be explicit (pitfalls 2-4, 7, 8).
    let c = config_json;
    let field = |k: &str| c.get(k).cloned().unwrap_or(Value::Null);
    if field("architectures") != json!(["LlamaForCausalLMEagle3"]) {
        return bad(format!("architectures must be [\"LlamaForCausalLMEagle3\"] (SGLang's entry class), got {}", field("architectures")));
    }
    for flag in ["norm_before_residual", "norm_before_fc", "fc_norm", "norm_output", "tie_word_embeddings"] {
        if !field(flag).is_boolean() {
            return bad(format!("`{flag}` must be written explicitly as a boolean"));
        }
    }
    if field("norm_before_residual") != json!(false) || field("tie_word_embeddings") != json!(false) {
        return bad("norm_before_residual and tie_word_embeddings must be false".into());
    }
    if !field("target_hidden_size").is_i64() || !field("draft_vocab_size").is_i64() || !field("num_aux_hidden_states").is_i64() {
        return bad("target_hidden_size, draft_vocab_size and num_aux_hidden_states must be integers".into());
    }
    if field("num_hidden_layers") != json!(1) {
        return bad("num_hidden_layers must be 1".into());
    }
    let top = field("eagle_aux_hidden_state_layer_ids");
    let nested = c.pointer("/eagle_config/eagle_aux_hidden_state_layer_ids").cloned().unwrap_or(Value::Null);
    let plus_one: Option<Vec<i64>> = nested.as_array().map(|a| a.iter().filter_map(Value::as_i64).map(|k| k + 1).collect());
    if top != json!(cfg.aux_layer_ids) || plus_one != Some(cfg.aux_layer_ids.clone()) {
        return bad(format!(
            "aux ids must be {:?} at the top level (vLLM) and one less in eagle_config (SGLang); got {top} and {nested}",
            cfg.aux_layer_ids
        ));
    }
    Ok(())
}

/// The record of the files an export directory's last export wrote (hidden, so never pushed
/// itself): `push` uploads exactly these and names anything else in the directory as left out.
pub const RECORD: &str = ".specforge-export.json";

/// Adds `names` (paths relative to `dir`) to the record of files the export wrote; `fresh`
/// starts a new record (a new export: what an older one wrote becomes stale).
pub fn record_files(dir: &Path, names: &[&str], fresh: bool) -> Result<()> {
    let mut files = if fresh { Vec::new() } else { recorded_files(dir)?.unwrap_or_default() };
    for n in names {
        if !files.iter().any(|f| f == n) {
            files.push(n.to_string());
        }
    }
    files.sort();
    let text = serde_json::to_string_pretty(&json!({"written_by": "specforge-rs export", "files": files}))
        .map_err(|e| Error::Input(e.to_string()))?;
    crate::util::fs::write_atomic(&dir.join(RECORD), text.as_bytes())
}

/// The files the last export into `dir` wrote, when it recorded them.
pub fn recorded_files(dir: &Path) -> Result<Option<Vec<String>>> {
    let p = dir.join(RECORD);
    if !p.is_file() {
        return Ok(None);
    }
    let v: Value = crate::error::read_json(&p)?;
    let files = v
        .get("files")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::config(&p, "files", "is missing or not a list"))?
        .iter()
        .map(|f| f.as_str().map(str::to_string).ok_or_else(|| Error::config(&p, "files", format!("holds a non-string {f}"))))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(files))
}

/// Writes the export of `draft` to `out` (validated first; nothing is written if it fails).
pub fn export(draft: &Eagle3Draft, out: &Path, format: Format, verifier: Option<&str>) -> Result<PathBuf> {
    let mut config = draft.cfg.to_export_json();
    if format == Format::Speculators {
        let flat = config.clone();
        if let Value::Object(m) = &mut config {
            m.insert("speculators_model_type".into(), json!("eagle3"));
            m.insert("transformer_layer_config".into(), flat);
            m.insert(
                "speculators_config".into(),
                json!({
                    "algorithm": "eagle3",
                    "default_proposal_method": "greedy",
                    "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3, "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                    "verifier": {"name_or_path": verifier.unwrap_or(""), "architectures": []},
                }),
            );
        }
    }
    let tensors = draft.export_tensors(Kind::BFloat16);
    validate(&draft.cfg, &config, &tensors)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    save_safetensors(&out.join("model.safetensors"), &tensors, Some(meta))?;
    let cfg_path = out.join("config.json");
    let text = serde_json::to_string_pretty(&config).map_err(|e| Error::Input(e.to_string()))?;
    crate::util::fs::write_atomic(&cfg_path, text.as_bytes())?;
    record_files(out, &["config.json", "model.safetensors"], true)?;
    Ok(out.to_path_buf())
}

/// Re-validates an export directory from disk (what `export` wrote, or a head from elsewhere):
/// an EAGLE-3 `config.json`, then every tensor of `model.safetensors` against it, as [`validate`]
/// checks before writing. `push` uploads nothing that fails here.
pub fn validate_dir(dir: &Path) -> Result<Eagle3Config> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::Input(format!("{}: no config.json", dir.display())));
    }
    let config: Value = crate::error::read_json(&cfg_path)?;
    let archs = config.get("architectures").and_then(Value::as_array);
    if !archs.is_some_and(|a| a.iter().any(|x| x.as_str() == Some("LlamaForCausalLMEagle3"))) {
        return Err(Error::config(
            &cfg_path,
            "architectures",
            format!(
                "is {}, expected [\"LlamaForCausalLMEagle3\"]: not an EAGLE-3 head",
                config.get("architectures").map_or_else(|| "missing".into(), |a| a.to_string())
            ),
        ));
    }
    let cfg = Eagle3Config::from_file(&cfg_path)?;
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        return Err(Error::Input(format!("{}: no model.safetensors", dir.display())));
    }
    let f = SafetensorsFile::open(&weights)?;
    let tensors = f.names().map(|n| Ok((n.to_string(), f.tensor(n)?))).collect::<Result<Vec<_>>>()?;
    validate(&cfg, &config, &tensors)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    use crate::draft::tiny_draft as tiny;

    /// Export, then each serving pitfall that applies to a file we write is rejected.
    #[test]
    fn export_round_trip_and_pitfalls() {
        for eagle31 in [false, true] {
            let draft = tiny(eagle31);
            let dir = tempfile::tempdir().unwrap();
            export(&draft, dir.path(), Format::Vllm, None).unwrap();
            let cfg = validate_dir(dir.path()).unwrap();
            assert_eq!(cfg, draft.cfg);
            let config: Value = crate::error::read_json(&dir.path().join("config.json")).unwrap();
            assert_eq!(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"], json!([0, 1, 2]));
            let good = draft.export_tensors(Kind::BFloat16);
            let check = |config: &Value, tensors: &[(String, Tensor)]| {
                validate(&draft.cfg, config, tensors).err().map(|e| e.to_string()).unwrap_or_default()
            };
            assert_eq!(check(&config, &good), "");
            let edit = |f: &dyn Fn(&mut Vec<(String, Tensor)>)| {
                let mut t: Vec<(String, Tensor)> = good.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect();
                f(&mut t);
                check(&config, &t)
            };
            // `model.` prefix (vLLM load failure) and `layers.0.` names (old SGLang: silently random).
            assert!(edit(&|t| t[0].0 = format!("model.{}", t[0].0)).contains("model."));
            assert!(edit(&|t| t.iter_mut().for_each(|(n, _)| *n = n.replace("midlayer.", "layers.0."))).contains("layers.0."));
            // A trained embedding shipped along.
            assert!(edit(&|t| t.push(("embed_tokens.weight".into(), Tensor::zeros([40, 16], (Kind::BFloat16, Device::Cpu)))))
                .contains("embed_tokens"));
            // Wrong dtype and shape; a d2t that disagrees with t2d.
            assert!(edit(&|t| t.iter_mut().filter(|(n, _)| n == "norm.weight").for_each(|(_, x)| *x = x.to_kind(Kind::Float)))
                .contains("norm.weight"));
            assert!(edit(&|t| t.iter_mut().filter(|(n, _)| n == "lm_head.weight").for_each(|(_, x)| *x = x.narrow(0, 0, 5)))
                .contains("lm_head.weight"));
            assert!(edit(&|t| t.iter_mut().filter(|(n, _)| n == "d2t").for_each(|(_, x)| *x = x.zeros_like())).contains("d2t"));
            // Config pitfalls.
            let with = |k: &str, v: Value| {
                let mut c = config.clone();
                c[k] = v;
                check(&c, &good)
            };
            assert!(with("architectures", json!(["LlamaForCausalLM"])).contains("architectures"));
            assert!(with("tie_word_embeddings", json!(true)).contains("tie_word_embeddings"));
            assert!(with("norm_before_residual", Value::Null).contains("norm_before_residual"));
            assert!(with("target_hidden_size", Value::Null).contains("target_hidden_size"));
            assert!(with("eagle_aux_hidden_state_layer_ids", json!([0, 1, 2])).contains("aux ids"));
            assert!(with("num_hidden_layers", json!(2)).contains("num_hidden_layers"));
        }
    }
}
