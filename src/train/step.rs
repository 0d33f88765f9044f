//! `specforge-rs train-step`: one TTT step on given head weights and features — losses, metrics,
//! optionally gradients and a timing — for the PyTorch parity tests and the step benchmark.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;
use tch::{Kind, Tensor};

use super::setup::open_chunks;
use super::ttt::{ttt_forward, TttBatch};
use crate::draft::Eagle3Draft;
use crate::error::{Error, Result};
use crate::extract::reader::{load_batch, BatchSpec, SampleRef};
use crate::runtime::Runtime;
use crate::target::head::TargetHead;
use crate::target::registry;
use crate::util::fs::write_atomic;

/// `specforge-rs train-step`: the tool's whole input.
#[derive(Args, Debug)]
pub struct TrainStepJob {
    /// The head (export layout: config.json + model.safetensors).
    #[arg(long)]
    pub draft: PathBuf,
    /// The target directory (only its embedding and lm_head are read).
    #[arg(long)]
    pub target: PathBuf,
    /// A feature chunk; all its samples form one right-padded batch, in manifest order.
    #[arg(long)]
    pub features: PathBuf,
    /// TTT length.
    #[arg(long, default_value_t = 7)]
    pub ttt: usize,
    /// Loss weight decay per step.
    #[arg(long, default_value_t = 0.8)]
    pub decay: f64,
    /// Where to write the losses and metrics (JSON).
    #[arg(long)]
    pub json: PathBuf,
    /// Also save the gradients (safetensors, the head's tensor names).
    #[arg(long)]
    pub grads: Option<PathBuf>,
    /// Benchmark: after the step, time this many more forward + backward passes and print
    /// `bench_ttt impl=specforge-rs ... tokens_per_s=X`.
    #[arg(long, default_value_t = 0)]
    pub repeat: usize,
}

/// What one step measured.
pub struct TrainStepResult {
    /// Losses and metrics (also written to `--json`).
    pub report: serde_json::Value,
    /// Tokens in the batch (all samples, unpadded).
    pub tokens: i64,
    /// With `--repeat`: seconds per forward + backward.
    pub bench_step_s: Option<f64>,
}

/// `train-step`: one TTT step on given head weights and features (a test and benchmark tool).
pub fn run(a: &TrainStepJob, rt: &Runtime) -> Result<TrainStepResult> {
    let device = rt.device;
    let draft = Eagle3Draft::load(&a.draft, device)?;
    let head = TargetHead::load(&registry::resolve(&a.target.to_string_lossy())?, Kind::Float, device)?;
    let chunks = open_chunks(std::slice::from_ref(&a.features), &head, &draft.cfg.aux_layer_ids)?;
    let c = &chunks[0];
    let samples: Vec<SampleRef> = (0..c.num_samples()).map(|s| SampleRef { chunk: 0, sample: s as u32 }).collect();
    let seq_len = (0..c.num_samples()).map(|s| c.sample_len(s)).max().unwrap_or(0);
    let tokens = (0..c.num_samples()).map(|s| c.sample_len(s)).sum();
    let b = load_batch(&chunks, &BatchSpec { samples, seq_len, tokens }, device)?;
    b.check_finite()?;
    let batch = TttBatch {
        input_ids: &b.input_ids,
        attention_mask: &b.attention_mask,
        loss_mask: &b.loss_mask,
        aux: &b.aux,
        last_hidden: &b.last_hidden,
    };
    let out = ttt_forward(&draft, &head.embed_tokens, &head.lm_head, &batch, a.ttt, a.decay)?;
    if a.grads.is_some() {
        out.weighted_loss.backward();
    }
    let c = &out.counts;
    let report = json!({
        "ttt": a.ttt,
        "loss": out.losses,
        "weighted_loss": out.weighted_loss.double_value(&[]),
        "acc": c.acc(),
        "cond_acc": c.cond_acc(),
        "acc_correct": c.acc_correct,
        "acc_denominator": c.acc_denominator,
        "cond_correct": c.cond_correct,
        "cond_denominator": c.cond_denominator,
        "sim_accept_len": c.sim_accept_len(),
        "positions": out.positions,
    });
    let text = serde_json::to_string_pretty(&report).map_err(|e| Error::Input(e.to_string()))?;
    write_atomic(&a.json, text.as_bytes())?;
    if let Some(g) = &a.grads {
        let grads: Vec<(String, Tensor)> =
            draft.named_parameters().into_iter().map(|(n, p)| (n, p.grad())).filter(|(_, g)| g.defined()).collect();
        crate::weights::save_safetensors(g, &grads, None)?;
    }
    let mut bench_step_s = None;
    if a.repeat > 0 {
        let params = draft.named_parameters();
        let start = std::time::Instant::now();
        for _ in 0..a.repeat {
            for (_, p) in &params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            ttt_forward(&draft, &head.embed_tokens, &head.lm_head, &batch, a.ttt, a.decay)?.weighted_loss.backward();
        }
        bench_step_s = Some(start.elapsed().as_secs_f64() / a.repeat as f64);
    }
    Ok(TrainStepResult { report, tokens: b.lengths.iter().sum(), bench_step_s })
}
