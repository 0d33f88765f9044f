//! Building a draft for a recipe and opening the feature chunks it trains on; shared by
//! `train`, `train-step` and `run`.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::config::{DraftVariant, Recipe};
use crate::draft::{Eagle3Config, Eagle3Draft};
use crate::error::{Error, Result};
use crate::extract::reader::Chunk;
use crate::target::head::TargetHead;

/// Opens chunks and checks they were extracted from `head`'s target with the draft's aux ids.
pub fn open_chunks(dirs: &[PathBuf], head: &TargetHead, aux_layer_ids: &[i64]) -> Result<Vec<Chunk>> {
    if dirs.is_empty() {
        return Err(Error::Input("no feature chunks: give --features or set data.features in the recipe".into()));
    }
    let mut chunks = Vec::new();
    for d in dirs {
        let c = Chunk::open(d)?;
        let m = c.manifest();
        if m.target.config_hash != head.cfg.config_hash {
            return Err(Error::Input(format!(
                "{}: shards come from another target (config hash {} in the manifest, {} for {})",
                d.display(),
                m.target.config_hash,
                head.cfg.config_hash,
                head.dir.display()
            )));
        }
        if m.aux_layer_ids != aux_layer_ids || m.hidden_size != head.cfg.hidden_size {
            return Err(Error::Input(format!(
                "{}: shards hold aux ids {:?} of width {}, the draft reads {:?} of the target's width {} (aux width {} vs {})",
                d.display(),
                m.aux_layer_ids,
                m.hidden_size,
                aux_layer_ids,
                head.cfg.hidden_size,
                m.aux_layer_ids.len() as i64 * m.hidden_size,
                aux_layer_ids.len() as i64 * head.cfg.hidden_size
            )));
        }
        chunks.push(c);
    }
    Ok(chunks)
}

fn load_vocab(path: Option<&Path>, vocab: i64) -> Result<Tensor> {
    match path {
        Some(p) => {
            let (_, t2d) = crate::vocab::load(p)?;
            Ok(t2d)
        }
        None => Ok(Tensor::ones([vocab], (Kind::Bool, Device::Cpu))),
    }
}

/// A fresh draft per the recipe (or loaded from `init`), seeded, with lm_head from the target.
pub fn build_draft(recipe: &Recipe, head: &TargetHead, init: Option<&Path>, device: Device) -> Result<Eagle3Draft> {
    if let Some(dir) = init {
        return Eagle3Draft::load(dir, device);
    }
    let d = &recipe.draft;
    let aux = d.aux_ids(head.cfg.num_hidden_layers);
    let eagle31 = d.variant == DraftVariant::Eagle31;
    let cfg = match &d.config {
        Some(path) => {
            let cfg = Eagle3Config::from_llama_eagle3(path, &head.cfg, &aux)?;
            // The recipe and the imported config must describe one head.
            let disagree = |field: &str, recipe: String, file: String| {
                Err(Error::config(path, field, format!("is {file} here but the recipe says {recipe} (draft.{field})")))
            };
            if cfg.aux_layer_ids != aux {
                return disagree("aux_layer_ids", format!("{aux:?}"), format!("{:?}", cfg.aux_layer_ids));
            }
            if cfg.draft_vocab_size != d.draft_vocab_size as i64 {
                return disagree("draft_vocab_size", d.draft_vocab_size.to_string(), cfg.draft_vocab_size.to_string());
            }
            if (cfg.fc_norm && cfg.norm_output) != eagle31 {
                let file = if cfg.fc_norm && cfg.norm_output { "eagle3.1 (fc_norm, norm_output)" } else { "eagle3" };
                return disagree("variant", d.variant.to_string(), file.to_string());
            }
            cfg
        }
        None => {
            let mut cfg = Eagle3Config::for_target(&head.cfg, aux, d.draft_vocab_size as i64, eagle31);
            if let Some(i) = d.intermediate_size {
                cfg.intermediate_size = i;
            }
            cfg
        }
    };
    let t2d = load_vocab(d.vocab.as_deref(), head.cfg.vocab_size)?;
    tch::manual_seed(recipe.train.seed as i64);
    let mut draft = Eagle3Draft::new(cfg, &t2d, device)?;
    if d.init_lm_head_from_target {
        draft.init_lm_head_from_target(&head.lm_head)?;
    }
    Ok(draft)
}
