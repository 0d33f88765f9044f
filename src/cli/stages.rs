//! Each subcommand: the stage's library function on the parsed job and the runtime, then what
//! it prints (rank 0 only).

use std::path::PathBuf;

use clap::Args;
use serde_json::json;
use tch::{Kind, Tensor};

use crate::config::Recipe;
use crate::draft::Eagle3Draft;
use crate::extract::reader::{load_batch, BatchSpec, SampleRef};
use crate::runtime::Runtime;
use crate::target::head::TargetHead;
use crate::target::registry;
use crate::train::setup::open_chunks;
use crate::train::ttt::{ttt_forward, TttBatch};
use crate::util::bytes;
use crate::util::fs::write_atomic;

/// `regenerate`.
pub fn regenerate(j: &crate::generate::regenerate::RegenerateJob, rt: &Runtime) -> anyhow::Result<()> {
    let s = crate::generate::regenerate::run(j, rt)?;
    if rt.prints {
        println!(
            "regenerate: {} conversations written, {} already done, {} new tokens in {:.1} s ({:.1} tokens/s) -> {}",
            s.written,
            s.resumed,
            s.new_tokens,
            s.secs,
            s.new_tokens as f64 / s.secs.max(1e-9),
            j.out.display()
        );
    }
    Ok(())
}

/// `vocab`.
pub fn vocab(j: &crate::vocab::VocabJob, rt: &Runtime) -> anyhow::Result<()> {
    let r = crate::vocab::run(j, rt)?;
    let dv = &r.vocab;
    if rt.prints {
        println!(
            "vocab: Vd {} of V {}: covers {:.2}% of {} supervised tokens ({} distinct ids seen, {} forced, {} padded) -> {} (report {})",
            dv.draft_vocab_size(),
            dv.t2d.len(),
            100.0 * dv.coverage(),
            dv.total_tokens,
            dv.distinct,
            dv.forced.len(),
            dv.padded,
            j.out.display(),
            r.report.display()
        );
    }
    Ok(())
}

/// `extract`.
pub fn extract(j: &crate::extract::ExtractJob, rt: &Runtime) -> anyhow::Result<()> {
    let r = crate::extract::run(j, rt)?;
    let (s, m) = (&r.stats, &r.manifest);
    if rt.prints {
        println!(
            "extract: rank {} wrote {} samples / {} tokens in {} shards ({}; {} shards resumed) in {:.1} s: {:.1} tokens/s overall, {:.1} tokens/s in the forward; chunk {}: {} of {} samples{}",
            rt.rank(),
            s.samples,
            s.tokens,
            s.shards,
            bytes::human(s.bytes),
            s.resumed_shards,
            s.wall_secs,
            s.tokens as f64 / s.wall_secs.max(1e-9),
            s.tokens as f64 / s.forward_secs.max(1e-9),
            j.out.display(),
            m.samples,
            m.run.planned_samples,
            if m.complete { ", complete" } else { "" }
        );
        println!(
            "{}",
            json!({
                "bench": "extract",
                "target": j.target.name,
                "device": rt.device_name(),
                "compute_dtype": m.run.compute_dtype,
                "tokens": s.tokens,
                "samples": s.samples,
                "forward_secs": s.forward_secs,
                "wall_secs": s.wall_secs,
                "forward_tokens_per_s": s.tokens as f64 / s.forward_secs.max(1e-9),
                "tokens_per_s": s.tokens as f64 / s.wall_secs.max(1e-9),
                "bytes": s.bytes,
            })
        );
    }
    Ok(())
}

/// `train`.
pub fn train(j: &crate::train::TrainJob, rt: &Runtime) -> anyhow::Result<()> {
    let r = crate::train::run(j, rt)?;
    if rt.prints {
        if let Some(m) = &r.last {
            println!(
                "step {} loss {:.4} acc0 {:.3} sim_accept_len {:.3}",
                m.step,
                m.loss,
                m.acc.first().copied().unwrap_or(0.0),
                m.sim_accept_len
            );
        }
        println!("checkpoints in {}", j.out.join("checkpoints").display());
    }
    Ok(())
}

/// `export`.
pub fn export(j: &crate::pipeline::ExportJob, rt: &Runtime) -> anyhow::Result<()> {
    let r = crate::pipeline::export(j, rt)?;
    println!("exported {} -> {} ({}, bf16, validated)", r.head.display(), j.out.display(), j.export.format);
    if r.card {
        println!("model card {}", j.out.join("README.md").display());
    } else {
        println!("no recipe.toml beside {}: no model card written", r.head.display());
    }
    Ok(())
}

/// `eval`.
pub fn eval(j: &crate::eval::EvalJob, rt: &Runtime) -> anyhow::Result<()> {
    let r = crate::eval::stage::run(j, rt)?;
    let t = &r.stats;
    println!("eval: {} prompts ({} offline against given answers, {} live), k = {}", r.offline + r.live, r.offline, r.live, j.eval.k);
    println!("| metric | value |\n|---|---|");
    println!("| mean acceptance length | {:.3} |", t.mean_acceptance_length());
    println!("| draft acceptance rate | {:.3} |", t.draft_acceptance_rate());
    for (i, r) in t.per_position_rate().iter().enumerate() {
        println!("| acceptance at position {i} | {r:.3} |");
    }
    println!("| drafts / draft tokens / accepted | {} / {} / {} |", t.num_drafts, t.num_draft_tokens, t.num_accepted_tokens);
    Ok(())
}

/// `generate`.
pub fn generate(j: &crate::generate::GenerateJob, rt: &Runtime) -> anyhow::Result<()> {
    let r = crate::generate::run(j, rt)?;
    for (q, a) in &r.answers {
        println!("### {q}\n{a}\n");
    }
    let rate = r.new_tokens as f64 / r.secs.max(1e-9);
    match &r.spec {
        Some(s) => println!(
            "{} answers, {} new tokens in {:.1} s ({rate:.1} tokens/s); {} target steps, mean acceptance length {:.3} at k = {}",
            r.answers.len(),
            r.new_tokens,
            r.secs,
            s.num_drafts + r.answers.len() as u64,
            s.mean_acceptance_length(),
            j.k
        ),
        None => println!("{} answers, {} new tokens in {:.1} s ({rate:.1} tokens/s)", r.answers.len(), r.new_tokens, r.secs),
    }
    Ok(())
}

/// `run RECIPE`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The recipe (TOML; unknown keys are errors).
    recipe: PathBuf,
    /// Run directory (resumed when it exists); default runs/<recipe name>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Override a recipe field: `--set train.lr=2e-4` (repeatable).
    #[arg(long = "set")]
    overrides: Vec<String>,
}

/// `run`.
pub fn run(a: &RunArgs, rt: &Runtime) -> anyhow::Result<()> {
    let recipe = Recipe::load(&a.recipe, &a.overrides)?;
    let name = a.recipe.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(name));
    let s = crate::pipeline::run(&recipe, &out, rt)?;
    println!("run: {} optimizer steps; head exported to {}", s.steps, s.export_dir.display());
    if let (Some(t), Some(u)) = (&s.trained, &s.untrained) {
        let round = |v: Vec<f64>| v.iter().map(|r| (r * 1000.0).round() / 1000.0).collect::<Vec<_>>();
        println!(
            "run: mean acceptance length at k = {} on held-out prompts: trained {:.3}, untrained {:.3} (per-position {:?} vs {:?})",
            s.k,
            t.mean_acceptance_length(),
            u.mean_acceptance_length(),
            round(t.per_position_rate()),
            round(u.per_position_rate())
        );
    }
    println!("run: report {}, model card {}", out.join("summary.json").display(), s.export_dir.join("README.md").display());
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

/// `train-step`: one TTT step (a test and benchmark tool).
pub fn train_step(a: &TrainStepArgs, rt: &Runtime) -> anyhow::Result<()> {
    let device = rt.device;
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
    write_atomic(&a.json, serde_json::to_string_pretty(&report)?.as_bytes())?;
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
