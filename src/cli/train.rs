//! `specforge-rs train` and `specforge-rs train-step`.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::config::recipe::Recipe;
use crate::draft::Eagle3Draft;
use crate::extract::reader::{load_batch, BatchSpec, SampleRef};
use crate::target::head::TargetHead;
use crate::target::registry;
use crate::train::data::ChunkBatches;
use crate::train::setup::{build_draft, open_chunks};
use crate::train::trainer::Trainer;
use crate::train::ttt::{ttt_forward, TttBatch};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The run recipe (TOML; unknown keys are errors).
    #[arg(long)]
    recipe: PathBuf,
    /// Override a recipe field: `--set train.lr=2e-4` (repeatable).
    #[arg(long = "set")]
    overrides: Vec<String>,
    /// Feature chunks to train on (replaces `data.features`).
    #[arg(long)]
    features: Vec<PathBuf>,
    /// Run directory (checkpoints, metrics.jsonl); resumes from its latest checkpoint.
    #[arg(long)]
    out: PathBuf,
    /// Start from this head (export layout) instead of a fresh initialisation.
    #[arg(long)]
    init: Option<PathBuf>,
}

pub fn run(a: TrainArgs) -> anyhow::Result<()> {
    let recipe = Recipe::load(&a.recipe, &a.overrides)?;
    let device = Device::cuda_if_available();
    let dir = registry::resolve(&recipe.target.name)?;
    let head = TargetHead::load(&dir, Kind::Float, device)?;
    let comm =
        crate::dist::collective_from_env(recipe.train.ddp_bucket_mb, std::time::Duration::from_secs(recipe.train.collective_timeout_s))?;
    let features = if a.features.is_empty() { recipe.data.features.clone() } else { a.features.clone() };
    let chunks = open_chunks(&features, &head, &recipe.draft.aux_layer_ids)?;
    let draft = build_draft(&recipe, &head, a.init.as_deref(), device)?;
    let opts = crate::extract::reader::BatchOptions {
        token_budget: recipe.train.token_budget as usize,
        max_batch_size: recipe.train.max_batch_size,
        max_len: recipe.data.max_len as usize,
        ..Default::default()
    };
    let data = ChunkBatches::new(chunks, opts, recipe.train.seed, comm.rank(), comm.world_size(), device);
    let mut trainer = Trainer::new(draft, &head, recipe.train.clone(), recipe.to_toml(), &a.out, comm.as_ref())?;
    let history = trainer.run(&data)?;
    if comm.rank() == 0 {
        if let Some(m) = history.last() {
            println!(
                "step {} loss {:.4} acc0 {:.3} sim_accept_len {:.3}",
                m.step,
                m.loss,
                m.acc.first().copied().unwrap_or(0.0),
                m.sim_accept_len
            );
        }
        println!("checkpoints in {}", a.out.join("checkpoints").display());
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct TrainStepArgs {
    /// The head (export layout: config.json + model.safetensors).
    #[arg(long)]
    draft: PathBuf,
    /// The target directory (only its embedding and lm_head are read).
    #[arg(long)]
    target: PathBuf,
    /// A feature chunk; all its samples form one right-padded batch, in manifest order.
    #[arg(long)]
    features: PathBuf,
    /// TTT length.
    #[arg(long, default_value_t = 7)]
    ttt: usize,
    /// Loss weight decay per step.
    #[arg(long, default_value_t = 0.8)]
    decay: f64,
    /// Where to write the losses and metrics (JSON).
    #[arg(long)]
    json: PathBuf,
    /// Also save the gradients (safetensors, the head's tensor names).
    #[arg(long)]
    grads: Option<PathBuf>,
    /// Benchmark: after the step, time this many more forward + backward passes and print
    /// `bench_ttt impl=specforge-rs ... tokens_per_s=X`.
    #[arg(long, default_value_t = 0)]
    repeat: usize,
}

pub fn run_step(a: TrainStepArgs) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let draft = Eagle3Draft::load(&a.draft, device)?;
    let head = TargetHead::load(&registry::resolve(a.target.to_str().unwrap_or_default())?, Kind::Float, device)?;
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
    std::fs::write(&a.json, serde_json::to_string_pretty(&report)?).with_context(|| format!("writing {}", a.json.display()))?;
    println!("{}", serde_json::to_string(&report)?);
    if let Some(g) = &a.grads {
        let grads: Vec<(String, Tensor)> =
            draft.named_parameters().into_iter().map(|(n, p)| (n, p.grad())).filter(|(_, g)| g.defined()).collect();
        crate::weights::save_safetensors(g, &grads, None)?;
    }
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
        let secs = start.elapsed().as_secs_f64() / a.repeat as f64;
        let tokens: i64 = b.lengths.iter().sum();
        println!(
            "bench_ttt impl=specforge-rs ttt={} tokens={tokens} threads={} step_s={secs:.3} tokens_per_s={:.1}",
            a.ttt,
            tch::get_num_threads(),
            tokens as f64 / secs
        );
    }
    Ok(())
}
