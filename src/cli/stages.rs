//! Each subcommand: the stage's library function on the parsed job and the runtime, then what
//! it prints (rank 0 only).

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use crate::config::Recipe;
use crate::runtime::Runtime;
use crate::util::bytes;

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

/// `train-step`.
pub fn train_step(j: &crate::train::step::TrainStepJob, rt: &Runtime) -> anyhow::Result<()> {
    let r = crate::train::step::run(j, rt)?;
    println!("{}", serde_json::to_string(&r.report)?);
    if let Some(secs) = r.bench_step_s {
        println!(
            "bench_ttt impl=specforge-rs ttt={} tokens={} threads={} step_s={secs:.3} tokens_per_s={:.1}",
            j.ttt,
            r.tokens,
            tch::get_num_threads(),
            r.tokens as f64 / secs
        );
    }
    Ok(())
}
