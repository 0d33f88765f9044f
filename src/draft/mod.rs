//! The EAGLE-3 / EAGLE-3.1 draft head (stage 4): a pure model definition.
//!
//! What the servers compute (vLLM's `vllm/model_executor/models/llama_eagle3.py` and SGLang's
//! `python/sglang/srt/models/llama_eagle3.py`; tests/reference/serving_draft.py restates it in
//! plain torch): `fc` fuses the A aux states (A·T → H), with EAGLE-3.1's `fc_norm` (one RMSNorm
//! per aux chunk) or `norm_before_fc` (one RMSNorm over A·T) in front; one Llama decoder layer
//! (`midlayer`) whose q/k/v read `cat(input_layernorm(embed), hidden_norm(h))` (2H wide, embedding
//! half first) with the raw `h` as residual; a final `norm`; `lm_head` over the draft vocabulary;
//! `d2t` maps draft ids to target ids. The token embedding is the target's, frozen, and never
//! part of the draft.
//!
//! Variable names in the [`VarStore`] equal the exported tensor names (`fc.weight`,
//! `midlayer.self_attn.q_proj.weight`, ...), so checkpoints and exports need no rename table.

pub mod attention;
pub mod config;

use std::path::Path;

use tch::nn::{Init, VarStore};
use tch::{Device, Kind, Tensor};

pub use config::Eagle3Config;

use crate::error::{Error, Result};
use crate::nn::{append_kv, apply_rotary, rms_norm, Linear, Mlp, Rotary};
use crate::weights::{save_safetensors, SafetensorsFile};
use attention::TttKv;

/// The midlayer's attention projections.
#[derive(Debug)]
pub struct SelfAttn {
    /// `[nh·d, 2H]`.
    pub q_proj: Tensor,
    /// `[nkv·d, 2H]`.
    pub k_proj: Tensor,
    /// `[nkv·d, 2H]`.
    pub v_proj: Tensor,
    /// `[H, nh·d]`.
    pub o_proj: Tensor,
}

/// The single decoder layer.
#[derive(Debug)]
pub struct MidLayer {
    /// Norm on the token embedding `[H]`.
    pub input_layernorm: Tensor,
    /// Norm on the incoming hidden `[H]`.
    pub hidden_norm: Tensor,
    /// Attention.
    pub self_attn: SelfAttn,
    /// `[H]`.
    pub post_attention_layernorm: Tensor,
    /// Bias-free SwiGLU MLP.
    pub mlp: Mlp,
}

/// The draft head. Trainable tensors live in `vs`; the fields are handles to them.
pub struct Eagle3Draft {
    /// The architecture.
    pub cfg: Eagle3Config,
    /// Owns every trainable tensor, named as exported.
    pub vs: VarStore,
    /// `[H, A·T]`.
    pub fc: Tensor,
    /// EAGLE-3.1: A tensors `[T]`.
    pub fc_norm: Vec<Tensor>,
    /// `norm_before_fc`: `[A·T]`.
    pub input_norm: Option<Tensor>,
    /// The decoder layer.
    pub midlayer: MidLayer,
    /// Final norm `[H]`.
    pub norm: Tensor,
    /// `[Vd, H]`.
    pub lm_head: Tensor,
    /// `[Vd]` int64 offsets: target id = draft id + d2t[draft id].
    pub d2t: Tensor,
    /// `[V]` bool: target ids kept in the draft vocabulary.
    pub t2d: Tensor,
    rotary: Rotary,
}

/// Output of one midlayer step.
pub struct StepOutput {
    /// The layer output before the final norm, `[B, T, H]`.
    pub out: Tensor,
    /// After the final norm, `[B, T, H]`: the lm_head input.
    pub post: Tensor,
}

impl StepOutput {
    /// The hidden fed to the next step: post-norm for EAGLE-3.1 (`norm_output`, vLLM's
    /// semantics), pre-norm for EAGLE-3.
    pub fn next_hidden(&self, norm_output: bool) -> &Tensor {
        if norm_output {
            &self.post
        } else {
            &self.out
        }
    }
}

impl Eagle3Draft {
    /// A freshly initialised draft (Llama init: normal(0, 0.02) matrices, unit norms) with an
    /// identity-free vocabulary mapping given by `t2d` (`[V]` bool with Vd trues).
    pub fn new(cfg: Eagle3Config, t2d: &Tensor, device: Device) -> Result<Self> {
        cfg.validate(Path::new("draft config (recipe [draft] / config.json)"))?;
        let vs = VarStore::new(device);
        let root = vs.root();
        let (h, t, a) = (cfg.hidden_size, cfg.target_hidden_size, cfg.num_aux());
        let (nh, nkv, d, i) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size);
        let w = |p: &tch::nn::Path, name: &str, dims: &[i64]| p.sub(name).var("weight", dims, Init::Randn { mean: 0.0, stdev: 0.02 });
        let ones = |p: &tch::nn::Path, name: &str, dims: &[i64]| p.sub(name).var("weight", dims, Init::Const(1.0));
        let fc = w(&root, "fc", &[h, a * t]);
        let fc_norm = if cfg.fc_norm { (0..a).map(|k| ones(&root.sub("fc_norm"), &k.to_string(), &[t])).collect() } else { Vec::new() };
        let input_norm = cfg.norm_before_fc.then(|| ones(&root, "input_norm", &[a * t]));
        let m = root.sub("midlayer");
        let sa = m.sub("self_attn");
        let mlp = m.sub("mlp");
        let midlayer = MidLayer {
            input_layernorm: ones(&m, "input_layernorm", &[h]),
            hidden_norm: ones(&m, "hidden_norm", &[h]),
            self_attn: SelfAttn {
                q_proj: w(&sa, "q_proj", &[nh * d, 2 * h]),
                k_proj: w(&sa, "k_proj", &[nkv * d, 2 * h]),
                v_proj: w(&sa, "v_proj", &[nkv * d, 2 * h]),
                o_proj: w(&sa, "o_proj", &[h, nh * d]),
            },
            post_attention_layernorm: ones(&m, "post_attention_layernorm", &[h]),
            mlp: Mlp {
                gate_proj: Linear { weight: w(&mlp, "gate_proj", &[i, h]), bias: None },
                up_proj: Linear { weight: w(&mlp, "up_proj", &[i, h]), bias: None },
                down_proj: Linear { weight: w(&mlp, "down_proj", &[h, i]), bias: None },
            },
        };
        let norm = ones(&root, "norm", &[h]);
        let lm_head = w(&root, "lm_head", &[cfg.draft_vocab_size, h]);
        let (d2t, t2d) = vocab_maps(t2d, cfg.vocab_size, cfg.draft_vocab_size, device)?;
        let rotary = Rotary::new(&cfg.rope(), d, device);
        Ok(Eagle3Draft { cfg, vs, fc, fc_norm, input_norm, midlayer, norm, lm_head, d2t, t2d, rotary })
    }

    /// Loads a draft in export layout (`config.json` + `model.safetensors`), in fp32 for training.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let cfg = Eagle3Config::from_file(&dir.join("config.json"))?;
        let file = SafetensorsFile::open(&dir.join("model.safetensors"))?;
        let t2d = file.tensor("t2d").map_err(|_| Error::MissingTensors { path: file.path().to_path_buf(), names: vec!["t2d".into()] })?;
        let draft = Self::new(cfg, &t2d, device)?;
        draft.load_weights(&file)?;
        let d2t = file.tensor("d2t")?.to_device(device);
        if !d2t.equal(&draft.d2t) {
            return Err(Error::Input(format!(
                "{}: d2t does not match t2d (target = draft + d2t[draft] must list the t2d ids in order)",
                file.path().display()
            )));
        }
        Ok(draft)
    }

    /// Copies every trainable tensor from `file` (names as exported), checking shapes.
    pub fn load_weights(&self, file: &SafetensorsFile) -> Result<()> {
        let mut missing = Vec::new();
        tch::no_grad(|| -> Result<()> {
            for (name, mut var) in self.named_parameters() {
                match file.shape(&name) {
                    None => missing.push(name),
                    Some(s) if s != var.size().as_slice() => {
                        return Err(Error::Shape { name, expected: var.size(), got: s.to_vec(), path: Some(file.path().to_path_buf()) })
                    }
                    Some(_) => {
                        let t = file.tensor(&name)?;
                        var.f_copy_(&t.to_kind(var.kind()))?;
                    }
                }
            }
            Ok(())
        })?;
        if !missing.is_empty() {
            return Err(Error::MissingTensors { path: file.path().to_path_buf(), names: missing });
        }
        Ok(())
    }

    /// Trainable tensors sorted by name.
    pub fn named_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Every tensor in export layout (`d2t`, `t2d` included), converted to `kind` for floats.
    pub fn export_tensors(&self, kind: Kind) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.named_parameters().into_iter().map(|(n, t)| (n, t.detach().to_kind(kind))).collect();
        v.push(("d2t".into(), self.d2t.shallow_clone()));
        v.push(("t2d".into(), self.t2d.shallow_clone()));
        v
    }

    /// Writes `dir/config.json` + `dir/model.safetensors` in export layout.
    pub fn save(&self, dir: &Path, kind: Kind) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cfg_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.cfg.to_export_json()).map_err(|e| Error::Input(e.to_string()))?;
        crate::util::fs::write_atomic(&cfg_path, text.as_bytes())?;
        save_safetensors(&dir.join("model.safetensors"), &self.export_tensors(kind), None)
    }

    /// Fuses the aux states: optional `input_norm` / per-chunk `fc_norm`, then `fc`.
    ///
    /// # Shapes
    /// `aux`: `[B, T, A·Tt]`; returns `[B, T, H]`.
    pub fn project_hidden_states(&self, aux: &Tensor) -> Result<Tensor> {
        let width = self.cfg.num_aux() * self.cfg.target_hidden_size;
        if aux.size().last() != Some(&width) {
            return Err(Error::Input(format!(
                "aux width {:?} does not match the draft's A·T = {width} ({} aux states of {})",
                aux.size().last(),
                self.cfg.num_aux(),
                self.cfg.target_hidden_size
            )));
        }
        let eps = self.cfg.rms_norm_eps;
        let mut a = aux.shallow_clone();
        if let Some(w) = &self.input_norm {
            a = rms_norm(&a, w, eps);
        }
        if !self.fc_norm.is_empty() {
            let chunks = a.split(self.cfg.target_hidden_size, -1);
            let normed: Vec<Tensor> = chunks.iter().zip(&self.fc_norm).map(|(c, w)| rms_norm(c, w, eps)).collect();
            a = Tensor::cat(&normed, -1);
        }
        Ok(a.linear::<Tensor>(&self.fc, None))
    }

    /// cos/sin for draft positions `[B, T]`.
    pub fn rope(&self, position_ids: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        self.rotary.cos_sin(position_ids, kind)
    }

    /// One pass of the midlayer for one TTT step.
    ///
    /// `kv` holds the keys/values of earlier steps; this step's are appended. At step 0 the
    /// attention is causal over the step's own keys; at step k it also sees the diagonal keys of
    /// steps 1..k (see [`attention`]).
    ///
    /// # Shapes
    /// `emb`, `hidden`: `[B, T, H]`; `cos`/`sin`: `[B, T, d]`.
    pub fn step(&self, emb: &Tensor, hidden: &Tensor, cos: &Tensor, sin: &Tensor, kv: &mut TttKv) -> StepOutput {
        let (q, k, v) = self.qkv(emb, hidden, cos, sin);
        kv.push(k, v);
        let o = kv.attend(&q, self.attn_scale());
        self.finish(hidden, &o)
    }

    /// One pass of the midlayer at inference: the new positions attend to `past_k`/`past_v`
    /// (`[B, nkv, S, d]`, everything before them) and causally among themselves. Returns the
    /// output and this pass's keys and values (to append to a cache).
    pub fn step_cached(
        &self,
        emb: &Tensor,
        hidden: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        past: Option<(&Tensor, &Tensor)>,
    ) -> (StepOutput, Tensor, Tensor) {
        let (q, k, v) = self.qkv(emb, hidden, cos, sin);
        let past_len = past.map_or(0, |(pk, _)| pk.size()[2]);
        let (keys, values) = append_kv(past, &k, &v);
        let (b, t) = (emb.size()[0], emb.size()[1]);
        let mask = (past_len > 0 && t > 1)
            .then(|| crate::nn::causal_padding_mask(&Tensor::ones([b, past_len + t], (Kind::Int64, emb.device())), t, past_len, q.kind()));
        let o = crate::nn::attention(&q, &keys, &values, mask.as_ref(), self.attn_scale());
        (self.finish(hidden, &o), k, v)
    }

    fn attn_scale(&self) -> f64 {
        1.0 / (self.cfg.head_dim as f64).sqrt()
    }

    /// q (`[B, nh, T, d]`), k and v (`[B, nkv, T, d]`) from `cat(input_layernorm(emb), hidden_norm(hidden))`.
    fn qkv(&self, emb: &Tensor, hidden: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor, Tensor) {
        let c = &self.cfg;
        let m = &self.midlayer;
        let (b, t) = (emb.size()[0], emb.size()[1]);
        let x = Tensor::cat(&[rms_norm(emb, &m.input_layernorm, c.rms_norm_eps), rms_norm(hidden, &m.hidden_norm, c.rms_norm_eps)], -1);
        let heads = |w: &Tensor, n: i64| x.linear::<Tensor>(w, None).view([b, t, n, c.head_dim]).transpose(1, 2);
        let q = apply_rotary(&heads(&m.self_attn.q_proj, c.num_attention_heads), cos, sin);
        let k = apply_rotary(&heads(&m.self_attn.k_proj, c.num_key_value_heads), cos, sin);
        (q, k, heads(&m.self_attn.v_proj, c.num_key_value_heads))
    }

    /// o_proj + residual (the raw incoming hidden), the MLP block and the final norm.
    fn finish(&self, hidden: &Tensor, attn: &Tensor) -> StepOutput {
        let c = &self.cfg;
        let m = &self.midlayer;
        let s = attn.size(); // [B, nh, T, d]
        let o = attn.transpose(1, 2).reshape([s[0], s[2], c.num_attention_heads * c.head_dim]);
        let h = hidden + o.linear::<Tensor>(&m.self_attn.o_proj, None);
        let n = rms_norm(&h, &m.post_attention_layernorm, c.rms_norm_eps);
        let out = h + m.mlp.forward(&n);
        let post = rms_norm(&out, &self.norm, c.rms_norm_eps);
        StepOutput { out, post }
    }

    /// Draft-vocabulary logits `[.., Vd]` from post-norm hidden states `[.., H]`.
    pub fn compute_logits(&self, post: &Tensor) -> Tensor {
        post.linear::<Tensor>(&self.lm_head, None)
    }

    /// Target ids of draft ids.
    pub fn draft_to_target(&self, draft_ids: &Tensor) -> Tensor {
        draft_ids + self.d2t.index_select(0, &draft_ids.flatten(0, -1)).view_as(draft_ids)
    }

    /// The draft vocabulary's target ids in ascending order, `[Vd]`.
    pub fn draft_token_ids(&self) -> Tensor {
        Tensor::arange(self.cfg.draft_vocab_size, (Kind::Int64, self.d2t.device())) + &self.d2t
    }

    /// Sets `lm_head` to the target's lm_head rows of the draft vocabulary (speculators does
    /// this; it starts the draft from the target's own output geometry).
    pub fn init_lm_head_from_target(&mut self, target_lm_head: &Tensor) -> Result<()> {
        let rows = target_lm_head.f_index_select(0, &self.draft_token_ids().to_device(target_lm_head.device()))?;
        tch::no_grad(|| self.lm_head.f_copy_(&rows.to_kind(self.lm_head.kind()).to_device(self.lm_head.device())))?;
        Ok(())
    }
}

/// Builds `d2t` (`[Vd]` int64 offsets) and `t2d` (`[V]` bool) from a `[V]` mask with Vd trues.
pub fn vocab_maps(t2d: &Tensor, vocab: i64, draft_vocab: i64, device: Device) -> Result<(Tensor, Tensor)> {
    let t2d = t2d.to_kind(Kind::Bool).to_device(device);
    if t2d.size() != [vocab] {
        return Err(Error::Shape { name: "t2d".into(), expected: vec![vocab], got: t2d.size(), path: None });
    }
    let ids = t2d.nonzero().squeeze_dim(1); // ascending target ids
    if ids.size()[0] != draft_vocab {
        return Err(Error::Input(format!("t2d has {} trues, draft_vocab_size is {draft_vocab}", ids.size()[0])));
    }
    let d2t = &ids - Tensor::arange(draft_vocab, (Kind::Int64, device));
    Ok((d2t, t2d))
}

/// A 16-wide random head over a 40-token vocabulary (draft ids = target ids 3..13), for unit
/// tests of the modules that take a head.
#[cfg(test)]
pub(crate) fn tiny_draft(eagle31: bool) -> Eagle3Draft {
    let cfg = Eagle3Config {
        hidden_size: 16,
        target_hidden_size: 16,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 8,
        intermediate_size: 24,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        max_position_embeddings: 4096,
        vocab_size: 40,
        draft_vocab_size: 10,
        aux_layer_ids: vec![1, 2, 3],
        fc_norm: eagle31,
        norm_output: eagle31,
        norm_before_fc: false,
    };
    let t2d = Tensor::zeros([40], (Kind::Bool, Device::Cpu));
    let _ = t2d.narrow(0, 3, 10).fill_(1);
    match Eagle3Draft::new(cfg, &t2d, Device::Cpu) {
        Ok(d) => d,
        Err(e) => panic!("the tiny test head builds: {e}"),
    }
}
